"""Numbers that are not numbers: singular blocks as infinite kappas, NaN in compared reports, eps below rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auditor.report.verdict import parse_rule
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
    assert f"eps {float(eps):g} is below what float32 products resolve" in lines[0]
    assert "eps must be at least 1e-05 with float32 products Hint: use --dtype float64 for smaller" in lines[0]


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


# ---------------------------------------------------------------- singular blocks: kappa +inf


def _resnet4b(source: Path, singular: tuple[str, ...] = ()):
    """Our ResNet-4B (conftest) with seeded weights; in each block of ``singular`` (identity shortcut, 32
    channels) conv1 is the identity and conv2 minus the identity but one channel, so W2 W1 + I = e e^T."""
    import torch

    namespace: dict = {}
    exec(source.read_text(), namespace)
    torch.manual_seed(0)
    model = namespace["resnet4b"]()
    with torch.no_grad():
        for name in singular:
            block = model.get_submodule(name)
            eye = torch.eye(32)
            for conv, center in ((block.conv1, eye), (block.conv2, -eye + torch.diag(torch.eye(32)[0]))):
                conv.weight.zero_()
                conv.weight[:, :, 1, 1] = center
                conv.bias.zero_()
    return model


@pytest.fixture
def singular_net(resnet4b_file: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """(checkpoint whose block layer1.1 is singular, the CLI arguments naming its architecture)."""
    from conftest import save_safetensors

    path = save_safetensors(_resnet4b(resnet4b_file, ("layer1.1",)), tmp_path / "singular.safetensors")
    return path, ["--arch", f"{resnet4b_file}:resnet4b", "--input-size", "32", "--no-progress"]


@pytest.fixture
def regular_net(resnet4b_file: Path, tmp_path: Path) -> Path:
    from conftest import save_safetensors

    return save_safetensors(_resnet4b(resnet4b_file), tmp_path / "regular.safetensors")


def test_a_singular_block_is_infinite_in_the_json(singular_net, capsys) -> None:
    path, args = singular_net
    doc = run_json(["condition", path, *args], capsys)
    blocks = {b["name"]: b for b in doc["blocks"]}
    singular = blocks["layer1.1"]
    assert singular["kappa_linear_residual"] is None and "singular" in singular["kappa_linear_residual_reason"]
    # conv2 is singular too: its plain branch and the paper's prod M / prod m are infinite; (M + 1) / (m + 1) is not
    assert singular["infinite"] == {"kappa_linear_residual": "inf", "kappa_linear_plain": "inf",
                                    "kappa_paper_plain": "inf"}
    assert singular["kappa_paper_residual"] == pytest.approx(2.0)
    assert all("infinite" not in b for name, b in blocks.items() if name != "layer1.1")
    s = doc["summary"]
    assert s["singular_blocks"] == 1 and s["singular_block_names"] == ["layer1.1"] and s["undefined_blocks"] == {}
    assert s["max_kappa_linear_residual"] is None and s["infinite"]["max_kappa_linear_residual"] == "inf"
    assert "1 of 4 blocks singular (layer1.1)" in s["max_kappa_linear_residual_reason"]
    assert s["worst_block"] == "layer1.1"
    # the median sorts +inf last: of (k, k, k, inf) the mean of the two middle finite values
    finite = sorted(b["kappa_linear_residual"] for name, b in blocks.items() if name != "layer1.1")
    assert s["median_kappa_linear_residual"] == pytest.approx((finite[1] + finite[2]) / 2)
    assert "median_kappa_linear_residual" not in s["infinite"]
    assert "Infinity" not in json.dumps(doc, allow_nan=False)  # strict JSON (raises on inf / NaN)


def test_a_singular_block_in_the_table_and_markdown(singular_net, capsys) -> None:
    path, args = singular_net
    code, out, err = run_cli(["condition", path, *args, "--format", "table"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "exact kappa max inf (layer1.1)" in flat
    assert "1 of 4 blocks singular (kappa infinite): layer1.1" in flat
    assert "exact kappa max 1 " not in flat
    row = next(line for line in out.splitlines() if "layer1.1" in line and "identity" in line)
    assert " inf " in row
    code, out, err = run_cli(["condition", path, *args, "--format", "markdown"], capsys)
    assert code == 0, err
    assert "exact kappa max inf (layer1.1)" in out and "1 of 4 blocks singular (kappa infinite): layer1.1" in out
    assert any(line.startswith("| **layer1.1** |") and "| inf |" in line for line in out.splitlines())


@pytest.mark.parametrize(
    "rule, code, passed",
    [
        ("max_kappa_linear_residual>1e4", 1, False),
        ("max_kappa_linear_residual<1e4", 0, True),
        ("max_kappa_linear_residual>=inf", 1, False),
        ("max_kappa_linear_residual<inf", 0, True),
    ],
)
def test_rules_compare_a_singular_block_as_infinite(rule: str, code: int, passed: bool, singular_net,
                                                    capsys) -> None:
    path, args = singular_net
    got, out, err = run_cli(["audit", path, *args, "--format", "json", "--fail-on", rule], capsys)
    assert got == code, err
    result = json.loads(out)["verdict"]["rules"][0]
    assert result["passed"] is passed and result["value"] is None and result["infinite"] == {"value": "inf"}
    assert "layer1.1" in result["reason"]
    got, out, err = run_cli(["audit", path, *args, "--fail-on", rule], capsys)
    assert got == code and f"{parse_rule(rule)}  (measured inf (infinite: 1 of 4 blocks singular (layer1.1)))" in out


def test_compare_shows_inf(singular_net, regular_net: Path, tmp_path: Path, capsys) -> None:
    path, args = singular_net
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli(["condition", regular_net, *args, "--format", "json", "-o", a], capsys)[0] == 0
    assert run_cli(["condition", path, *args, "--format", "json", "-o", b], capsys)[0] == 0
    doc = run_json(["compare", a, b], capsys)
    metrics = {m["metric"]: m for m in doc["comparison"]["metrics"]}
    worst = metrics["max_kappa_linear_residual"]
    assert worst["a"] > 1 and worst["b"] is None and worst["change"] is None
    assert worst["infinite"] == {"b": "inf", "change": "inf"} and "layer1.1" in worst["b_reason"]
    block = next(x for x in doc["comparison"]["blocks"] if x["name"] == "layer1.1")
    assert block["a"] > 0 and block["b"] is None and block["infinite"] == {"b": "inf"}
    code, out, err = run_cli(["compare", a, b], capsys)
    assert code == 0, err
    cells = {line.split()[1]: [c for c in line.split() if c != "│"] for line in out.splitlines() if line.startswith("│")}
    assert cells["max_kappa_linear_residual"][2:] == ["inf", "+inf"]
    assert cells["layer1.1"][2] == "inf"
    code, out, _ = run_cli(["compare", a, b, "--format", "markdown"], capsys)
    assert "| inf | +inf |" in out
    # rules on the change: a block that became singular got infinitely worse; the way back is -inf
    assert run_cli(["compare", a, b, "--fail-on", "max_kappa_linear_residual>0"], capsys)[0] == 1
    assert run_cli(["compare", b, a, "--fail-on", "max_kappa_linear_residual>0"], capsys)[0] == 0
    back = run_json(["compare", b, a], capsys)
    assert {m["metric"]: m for m in back["comparison"]["metrics"]}["max_kappa_linear_residual"]["infinite"] == {
        "a": "inf", "change": "-inf"}
    # singular on both sides: the change is undefined and a rule on it fails with the reason
    code, out, _ = run_cli(["compare", b, b, "--format", "json", "--fail-on", "max_kappa_linear_residual>0"], capsys)
    rule = json.loads(out)["verdict"]["rules"][0]
    assert code == 1 and rule["value"] is None and "infinite in both" in rule["reason"]


def test_median_is_infinite_when_half_the_blocks_are_singular(resnet4b_file: Path, tmp_path: Path, capsys) -> None:
    from conftest import save_safetensors

    path = save_safetensors(_resnet4b(resnet4b_file, ("layer1.1", "layer2.1")), tmp_path / "two.safetensors")
    args = ["--arch", f"{resnet4b_file}:resnet4b", "--input-size", "32", "--no-progress"]
    s = run_json(["condition", path, *args], capsys)["summary"]
    assert s["singular_block_names"] == ["layer1.1", "layer2.1"]
    assert s["median_kappa_linear_residual"] is None  # (k, k, inf, inf): the middle pair holds an inf
    assert s["infinite"]["median_kappa_linear_residual"] == "inf"
    code, out, _ = run_cli(["audit", path, *args, "--fail-on", "median_kappa_linear_residual>1e4"], capsys)
    assert code == 1 and "2 of 4 blocks singular (layer1.1, layer2.1)" in out


def _report(resnet4b_file: Path, checkpoint: Path):
    from auditor.subject import open_subject
    from auditor.tasks.condition import condition

    return condition(open_subject(checkpoint, arch=f"{resnet4b_file}:resnet4b", input_size=(32, 32)))


def _unconverged(block):
    """``block`` as if its residual operator's extremes had not converged."""
    from dataclasses import replace

    why = "the residual operator's extreme singular values did not converge (lanczos)"
    return replace(block, kappa_linear_residual=None, reasons={**block.reasons, "kappa_linear_residual": why})


