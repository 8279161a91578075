"""``resdyn trajectory`` with several runs and ``--condition`` on the bundled per-epoch runs (issue #28).

One run of the command (three runs, four checkpoints) serves every check: the JSON
against the schema, the runs' names and order, the kappas against ``resdyn
condition``, the angles against ``resdyn angles`` and a direct pairwise loop, the
tables against the JSON, Figure 5 read back from matplotlib's objects, and the
caches reused by a second run. The trajectory figures are read back against a full
report in ``test_figures.py``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, run_cli, run_json

DIGITS = FIXTURES / "digits"
RUNS = FIXTURES / "checkpoints"
NAMES = ["resnet8", "resnet8_nobn", "resnet8_plain"]
COMMON = ["--data", str(DIGITS), "--per-class", "2", "--stages", "layer1,layer3"]

pytestmark = pytest.mark.skipif(not (RUNS / "resnet8").is_dir(), reason="fixtures not built (python fixtures/build.py)")


def _globs() -> list[str]:
    """Three runs: resnet8 at epochs 0 and 6 (a glob), the other two at epoch 6 (a file each)."""
    return [str(RUNS / "resnet8" / "epoch-0[60].safetensors"),
            *(str(RUNS / name / "epoch-06.safetensors") for name in NAMES[1:])]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The command once (its JSON; the figures are drawn from it below)."""
    from auditor.cli import run as cli

    tmp = tmp_path_factory.mktemp("trajectory")
    paths = {"json": tmp / "t.json", "cache": tmp / "cache"}
    code = cli(["trajectory", *_globs(), *COMMON, "--condition", "--cache", str(paths["cache"]), "--no-progress",
                "--format", "json", "-o", str(paths["json"])])  # --plot: test_cli_pipeline writes it
    assert code == 0
    return {"doc": json.loads(paths["json"].read_text()), **paths}


def test_runs_are_named_ordered_and_valid(run: dict) -> None:
    from auditor.report.document import validate

    doc = run["doc"]
    validate(doc)
    assert [r["name"] for r in doc["series"]] == NAMES
    for entry, name, epochs in zip(doc["series"], NAMES, ([0, 6], [6], [6])):
        assert [p["epoch"] for p in entry["checkpoints"]] == epochs
        assert all(Path(p["checkpoint"]).parent.name == name for p in entry["checkpoints"])
        assert all(p["arch"] == name for p in entry["checkpoints"])
        assert all([s["name"] for s in p["stages"]] == ["layer1", "layer3"] for p in entry["checkpoints"])
        assert all(not p["condition"]["reused"] for p in entry["checkpoints"])


def test_kappas_equal_resdyn_condition(run: dict, capsys) -> None:
    """Each block's kappas and the summary as ``resdyn condition`` gives them (a plain network: its plain kappas)."""
    plain = run["doc"]["series"][2]["checkpoints"][0]
    condition = run_json(["condition", plain["checkpoint"]], capsys)
    got = plain["condition"]["blocks"]
    assert [b["name"] for b in got] == [b["name"] for b in condition["blocks"]]
    for mine, theirs in zip(got, condition["blocks"]):
        for key in ("kappa_paper_residual", "kappa_paper_plain", "kappa_linear_residual", "kappa_linear_plain",
                    "lemma1_upper_holds", "lemma1_lower_holds", "shortcut"):
            assert mine.get(key) == theirs.get(key), key
    for key, value in condition["summary"].items():
        assert plain["condition"]["summary"][key] == value, key


def test_angles_of_two_checkpoints_are_figure_5(run: dict, tmp_path: Path, capsys) -> None:
    """``resdyn angles`` on two checkpoints (through the trajectory's cache): the trajectory's numbers, a direct
    pairwise loop on the stored activations, and one panel per model read back from the figure."""
    import h5py

    from auditor.report.document import validate
    from auditor.report.figures.models import draw_angles_by_model, inter_of_class
    from auditor.report.models_view import models_markdown

    series = run["doc"]["series"]
    wanted = [series[0]["checkpoints"][1], series[2]["checkpoints"][0]]
    plot = tmp_path / "models.png"
    doc = run_json(["angles", *(p["checkpoint"] for p in wanted), *COMMON, "--cache", run["cache"],
                    "--plot", plot], capsys)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    validate(doc)
    assert [m["name"] for m in doc["models"]] == ["resnet8/epoch-06", "resnet8_plain/epoch-06"]
    text = models_markdown(doc)
    for model in doc["models"]:
        assert f"### {model['name']}: {model['checkpoint']}  ({model['store']['arch']}, 20 samples)" in text
        rows = _cells(text, f"{model['name']}: ")
        for row, stage in zip(rows, model["stages"]):
            intra, inter = list(stage["intra"].values()), list(stage["inter"].values())
            assert row == [stage["name"], "x".join(map(str, stage["shape"])),
                           *(f"{v:.2f}" for v in (np.mean(intra), min(intra), max(intra), np.mean(inter), min(inter),
                                                  max(inter), min(inter) - max(intra)))]
    for model, point in zip(doc["models"], wanted):
        assert model["stages"] == point["stages"] and model["store"]["path"] == point["store"]
        assert model["store"]["checkpoint_sha256"] == point["sha256"] and model["store"]["samples"] == 20
    with h5py.File(doc["models"][1]["store"]["path"], "r") as h5:
        rows = np.asarray(h5["stages/layer3"][()], dtype=np.float64).reshape(20, -1)
        labels = np.asarray(h5["samples/label"][()])
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    degrees = np.degrees(np.arccos(np.clip(unit @ unit.T, -1, 1)))
    layer3 = doc["models"][1]["stages"][1]
    a, b = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    assert layer3["intra"]["0"] == pytest.approx(degrees[a[0], a[1]], abs=1e-6)
    assert layer3["inter"]["0|1"] == pytest.approx(np.median(degrees[np.ix_(a, b)]), abs=1e-6)

    classes = run["doc"]["data"]["classes"]
    fig = draw_angles_by_model(doc["models"], classes=classes)
    assert [ax.get_title() for ax in fig.axes] == ["resnet8/epoch-06", "resnet8_plain/epoch-06"]
    assert "degrees" in fig.axes[0].get_ylabel() and len(fig.legends) == 1
    for ax, model in zip(fig.axes, doc["models"]):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["layer1", "layer3"]
        lines = ax.get_lines()
        assert len(lines) == 2 * len(classes)
        for index, cls in enumerate(classes):
            intra, inter = lines[2 * index], lines[2 * index + 1]
            assert list(intra.get_xdata()) == [0, 1] and intra.get_color() == inter.get_color()
            assert list(intra.get_ydata()) == [s["intra"][cls] for s in model["stages"]]
            pairs = [[v for k, v in s["inter"].items() if cls in k.split("|")] for s in model["stages"]]
            assert list(inter.get_ydata()) == pytest.approx([statistics.median(p) for p in pairs])
            assert list(inter.get_ydata()) == [inter_of_class(s, cls) for s in model["stages"]]


