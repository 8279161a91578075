"""The command line starts without the numeric stack (issue 12).

``resdyn --help``, usage errors and shell completion (which runs the program at
every Tab) must not pay for torch, torchvision or the numpy-based libraries;
torch comes with the first command that needs it, torchvision never (its
ResNets are rebuilt in auditor.models.resnet_layout; see test_resnet_layout.py). Each case runs in a fresh interpreter, since this
test process has long imported torch. No wall-clock assertions: see
bench/bench_startup.py for the timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT

# pydantic: typer 0.29 imports it to coerce every option value (+50 ms a call, why
# pyproject caps typer below 0.29); typer.rich_utils / rich.markdown: typer's rich help
# (+60 ms), off with rich_markup_mode=None.
HEAVY = ("torch", "torchvision", "numpy", "scipy", "h5py", "matplotlib", "jsonschema", "safetensors",
         "pydantic", "typer.rich_utils", "rich.markdown")

# Runs the CLI in-process (auditor.cli.run, as the console entry does) and reports,
# as the last line of stdout, its exit code and which heavy modules it imported.
_CHILD = f"""
import json, sys
code = None
try:
    from auditor.cli import run
    code = run(sys.argv[1:])
except SystemExit as exc:  # shell completion exits from inside typer
    code = exc.code
finally:
    heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
    print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def _child(args: list[str], **env: str) -> tuple[int, list[str], str, str]:
    """(exit code, heavy modules imported, stdout before the report line, stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, **env}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    *lines, last = result.stdout.rstrip("\n").splitlines()
    report = json.loads(last)
    return report["code"], report["heavy"], "\n".join(lines), result.stderr


def test_importing_the_cli_imports_neither_torch_nor_torchvision() -> None:
    code = "import auditor.cli, json, sys; print(json.dumps(sorted(m for m in %r if m in sys.modules)))" % (HEAVY,)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    heavy = json.loads(result.stdout)
    assert "torch" not in heavy and "torchvision" not in heavy
    assert heavy == [], f"'import auditor.cli' imported {heavy}; import them inside the command bodies"


@pytest.mark.parametrize("args", [["--help"], ["audit", "--help"], ["condition", "--help"], ["--version"]])
def test_help_needs_no_heavy_import(args: list[str]) -> None:
    code, heavy, out, err = _child(args)
    assert code == 0, err
    assert "Usage" in out or out.startswith("resdyn ")
    assert heavy == [], f"resdyn {' '.join(args)} imported {heavy}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit", "missing.safetensors"], "does not exist"),
        (["audit", str(FIXTURES / "resnet8-digits.safetensors"), "--fail-on", "garbage"], "malformed rule 'garbage'"),
        (["audit", "--bogus"], "No such option: --bogus"),
        (["inspect", str(FIXTURES / "resnet8-digits.safetensors"), "--input-size", "0"], "input size '0'"),
        (["audit", str(FIXTURES / "resnet8-digits.safetensors"), "--mean", "1,2"], "--mean '1,2'"),
        (["condition", str(FIXTURES / "resnet8-digits.safetensors"), "--boundary", "zero", "--save-spectra", "s.h5"],
         "--save-spectra needs --boundary circular"),
        # value errors that need no torch (#24): refused as fast as usage errors
        (["audit", str(FIXTURES / "resnet8-digits.safetensors"), "--eps", "2"], "--eps': 2 is outside (0, 1)"),
        (["stability", str(FIXTURES / "resnet8-digits.safetensors"), "--data", str(FIXTURES / "digits"), "--eps", "0"],
         "0 is outside (0, 1)"),
        (["audit", str(FIXTURES / "resnet8-digits.safetensors"), "--data", "no-such-source"],
         "no data source has that name"),
        (["stability", str(FIXTURES / "resnet8-digits.safetensors"), "--data", "no-such-source"],
         "no data source has that name"),
        (["audit", str(FIXTURES / "resnet8-digits.safetensors"), "--step-summary"], "GITHUB_STEP_SUMMARY is not set"),
        (["stability", str(FIXTURES / "resnet8-digits.safetensors"), "--data", str(FIXTURES / "digits"), "--eps",
          "1e-7"], "eps must be at least 1e-05 with float32"),
    ],
)
def test_usage_errors_come_before_any_heavy_import(args: list[str], message: str) -> None:
    code, heavy, _, err = _child(args, GITHUB_STEP_SUMMARY="")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resdyn: error:") and message in lines[0], err
    assert heavy == [], f"resdyn {' '.join(args)} imported {heavy} before reporting the usage error"


def test_completion_needs_no_heavy_import() -> None:
    code, heavy, out, err = _child([], _RESDYN_COMPLETE="complete_bash", COMP_WORDS="resdyn au", COMP_CWORD="1")
    assert code == 0, err
    assert out.split() == ["audit"]
    assert heavy == []


def test_a_cifar_checkpoint_needs_no_torchvision() -> None:
    code, heavy, out, err = _child(["inspect", str(FIXTURES / "resnet8-digits.safetensors"), "--format", "json"])
    assert code == 0, err
    assert json.loads(out)["checkpoint"]["family"] == "cifar"
    assert "torch" in heavy and "torchvision" not in heavy