def test_a_block_whose_extremes_did_not_converge_has_its_reason_never_a_number(resnet4b_file: Path,
                                                                               regular_net: Path) -> None:
    from dataclasses import replace

    from auditor.report.condition_view import summary_text
    from auditor.report.document import validate
    from auditor.report.verdict import evaluate

    report = _report(resnet4b_file, regular_net)
    report = replace(report, blocks=(report.blocks[0], _unconverged(report.blocks[1]), *report.blocks[2:]))
    doc = report.to_document()
    validate(doc)
    s = doc["summary"]
    assert s["max_kappa_linear_residual"] is None and "infinite" not in s
    assert s["max_kappa_linear_residual_reason"].startswith("undefined: layer1.1: the residual operator's")
    assert s["median_kappa_linear_residual"] is None and "did not converge" in s["median_kappa_linear_residual_reason"]
    assert s["singular_blocks"] == 0 and s["undefined_blocks"] == {"layer1.1": _unconverged(report.blocks[1]).reasons[
        "kappa_linear_residual"]}
    assert s["worst_block"] is None
    line = summary_text(doc).plain
    assert "exact kappa max undefined (-), median undefined" in line
    assert "1 block(s) without a kappa: layer1.1 (layer1.1: the residual operator's extreme" in line
    for rule in ("max_kappa_linear_residual>1e4", "max_kappa_linear_residual<1e4"):
        result = evaluate([parse_rule(rule)], doc)["rules"][0]
        assert result["passed"] is False and result["value"] is None and "did not converge" in result["reason"]
        assert "infinite" not in result


