"""Numbers that are not numbers: singular blocks as infinite kappas, NaN in compared reports, eps below rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIXTURES, run_cli, run_json

CKPT = FIXTURES / "resnet8-digits.safetensors"
DIGITS = FIXTURES / "digits"

needs_fixtures = pytest.mark.skipif(not CKPT.exists(), reason="fixtures not built (python fixtures/build.py)")


# ---------------------------------------------------------------- --eps below the dtype's resolution


@needs_fixtures
@pytest.mark.parametrize("command", ["stability", "audit"])
@pytest.mark.parametrize("eps", ["1e-12", "9e-6"])
def test_eps_below_float32_resolution_is_refused_naming_the_floor(command: str, eps: str, tmp_path: Path,
                                                                    capsys) -> None:
    target = tmp_path / "report.json"
    code, out, err = run_cli([command, CKPT, "--data", DIGITS, "--eps", eps, "-o", target], capsys)
    assert code == 2 and out == "" and not target.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "--eps must be at least 1e-05 with float32 products (use --dtype float64 for smaller)" in lines[0]


@needs_fixtures
def test_float64_measures_small_eps() -> None:
    from auditor.errors import UsageError
    from auditor.subject import open_subject
    from auditor.tasks.images import open_images
    from auditor.tasks.stability import subject_stability

    subject = open_subject(CKPT)
    images = open_images(DIGITS, subject, per_class=2)
    small = subject_stability(subject, images, eps=1e-12, directions=2, samples=4, power_iterations=0,
                              dtype="float64").report.to_dict()
    usual = subject_stability(subject, images, eps=1e-3, directions=2, samples=4, power_iterations=0,
                              dtype="float64").report.to_dict()
    assert small["dtype"] == "float64"
    for a, b in zip(small["blocks"], usual["blocks"]):  # a tiny perturbation sees the linearization: close to eps=1e-3
        assert a["r_median"] > 0 and a["r_median"] == pytest.approx(b["r_median"], rel=0.05)
    assert small["trajectory"]["logits"]["median"] > 0
    with pytest.raises(UsageError, match="at least 1e-13 with float64"):
        subject_stability(subject, images, eps=1e-14, directions=2, samples=4, dtype="float64")


@needs_fixtures
def test_stability_cli_dtype_option(capsys) -> None:
    doc = run_json(["stability", CKPT, "--data", DIGITS, "--per-class", "2", "--samples", "4", "--directions", "2",
                    "--power-iterations", "0", "--eps", "1e-8", "--dtype", "float64", "--no-progress"], capsys)
    assert doc["stability"]["dtype"] == "float64" and doc["stability"]["eps"] == 1e-8
    assert all(b["r_median"] > 0 for b in doc["stability"]["blocks"])


# ---------------------------------------------------------------- compare of a report holding NaN


@needs_fixtures
@pytest.mark.parametrize("literal, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")])
def test_compare_refuses_a_report_holding_nan_naming_the_key(literal: str, shown: str, tmp_path: Path,
                                                              capsys) -> None:
    good = tmp_path / "good.json"
    code, _, err = run_cli(["condition", CKPT, "--format", "json", "-o", good, "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(good.read_text())
    doc["blocks"][1]["kappa_linear_residual"] = float(literal.replace("Infinity", "inf"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))  # Python writes the non-JSON literal NaN / Infinity
    assert literal in bad.read_text()
    for args in ([good, bad], [bad, good]):
        code, out, err = run_cli(["compare", *args], capsys)
        assert code == 2 and out == "", err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0], err
        assert f"blocks/1/kappa_linear_residual is {shown}" in lines[0]
