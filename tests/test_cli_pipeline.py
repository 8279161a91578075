"""End-to-end CLI runs on the bundled example: audit, extract, angles, trajectory, stability, compare."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from auditor.report.document import validate
from conftest import FIXTURES, run_cli, run_json

CKPT = FIXTURES / "resnet8-digits.safetensors"
DIGITS = FIXTURES / "digits"
EPOCHS = FIXTURES / "checkpoints"
SMALL = ["--per-class", "4", "--samples", "6", "--directions", "2", "--power-iterations", "2"]

pytestmark = pytest.mark.skipif(not CKPT.exists(), reason="fixtures not built (python fixtures/build.py)")


@pytest.fixture(scope="module")
def audit_doc(tmp_path_factory) -> dict:
    from auditor.cli import run

    out = tmp_path_factory.mktemp("audit") / "audit.json"
    code = run(["audit", str(CKPT), "--data", str(DIGITS), *SMALL, "--format", "json", "-o", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_audit_json_has_every_section(audit_doc: dict) -> None:
    from auditor.report.document import validate

    validate(audit_doc)
    assert audit_doc["checkpoint"]["arch"] == "resnet8"
    assert audit_doc["data"]["samples_per_class"] == {str(d): 4 for d in range(10)}
    assert [b["name"] for b in audit_doc["blocks"]] == ["layer1.0", "layer2.0", "layer3.0"]
    assert [s["name"] for s in audit_doc["stages"]] == ["stem", "layer1", "layer2", "layer3", "penultimate"]
    assert len(audit_doc["stability"]["blocks"]) == 3
    assert audit_doc["verdict"] == {"passed": True, "rules": [], "note": "no rules given",
                                    "findings": audit_doc["verdict"]["findings"]}
    assert audit_doc["verdict"]["findings"].startswith("3 of 3 residual blocks violate Lemma 1's lower bound; ")
    for block in audit_doc["blocks"]:
        assert block["kappa_paper_residual"] <= block["kappa_paper_plain"]


@pytest.mark.slow
def test_audit_angles_match_a_direct_pairwise_loop(audit_doc: dict, tmp_path: Path, capsys) -> None:
    """Extract the same images, then recompute one stage's medians with a Python loop."""
    from auditor.io.store import open_store

    store = tmp_path / "acts.h5"
    code, _, err = run_cli(["extract", CKPT, "--data", DIGITS, "--per-class", "4", "-o", store, "--no-progress"], capsys)
    assert code == 0, err
    with open_store(store) as acts:
        x = np.asarray(acts.stage("layer2")[:], dtype=np.float64).reshape(len(acts), -1)
        labels, classes = acts.labels, acts.classes
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)

    def angle(i: int, j: int) -> float:
        return float(np.degrees(np.arccos(np.clip(unit[i] @ unit[j], -1, 1))))

    stage = next(s for s in audit_doc["stages"] if s["name"] == "layer2")
    for c, name in enumerate(classes[:3]):
        rows = np.flatnonzero(labels == c)
        expected = np.median([angle(i, j) for i, j in itertools.combinations(rows, 2)])
        assert stage["intra"][name] == pytest.approx(expected, abs=1e-6)
    a, b = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    expected = np.median([angle(i, j) for i in a for j in b])
    assert stage["inter"][f"{classes[0]}|{classes[1]}"] == pytest.approx(expected, abs=1e-6)
    # The angles command on the stored activations gives the same numbers.
    doc = run_json(["angles", store, "--stages", "layer2"], capsys)
    assert doc["stages"][0]["intra"] == pytest.approx(stage["intra"])


@pytest.mark.slow
def test_audit_is_reproducible(audit_doc: dict, tmp_path: Path, capsys) -> None:
    again = run_json(["audit", CKPT, "--data", DIGITS, *SMALL], capsys)
    assert again == audit_doc


