"""Checkpoint formats, unwrapping, hashing and every refusal."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from auditor.errors import CheckpointError
from auditor.io.checkpoint import read_checkpoint
from auditor.models.load import load_checkpoint
from auditor.models.registry import build_model

from conftest import CHECKPOINTS, needs_shared, save_safetensors


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = build_model("resnet8", 10)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".th", ".bin"])
@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_torch_formats_and_wrappers(tmp_path: Path, state, suffix: str, wrap: str) -> None:
    payload: object = state
    if wrap == "state_dict":
        payload = {"state_dict": state, "epoch": 3, "best_prec1": 91.5}
    elif wrap == "model":
        payload = {"model": state, "optimizer_name": "sgd"}
    elif wrap == "dataparallel":
        payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / f"ckpt{suffix}"
    torch.save(payload, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "torch"
    assert set(checkpoint.state_dict) == set(state)
    for key, tensor in state.items():
        assert torch.equal(checkpoint.state_dict[key], tensor)
    assert checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if wrap == "state_dict":
        assert checkpoint.metadata["epoch"] == "3"
    if wrap == "dataparallel":
        assert any("module." in note for note in checkpoint.notes)


def test_safetensors_metadata(tmp_path: Path) -> None:
    model, _ = build_model("resnet8", 10)
    path = save_safetensors(model, tmp_path / "m.safetensors", arch="resnet8", epoch="4")
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "safetensors"
    assert checkpoint.metadata == {"arch": "resnet8", "epoch": "4"}
    assert len(checkpoint.state_dict) == len(model.state_dict())


def test_unknown_suffix_is_sniffed(tmp_path: Path, state) -> None:
    path = tmp_path / "weights.model"
    torch.save(state, path)
    assert load_checkpoint(path).format == "torch"


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a regular file"):  # the reader reads files only
        read_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a network\n")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(path)
    fake = tmp_path / "fake.pth"
    fake.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(fake)


def test_truncated_and_corrupted_safetensors(tmp_path: Path) -> None:
    model, _ = build_model("resnet8", 10)
    good = save_safetensors(model, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(truncated)
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(data[:8] + b"#" * 40 + data[48:])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(corrupted)


def test_truncated_torch_zip(tmp_path: Path, state) -> None:
    path = tmp_path / "full.pt"
    torch.save(state, path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(cut)


class _Payload:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_malicious_pickle_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"w": _Payload(marker)}}, handle)
    # Sanity: a plain unpickle would run it (proves the test can fail).
    probe = tmp_path / "probe-ran"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # The same through torch.save's zip format.
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {"w": _Payload(marker)}}, zipped)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(zipped)
    assert not marker.exists()


def test_non_finite_weights_refused(tmp_path: Path, state) -> None:
    broken = dict(state)
    broken["conv1.weight"] = broken["conv1.weight"].clone()
    broken["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="conv1.weight.*NaN"):
        load_checkpoint(path)


def test_no_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(path)


@needs_shared
@pytest.mark.parametrize(
    "name, count",
    [
        ("cifar10-resnet20-akamaster.th", 97),
        ("cifar10-resnet20-akamaster.safetensors", 97),
        ("cifar10-resnet56-akamaster.th", 277),
        ("cifar10-resnet4b-nobn-abcrown.pth", 26),
    ],
)
def test_real_checkpoints_load(name: str, count: int) -> None:
    checkpoint = load_checkpoint(CHECKPOINTS / name)
    assert len(checkpoint.state_dict) == count
    assert not any(k.startswith("module.") for k in checkpoint.state_dict)


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_weights_are_reported_as_converted(dtype, name, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from conftest import FIXTURES, run_cli

    source = FIXTURES / "resnet8-digits.safetensors"
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(source)).items()}
    half = tmp_path / "half.safetensors"
    save_file(state, str(half), metadata={"arch": "resnet8", "num_classes": "10"})
    assert load_checkpoint(half).converted_from == name
    assert load_checkpoint(source).converted_from is None
    code, out, err = run_cli(["inspect", half, "--format", "json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    from auditor.report.document import validate

    validate(doc)
    assert doc["checkpoint"]["converted_from"] == name
    assert any(f"stored as {name}" in note for note in doc["checkpoint"]["notes"])
    assert f"weights stored as {name} were converted to float32" in err
    for fmt in ("table", "markdown"):
        code, out, err = run_cli(["inspect", half, "--format", fmt], capsys)
        assert code == 0 and f"stored as {name}, analysed as float32" in out and "converted to float32" in err


# --------------------------------------------------------------------------- #26: say what a refused file is


def test_refusals_say_what_the_file_is(tmp_path: Path) -> None:
    from auditor.io.checkpoint import read_checkpoint

    gguf = tmp_path / "model.bin"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(CheckpointError, match=r"not a readable torch checkpoint \(a GGUF file .llama.cpp., neither"):
        read_checkpoint(gguf)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes([0x0A, 0x86, 0xB2, 0xAD]) + bytes(range(60)))
    with pytest.raises(CheckpointError, match=r"unknown format \(first bytes 0a 86 b2 ad 00 01 02 03\)") as info:
        read_checkpoint(noise)
    assert "pickle wants to run code" not in str(info.value)


def test_negative_variances_and_quantized_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from auditor.io.checkpoint import read_checkpoint

    bad = tmp_path / "bad.safetensors"
    save_file({"bn.weight": torch.ones(4), "bn.running_var": torch.tensor([1.0, -0.5, 2.0, -1.0])}, str(bad))
    with pytest.raises(CheckpointError, match="'bn.running_var' holds negative variances .2 of 4."):
        read_checkpoint(bad)
    quantized = tmp_path / "q.safetensors"
    save_file({"conv.weight": torch.ones(2, 2, dtype=torch.int8), "bn.num_batches_tracked": torch.tensor(3),
               "fc.weight": torch.ones(2, 2, dtype=torch.float16)}, str(quantized))
    assert read_checkpoint(quantized).converted_from == (
        "float16, int8 (quantized: raw integers, scales not applied)")
