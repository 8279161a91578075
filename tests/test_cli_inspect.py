"""``resdyn inspect`` / ``archs``: output contracts and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHECKPOINTS, ROOT, needs_shared, run_cli, run_json


def test_inspect_json(tiny_checkpoint: Path, capsys) -> None:
    doc = run_json(["inspect", tiny_checkpoint], capsys)
    assert doc["schema_version"] == "2"
    assert doc["checkpoint"]["arch"] == "resnet8"
    assert doc["checkpoint"]["arch_source"] == "metadata"
    from auditor.models.cifar_resnet import cifar_resnet

    assert doc["checkpoint"]["parameters"] == sum(p.numel() for p in cifar_resnet(8).parameters())
    assert [b["shortcut"] for b in doc["blocks"]] == ["identity", "option_a", "option_a"]
    assert [s["name"] for s in doc["stages"]] == ["stem", "layer1", "layer2", "layer3"]
    assert doc["stages"][3]["shape"] == [64, 8, 8]
    conv = doc["blocks"][1]["convs"][0]
    assert conv["stride"] == [2, 2] and conv["input_shape"] == [16, 32, 32]
    assert len(doc["layers"]) == 8


def test_inspect_table_and_input_size(tiny_checkpoint: Path, capsys) -> None:
    code, out, err = run_cli(["inspect", tiny_checkpoint, "--input-size", "64"], capsys)
    assert code == 0, err
    assert "layer2.0" in out and "option_a" in out and "64x16x16" in out


def test_inspect_output_file_is_atomic(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "out" / "report.json"
    target.parent.mkdir()  # -o creates no folder (#26)
    code, out, _ = run_cli(["inspect", tiny_checkpoint, "--format", "json", "-o", target], capsys)
    assert code == 0 and out == ""
    assert json.loads(target.read_text())["checkpoint"]["arch"] == "resnet8"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "missing.safetensors"], "does not exist"),
        (["inspect", "{tiny}", "--arch", "resnet21"], "unknown architecture 'resnet21'"),
        (["inspect", "{tiny}", "--arch", "resnet8_nobn"], "missing keys: conv1.bias"),
        (["inspect", "{tiny}", "--input-size", "abc"], "input size 'abc' is not a size"),
        (["inspect", "{tiny}", "--format", "xml"], "Invalid value for '--format'"),
        (["inspect", "{notckpt}"], "not a checkpoint"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    notckpt = tmp_path / "notes.txt"
    notckpt.write_text("plain text")
    args = [a.format(tiny=tiny_checkpoint, notckpt=notckpt) for a in args]
    target = tmp_path / "never.json"
    code, out, err = run_cli([*args, "-o", target] if "--format" not in args else args, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resdyn: error:"), err
    assert message in lines[0]
    assert not target.exists()


@pytest.mark.slow
def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_text("garbage")
    env = dict(os.environ, RESDYN_DEBUG="1")
    result = subprocess.run(
        [sys.executable, "-m", "auditor", "inspect", str(bad)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr
    env.pop("RESDYN_DEBUG")
    result = subprocess.run(
        [sys.executable, "-m", "auditor", "inspect", str(bad)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_archs_lists_families(capsys) -> None:
    code, out, _ = run_cli(["archs", "--format", "json"], capsys)
    names = {entry["name"] for entry in json.loads(out)}
    assert code == 0 and {"resnet20", "resnet50_plain_nobn", "resnext50_32x4d"} <= names


@needs_shared
def test_inspect_real_resnet20_without_flags(capsys) -> None:
    doc = run_json(["inspect", CHECKPOINTS / "cifar10-resnet20-akamaster.th"], capsys)
    assert doc["checkpoint"]["arch"] == "resnet20"
    assert doc["checkpoint"]["arch_source"] == "inferred"
    assert "3 basic blocks" in doc["checkpoint"]["arch_reason"]
    assert doc["checkpoint"]["parameters"] == 269722


@needs_shared
def test_inspect_real_resnet4b_user_model(resnet4b_file: Path, capsys) -> None:
    ckpt = CHECKPOINTS / "cifar10-resnet4b-nobn-abcrown.pth"
    code, _, err = run_cli(["inspect", ckpt], capsys)
    assert code == 2 and "cannot infer the architecture" in err and "--arch" in err
    doc = run_json(["inspect", ckpt, "--arch", f"{resnet4b_file}:resnet4b"], capsys)
    assert [b["shortcut"] for b in doc["blocks"]] == ["projection", "identity", "projection", "identity"]
    code, _, err = run_cli(["inspect", ckpt, "--arch", f"{resnet4b_file}:resnet4b", "--input-size", "64"], capsys)
    assert code == 2 and "cannot take input size 64x64" in err