def test_fail_on_rules_set_the_exit_code(tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["audit", CKPT, "--format", "json", "--fail-on", "max_kappa_linear_residual>1",
                              "--fail-on", "lemma1_upper_violations>0"], capsys)
    assert code == 1, err
    verdict = json.loads(out)["verdict"]
    assert verdict["passed"] is False
    assert [r["passed"] for r in verdict["rules"]] == [False, True]
    assert json.loads(out)["notes"][0].startswith("no --data")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fail-on", "kappa>3"], "unknown metric 'kappa'"),
        (["--fail-on", "max_sigma>>3"], "malformed rule"),
        (["--fail-on", "min_separation_deg<5"], "needs measurements on images"),
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{empty}"], "no class folders"),
        (["--data", str(DIGITS), "--classes", "7,x"], "'x'"),
        (["--data", str(DIGITS), "--per-class", "1000"], "1000"),
        (["--data", str(DIGITS), "--eps", "0"], "eps"),
        (["--data", str(DIGITS), "--mean", "1,2"], "--mean '1,2' is not three numbers"),
    ],
)
def test_audit_bad_input_is_one_line_exit_2(args, message, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(missing=tmp_path / "nope", empty=empty) for a in args]
    target = tmp_path / "report.json"
    code, out, err = run_cli(["audit", CKPT, *args, "-o", target], capsys)
    assert code == 2, err
    assert out == "" and not target.exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