def _cells(markdown: str, title: str) -> list[list[str]]:
    """The rows of the Markdown table under ``### title``."""
    block = markdown.split(f"### {title}", 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:] if line.startswith("|")]


def test_tables_agree_with_the_json(run: dict) -> None:
    from auditor.report.trajectory_view import trajectory_markdown

    doc = run["doc"]
    text = trajectory_markdown(doc)
    angles = _cells(text, "Median principal angles")
    expected = []
    for entry in doc["series"]:
        for point in entry["checkpoints"]:
            for stage in point["stages"]:
                inter = np.array(list(stage["inter"].values()), dtype=float)
                expected.append([entry["name"], str(point["epoch"]), Path(point["checkpoint"]).name, stage["name"],
                                 f"{np.mean(list(stage['intra'].values())):.2f}", f"{np.median(inter):.2f}",
                                 f"{inter.min():.2f}", f"{inter.max():.2f}", f"{stage['separation']:.2f}"])
    assert angles == expected
    kappas = _cells(text, "Block condition numbers")
    points = [p for entry in doc["series"] for p in entry["checkpoints"]]
    assert [row[:2] for row in kappas] == [[e["name"], str(p["epoch"])] for e in doc["series"] for p in e["checkpoints"]]
    for row, point in zip(kappas, points):
        blocks = point["condition"]["blocks"]
        plain = all(b["shortcut"] == "none" for b in blocks)
        exact = np.array([b["kappa_linear_plain" if plain else "kappa_linear_residual"] for b in blocks])
        assert row[2] == str(len(blocks))
        assert float(row[3]) == pytest.approx(exact.max(), rel=5e-4)
        assert float(row[4]) == pytest.approx(np.median(exact), rel=5e-4)
        worst = blocks[int(np.argmax(exact))]["name"]
        assert row[5] == worst
        if plain:
            assert row[6] == row[7] == "-"
        else:
            assert float(row[6]) == pytest.approx(max(b["kappa_paper_residual"] for b in blocks), rel=5e-4)
            assert row[7] == str(sum(b["lemma1_lower_holds"] is False for b in blocks))


def test_a_second_run_reuses_the_stores_and_the_kappas(run: dict, tmp_path: Path, capsys) -> None:
    kappas = tmp_path / "kappas.png"
    doc = run_json(["trajectory", str(RUNS / "resnet8_plain" / "epoch-06.safetensors"), *COMMON, "--condition",
                    "--cache", run["cache"], "--name", "plain", "--plot-condition", kappas], capsys)
    point = doc["series"][0]["checkpoints"][0]
    assert doc["series"][0]["name"] == "plain"
    assert point["reused_store"] and point["condition"]["reused"]
    assert point["condition"]["blocks"] == run["doc"]["series"][2]["checkpoints"][0]["condition"]["blocks"]
    assert point["stages"] == run["doc"]["series"][2]["checkpoints"][0]["stages"]
    assert kappas.read_bytes()[:4] == b"\x89PNG"


def test_html_embeds_the_figures_the_run_drew(run: dict, tmp_path: Path, capsys) -> None:
    """--format html with --plot / --plot-condition: both PNGs inside the page (from the cached stores)."""
    page = tmp_path / "t.html"
    code, _, err = run_cli(["trajectory", str(RUNS / "resnet8_plain" / "epoch-06.safetensors"), *COMMON,
                            "--condition", "--cache", run["cache"], "--plot", tmp_path / "a.png",
                            "--plot-condition", tmp_path / "k.png", "--format", "html", "-o", page], capsys)
    assert code == 0, err
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2 and "<table" in text


def test_angles_of_a_checkpoint_without_images_is_one_line_exit_2(capsys) -> None:
    code, out, err = run_cli(["angles", RUNS / "resnet8" / "epoch-06.safetensors"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert "a checkpoint needs images" in lines[0] and "Hint: pass --data DIR" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "a", "--name", "b"], "2 run name(s) for 3 run(s)"),
        (["--name", "a", "--name", "a", "--name", "b"], "two runs are named 'a'"),
        (["--plot-condition", "k.png"], "--plot-condition draws the kappas of --condition"),
    ],
)
def test_bad_run_options_are_one_line_exit_2(args, message, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(["trajectory", *_globs(), "--data", DIGITS, *args, "-o", tmp_path / "x.json"], capsys)
    assert code == 2 and out == "" and not (tmp_path / "x.json").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Hint:" in lines[0], err