def test_a_singular_block_decides_the_maximum_over_an_unconverged_one(resnet4b_file: Path, singular_net) -> None:
    from dataclasses import replace

    from auditor.report.verdict import evaluate

    report = _report(resnet4b_file, singular_net[0])  # layer1.1 singular
    report = replace(report, blocks=(_unconverged(report.blocks[0]), *report.blocks[1:]))
    doc = report.to_document()
    s = doc["summary"]
    assert s["infinite"]["max_kappa_linear_residual"] == "inf" and s["worst_block"] == "layer1.1"
    assert s["median_kappa_linear_residual"] is None and "layer1.0" in s["median_kappa_linear_residual_reason"]
    assert evaluate([parse_rule("max_kappa_linear_residual>1e4")], doc)["passed"] is False
    assert evaluate([parse_rule("max_kappa_linear_residual<1e4")], doc)["passed"] is True


@pytest.mark.parametrize(
    "values, how, expected",
    [
        ([1.0, 2.0, "inf"], max, "inf"),
        ([1.0, 2.0, "inf"], "median", 2.0),
        ([1.0, 2.0, 3.0, "inf"], "median", 2.5),
        ([1.0, "inf", "inf"], "median", "inf"),
        ([1.0, 2.0, None], max, None),
        ([1.0, "inf", None], max, "inf"),
        ([1.0, "inf", None], "median", None),
        ([1.0, 4.0], min, 1.0),
    ],
)
def test_aggregates_over_infinite_and_unknown_values(values, how, expected) -> None:
    import math
    import statistics

    from auditor.report.nonfinite import aggregate

    entries = []
    for i, v in enumerate(values):
        entry = {"name": f"b{i}", "k": v if isinstance(v, float) else None}
        if v == "inf":
            entry.update(infinite={"k": "inf"}, k_reason="singular")
        elif v is None:
            entry["k_reason"] = "did not converge"
        entries.append(entry)
    got = aggregate(entries, "k", statistics.median if how == "median" else how)
    if expected is None:
        assert got.value is None and "did not converge" in got.reason
    elif expected == "inf":
        assert got.value == math.inf and "singular" in got.reason
    else:
        assert got.value == expected and got.reason is None


def test_a_zero_block_with_a_zero_projection_is_infinite(resnet4b_file: Path, tmp_path: Path, capsys) -> None:
    """Zero convolutions and a zero projection: the residual operator is zero, every kappa of it infinite."""
    import torch

    from conftest import save_safetensors

    model = _resnet4b(resnet4b_file)
    with torch.no_grad():
        block = model.layer1[0]
        for conv in (block.conv1, block.conv2, block.shortcut[0]):
            conv.weight.zero_()
    path = save_safetensors(model, tmp_path / "zero.safetensors")
    args = ["--arch", f"{resnet4b_file}:resnet4b", "--input-size", "32", "--no-progress"]
    doc = run_json(["condition", path, *args], capsys)
    zero = doc["blocks"][0]
    assert zero["name"] == "layer1.0" and zero["kappa_linear_residual"] is None
    assert zero["infinite"]["kappa_linear_residual"] == "inf" and zero["infinite"]["kappa_paper_residual"] == "inf"
    assert doc["summary"]["singular_block_names"] == ["layer1.0"]
    assert doc["summary"]["infinite"]["max_kappa_paper_residual"] == "inf"