@pytest.mark.slow
def test_markdown_and_plots(tmp_path: Path, capsys, monkeypatch) -> None:
    plots = tmp_path / "plots"
    summary, junit = tmp_path / "summary.md", tmp_path / "junit.xml"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, err = run_cli(["audit", CKPT, "--data", DIGITS, *SMALL, "--format", "markdown", "--plots", plots,
                              "--junit", junit, "--step-summary"], capsys)
    assert code == 0, err
    assert out.startswith("## resdyn audit: no rules given\n\n**Findings**: 3 of 3 residual blocks violate")
    assert summary.read_text() == out  # the job summary is the Markdown report
    assert 'name="no rules given"' in junit.read_text() and f"wrote {junit}" in err
    assert "### Class geometry" in out and "| block |" in out
    for name in ("conditioning.png", "angles.png", "error-trajectory.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_table_output_mentions_lemma1(capsys) -> None:
    code, out, _ = run_cli(["audit", CKPT], capsys)
    assert code == 0
    assert "violate Lemma 1's lower bound" in out and "layer2.0" in out


@pytest.mark.slow
def test_compare_bn_and_nobn(tmp_path: Path, capsys) -> None:
    bn = EPOCHS / "resnet8" / sorted(p.name for p in (EPOCHS / "resnet8").iterdir())[-1]
    nobn = EPOCHS / "resnet8_nobn" / sorted(p.name for p in (EPOCHS / "resnet8_nobn").iterdir())[-1]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run_cli(["condition", bn, "--format", "json", "-o", a], capsys)[0] == 0
    assert run_cli(["condition", nobn, "--format", "json", "-o", b], capsys)[0] == 0
    doc = run_json(["compare", a, b], capsys)
    metrics = {m["metric"]: m for m in doc["comparison"]["metrics"]}
    ka = json.loads(a.read_text())["summary"]["max_kappa_linear_residual"]
    assert metrics["max_kappa_linear_residual"]["a"] == pytest.approx(ka)
    change = metrics["max_kappa_linear_residual"]["change"]
    code, out, _ = run_cli(["compare", a, b, "--format", "json", "--fail-on",
                            f"max_kappa_linear_residual>{'-' if change > 0 else ''}1e9"], capsys)
    assert code == (1 if change > 0 else 0)
    code, _, err = run_cli(["compare", a, CKPT], capsys)
    assert code == 2 and "not a JSON document" in err


@pytest.mark.slow
def test_trajectory_orders_by_epoch_and_reuses_stores(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    plot = tmp_path / "traj.png"
    args = ["trajectory", EPOCHS / "resnet8", "--data", DIGITS, "--per-class", "3", "--stages", "stem,layer3",
            "--cache", cache]
    doc = run_json([*args, "--plot", plot], capsys)
    assert [run["name"] for run in doc["series"]] == ["resnet8"]
    points = doc["series"][0]["checkpoints"]
    epochs = [p["epoch"] for p in points]
    assert epochs == sorted(epochs) and len(epochs) >= 6
    assert all(not p["reused_store"] for p in points)
    assert [s["name"] for s in points[0]["stages"]] == ["stem", "layer3"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    again = run_json(args, capsys)["series"][0]["checkpoints"]
    assert all(p["reused_store"] for p in again)
    assert [p["stages"] for p in again] == [p["stages"] for p in points]


def test_angles_refuses_files_that_are_not_stores(tmp_path: Path, capsys) -> None:
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"not hdf5 at all")
    code, out, err = run_cli(["angles", fake], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_stability_command_json_and_plot(tmp_path: Path, capsys) -> None:
    plot = tmp_path / "error.png"
    code, out, warning = run_cli(["stability", CKPT, "--data", DIGITS, "--samples", "4", "--directions", "2",
                                  "--power-iterations", "2", "--plot", plot, "--preset", "none", "--format", "json"],
                                 capsys)
    assert code == 0, warning
    doc = json.loads(out)
    validate(doc)
    # the preset drops the checkpoint's own normalization: one warning names both
    assert warning.count("warning:") == 1 and "preset none (option) replaces the normalization" in warning
    assert "resnet8-digits.safetensors was trained with (mean [0.3058, 0.3058, 0.3058]" in warning
    blocks = doc["stability"]["blocks"]
    assert [b["name"] for b in blocks] == ["layer1.0", "layer2.0", "layer3.0"]
    for block in blocks:
        assert block["r_min"] <= block["r_median"] <= block["r_max"]
        assert 0 <= block["share_in_paper_bounds"] <= 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(["stability", CKPT, "--data", DIGITS, "--eps", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_condition_save_spectra_and_zero_boundary(tmp_path: Path, capsys) -> None:
    import h5py

    from auditor.analysis.spectra import conv_singular_values
    from auditor.tasks.condition import block_operators
    from auditor.subject import open_subject

    target = tmp_path / "spectra.h5"
    doc = run_json(["condition", CKPT, "--save-spectra", target], capsys)
    subject = open_subject(CKPT)
    modules = dict(subject.loaded.model.named_modules())
    block = next(b for b in subject.anatomy.blocks if b.name == "layer2.0")
    convs, _ = block_operators(modules, block)
    assert convs[0].name == "layer2.0.conv1" and block.convs[0].bn == "layer2.0.bn1"
    expected = conv_singular_values(convs[0])
    with h5py.File(target) as h5:
        assert h5.attrs["format"] == "resdyn-spectra"
        stored = h5["layers/layer2.0.conv1"][()]
    np.testing.assert_allclose(stored, expected, rtol=1e-12)
    entry = next(x for x in doc["layers"] if x["name"] == "layer2.0.conv1")
    assert entry["sigma_max"] == pytest.approx(expected[0]) and entry["sigma_min"] == pytest.approx(expected[-1])
    code, _, err = run_cli(["condition", CKPT, "--boundary", "zero", "--save-spectra", target], capsys)
    assert code == 2 and "--save-spectra needs --boundary circular" in err


@pytest.mark.slow
def test_condition_computes_each_layer_spectrum_once(monkeypatch) -> None:
    import auditor.analysis.conditioning as conditioning
    import auditor.tasks.condition as condition_module
    from auditor.subject import open_subject

    calls: list[str] = []
    original = condition_module.conv_singular_values

    def counted(op, **kwargs):
        calls.append(op.name)
        return original(op, **kwargs)

    monkeypatch.setattr(condition_module, "conv_singular_values", counted)
    monkeypatch.setattr(conditioning, "conv_singular_values", counted)
    subject = open_subject(CKPT)
    report = condition_module.condition(subject)
    block_convs = [c.name for b in subject.anatomy.blocks for c in b.convs]
    assert block_convs and all(calls.count(name) == 1 for name in block_convs)
    layers = {layer.name: layer for layer in report.layers}
    for block in report.blocks:
        for sigma in block.sigma:  # the block's M_i, m_i are the layer table's numbers
            assert (sigma.max, sigma.min) == (layers[sigma.layer].sigma_max, layers[sigma.layer].sigma_min)
    # and they are the numbers of the dense operator, built from the model's own modules
    # (at 8x8 input: a 1024-column matrix per block)
    import math

    import torch

    from _reference import linearized_basic_block, singular_values

    small = open_subject(CKPT, input_size=(8, 8))
    modules = dict(small.loaded.model.named_modules())
    for block, info in zip(condition_module.condition(small).blocks, small.anatomy.blocks, strict=True):
        n = math.prod(info.input_shape)
        with torch.no_grad():
            images = linearized_basic_block(modules[info.name])(torch.eye(n, dtype=torch.float64).reshape(n, *info.input_shape))
        values = singular_values(images.reshape(n, -1).T.numpy())
        assert block.kappa_linear_residual == pytest.approx(values[0] / values[-1], rel=1e-6), block.name


def _enospc(*args, **kwargs):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fmt", ["json", "table", "markdown"])
def test_output_on_a_full_disk_is_an_input_error_naming_the_file(fmt, tmp_path: Path, capsys, monkeypatch) -> None:
    import os

    target = tmp_path / "out" / "report.txt"
    target.parent.mkdir()  # -o creates no folder (#26: exit 2, tests/test_errors.py)
    monkeypatch.setattr(os, "replace", _enospc)
    code, out, err = run_cli(["condition", CKPT, "--format", fmt, "-o", target, "--no-progress"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(target) in lines[0] and "No space left on device" in lines[0] and "-o" in lines[0]
    assert "internal error" not in err
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind


def test_output_where_a_folder_is_a_file(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    code, out, err = run_cli(["condition", CKPT, "--format", "json", "-o", blocker / "r.json"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"{blocker} is a file, not a folder" in err and "internal error" not in err
    code, _, err = run_cli(["audit", CKPT, "--plots", blocker / "plots", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and str(blocker) in err and "--plots" in err, err
    code, _, err = run_cli(["condition", CKPT, "--save-spectra", blocker / "s.h5", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and str(blocker) in err and "--save-spectra" in err, err


def test_save_spectra_on_a_full_disk_leaves_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    import os

    target = tmp_path / "spectra" / "s.h5"
    monkeypatch.setattr(os, "replace", _enospc)
    code, out, err = run_cli(["condition", CKPT, "--save-spectra", target, "--no-progress"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert str(target) in err and "No space left on device" in err
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: {"tool": "resdyn", "schema_version": "1"}, "not a resdyn report"),
        (lambda d: [d], "not a resdyn report"),
        (lambda d: {**d, "tool": None}, "not a resdyn report"),
        (lambda d: {**d, "schema_version": "3"}, "schema_version '3' is not supported"),
        (lambda d: {**d, "blocks": [1]}, "at blocks/0"),
        (lambda d: {**d, "blocks": [{**d["blocks"][0], "kappa_linear_residual": "big"}]}, "at blocks/0/kappa_linear_residual"),
        (lambda d: {k: v for k, v in d.items() if k != "command"}, "'command' is a required property"),
    ],
)
def test_compare_refuses_json_that_is_not_a_report(damage, message, tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.json"
    code, _, err = run_cli(["condition", CKPT, "--format", "json", "-o", good, "--no-progress"], capsys)
    assert code == 0, err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(damage(json.loads(good.read_text()))))
    for args in ([good, bad], [bad, good]):
        code, out, err = run_cli(["compare", *args, "--format", "json"], capsys)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(bad) in lines[0] and message in lines[0], err
        assert "internal error" not in err


def test_compare_reads_a_baseline_written_under_schema_version_1(tmp_path: Path, capsys) -> None:
    """A CI baseline from before version 2 (only trajectory's series changed) still compares."""
    new = tmp_path / "new.json"
    code, _, err = run_cli(["condition", CKPT, "--format", "json", "-o", new, "--no-progress"], capsys)
    assert code == 0, err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**json.loads(new.read_text()), "schema_version": "1"}))
    code, out, err = run_cli(["compare", old, new, "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["command"] == "compare"


@pytest.fixture
def digits_with_a_bad_image(tmp_path: Path) -> Path:
    """Three classes of four digits each; one image of class '0' is not an image."""
    import shutil

    root = tmp_path / "digits"
    for name in ("0", "1", "2"):
        (root / name).mkdir(parents=True)
        for image in sorted((DIGITS / name).iterdir())[:4]:
            shutil.copy(image, root / name / image.name)
    sorted((root / "0").iterdir())[0].write_bytes(b"not a png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "table", "markdown"])
def test_audit_warns_about_and_does_not_count_unreadable_images(fmt, digits_with_a_bad_image: Path, capsys) -> None:
    code, out, err = run_cli(["audit", CKPT, "--data", digits_with_a_bad_image, *SMALL, "--format", fmt,
                              "--no-progress"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1 unreadable image(s)" in warnings[0] and "0/" in warnings[0], err
    if fmt == "json":
        from auditor.report.document import validate

        doc = json.loads(out)
        validate(doc)
        assert doc["data"]["samples_per_class"] == {"0": 3, "1": 4, "2": 4}
        assert [s["path"].split("/")[0] for s in doc["data"]["skipped"]] == ["0"]
        assert all(stage["counts"] == doc["data"]["samples_per_class"] for stage in doc["stages"])
    else:
        assert "unreadable image(s)" in out
    if fmt == "markdown":
        assert "11 images in 3 classes" in out


@pytest.mark.slow
def test_one_class_folder_says_why_separation_is_null(tmp_path: Path, capsys) -> None:
    import shutil

    one = tmp_path / "one"
    shutil.copytree(DIGITS / "3", one / "3")
    code, out, err = run_cli(["audit", CKPT, "--data", one, *SMALL, "--fail-on", "min_separation_deg<5",
                              "--format", "json", "--no-progress"], capsys)
    assert code == 1, err  # an undefined value never passes a rule
    doc = json.loads(out)
    from auditor.report.document import validate

    validate(doc)
    for stage in doc["stages"]:
        assert stage["separation"] is None and "one class only" in stage["separation_reason"]
    assert "one class only" in doc["verdict"]["rules"][0]["reason"]
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "separation is undefined" in warnings[0] and "one class only" in warnings[0], err
    # the angles command on a one-class store says so too
    store = tmp_path / "one.h5"
    code, _, err = run_cli(["extract", CKPT, "--data", one, "--per-class", "4", "-o", store, "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["angles", store, "--stages", "layer1", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["stages"][0]["separation_reason"].startswith("one class only")
    assert "separation is undefined at stage(s) layer1" in err


_DAMAGED_ANGLES = """
import sys
import numpy as np
import auditor.tasks.geometry as geometry
from auditor.cli import run
from auditor.errors import StoreError

original = geometry.store_angles

def damaged(s, **kwargs):
    with np.errstate(all="warn"):
        np.log(np.zeros(2))  # numpy: "RuntimeWarning: divide by zero encountered in log"
    if sys.argv[1] == "fail":
        raise StoreError(f"{s.path}: stage 'layer1' is damaged")
    return original(s, **kwargs)

geometry.store_angles = damaged
sys.exit(run(["angles", sys.argv[2], "--format", "json"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fails", [True, False])
def test_library_warnings_never_precede_the_one_line_error(fails, tmp_path: Path, capsys) -> None:
    """In a real process (pytest's own warning capture would hide the bug in-process)."""
    import os
    import subprocess
    import sys

    store = tmp_path / "acts.h5"
    code, _, err = run_cli(["extract", CKPT, "--data", DIGITS, "--per-class", "2", "-o", store, "--no-progress"], capsys)
    assert code == 0, err
    env = {k: v for k, v in os.environ.items() if k not in ("RESDYN_DEBUG", "PYTHONWARNINGS")}
    result = subprocess.run([sys.executable, "-c", _DAMAGED_ANGLES, "fail" if fails else "ok", str(store)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert "RuntimeWarning" not in result.stderr and "np.log" not in result.stderr, result.stderr
    if fails:
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [f"resdyn: error: {store}: stage 'layer1' is damaged"]
    else:
        assert result.returncode == 0 and json.loads(result.stdout)["stages"], result.stderr
        assert result.stderr.strip().splitlines() == ["warning: divide by zero encountered in log"]
