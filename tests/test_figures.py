"""The comparison figures, read back from matplotlib's objects against the report they draw (issue #28).

Figure 2's layout and the kappa figure are drawn from a real ``trajectory --condition``
report of the three bundled runs (``tests/golden/trajectory.json``; Figure 5 from a
live ``angles`` run in ``test_trajectory.py``); small hand-made reports cover what the
bundled runs do not hold: gaps, infinite kappas, sizes, legends, colours. No figure
is written to disk here.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
NAMES = ["resnet8", "resnet8_nobn", "resnet8_plain"]

CLASSES = ["cat", "dog", "emu"]
STAGES = ["stem", "layer1", "layer2", "layer3", "penultimate"]


def _stage(name: str, shift: float, missing: bool = False) -> dict:
    return {
        "name": name, "shape": [4],
        "intra": {"cat": None if missing else 10 + shift, "dog": 20 + shift, "emu": 30 + shift},
        "inter": {"cat|dog": 40 + shift, "cat|emu": 50 + shift, "dog|emu": 60 + shift},
    }


def _block(name: str, kappa: float | None, shortcut: str = "identity") -> dict:
    key = "kappa_linear_plain" if shortcut == "none" else "kappa_linear_residual"
    paper = "kappa_paper_plain" if shortcut == "none" else "kappa_paper_residual"
    block = {"name": name, "stage": "layer1", "shortcut": shortcut, key: kappa, paper: 3.0}
    if kappa is None:
        block[f"{key}_reason"] = "the residual block is singular"
        block["infinite"] = {key: "inf"}
    return block


def _series() -> list[dict]:
    runs = []
    for r, name in enumerate(["plain", "no BN", "BN"]):
        points = []
        for epoch in (0, 5, 10):
            stages = [_stage(s, r + epoch + i, missing=(r == 1 and epoch == 5)) for i, s in enumerate(STAGES)]
            blocks = [_block("b1", None if (r == 2 and epoch == 10) else 10.0 ** (epoch / 5 + 1)),
                      _block("b2", 7.0, "none" if r == 0 else "identity")]
            points.append({"epoch": epoch, "stages": stages, "condition": {"blocks": blocks}})
        runs.append({"name": name, "checkpoints": points})
    return runs


@pytest.fixture(scope="module")
def report() -> dict:
    """``resdyn trajectory`` of the three bundled runs at epochs 0 and 6, with ``--condition``."""
    return json.loads((GOLDEN / "trajectory.json").read_text())


def _line_data(line) -> tuple[list[float], list[float]]:
    return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


def test_angle_figure_is_figure_2s_layout(report: dict) -> None:
    """A column per run, a row per stage; each class's line, the inter median and band are the JSON's numbers."""
    from matplotlib.collections import PolyCollection

    from auditor.report.figures.canvas import class_colours
    from auditor.report.figures.runs import draw_angle_runs, series_classes

    doc = report
    classes = doc["data"]["classes"]
    assert series_classes(doc["series"]) == classes  # the colours the command gives the classes
    fig = draw_angle_runs(doc["series"], classes=classes)
    axes = np.array(fig.axes).reshape(2, 3)
    assert [ax.get_title() for ax in axes[0]] == NAMES and not any(ax.get_title() for ax in axes[1])
    assert [ax.get_ylabel().splitlines()[0] for ax in axes[:, 0]] == ["stage layer1", "stage layer3"]
    assert all("degrees" in ax.get_ylabel() for ax in axes[:, 0]) and all(ax.get_xlabel() == "epoch" for ax in axes[1])
    assert all(ax.get_shared_y_axes().joined(ax, axes[0][0]) for ax in axes.flat)
    assert "resnet8 vs resnet8_nobn vs resnet8_plain" in fig._suptitle.get_text()
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in axes.flat)
    colours = class_colours(classes)
    for column, entry in enumerate(doc["series"]):
        epochs = [p["epoch"] for p in entry["checkpoints"]]
        for row, stage in enumerate(("layer1", "layer3")):
            ax = axes[row][column]
            points = [next(s for s in p["stages"] if s["name"] == stage) for p in entry["checkpoints"]]
            lines = {line.get_label(): line for line in ax.get_lines()}
            assert len(lines) == len(classes) + 1
            for cls in classes:
                x, y = _line_data(lines[f"intra-class {cls}"])
                assert x == epochs and y == [p["intra"][cls] for p in points]
                assert lines[f"intra-class {cls}"].get_color() == colours[cls]
            x, y = _line_data(lines["inter-class: median over class pairs"])
            assert x == epochs and y == pytest.approx([statistics.median(p["inter"].values()) for p in points])
            band = next(c for c in ax.collections if isinstance(c, PolyCollection))
            vertices = band.get_paths()[0].vertices
            for epoch, point in zip(epochs, points):
                at = vertices[np.isclose(vertices[:, 0], epoch), 1]
                assert at.min() == pytest.approx(min(point["inter"].values()))
                assert at.max() == pytest.approx(max(point["inter"].values()))


def test_kappa_figure_draws_each_block_against_epoch(report: dict) -> None:
    from auditor.report.figures.kappas import draw_kappa_runs

    doc = report
    fig = draw_kappa_runs(doc["series"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == NAMES
    assert all(ax.get_yscale() == "log" and ax.get_xlabel() == "epoch" for ax in axes)
    assert "condition number" in axes[0].get_ylabel()
    assert "Block condition numbers across training" in fig._suptitle.get_text() and len(fig.legends) == 1
    for ax, entry in zip(axes, doc["series"]):
        lines = {line.get_label(): line for line in ax.get_lines()}
        epochs = [p["epoch"] for p in entry["checkpoints"]]
        for index, block in enumerate(entry["checkpoints"][0]["condition"]["blocks"]):
            plain = block["shortcut"] == "none"
            for kind, key in (("exact", "kappa_linear"), ("paper", "kappa_paper")):
                x, y = _line_data(lines[f"{block['name']}, {kind}"])
                full = f"{key}_{'plain' if plain else 'residual'}"
                assert x == epochs
                assert y == [p["condition"]["blocks"][index][full] for p in entry["checkpoints"]]
                assert all(math.isfinite(v) for v in y)




@pytest.fixture(scope="module")
def figures() -> dict:
    from auditor.report.figures.kappas import draw_kappa_runs
    from auditor.report.figures.models import draw_angles_by_model
    from auditor.report.figures.runs import draw_angle_runs

    series = _series()
    models = [{"name": "deep", "stages": [_stage(s, i) for i, s in enumerate(STAGES)]},
              {"name": "shallow", "stages": [_stage(s, i) for i, s in enumerate(STAGES[:3])]}]
    out = {"series": series, "models": models, "runs": draw_angle_runs(series, classes=CLASSES),
           "kappas": draw_kappa_runs(series), "by_model": draw_angles_by_model(models, classes=CLASSES)}
    for name in ("runs", "kappas", "by_model"):
        out[name].canvas.draw()  # lay out, as when saved
    return out


def test_three_runs_by_five_stages_fit_and_the_legend_hides_nothing(figures: dict) -> None:
    for name in ("runs", "kappas", "by_model"):
        fig = figures[name]
        width, height = fig.get_size_inches()
        assert width <= 12 and height <= 13, (name, width, height)
        assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
        legend = fig.legends[0].get_window_extent()
        assert all(legend.y1 <= ax.get_tightbbox().y0 + 1 for ax in fig.axes), name  # below every panel
    assert len(figures["runs"].axes) == 15


def test_a_missing_angle_is_a_gap_and_each_class_keeps_its_colour(figures: dict) -> None:
    axes = np.array(figures["runs"].axes).reshape(5, 3)
    cat = next(line for line in axes[0][1].get_lines() if line.get_label() == "intra-class cat")
    y = cat.get_ydata()
    assert y[0] == 11 and math.isnan(y[1]) and y[2] == 21
    colours = {}
    for fig in (figures["runs"], figures["by_model"]):
        for ax in fig.axes:
            for line in ax.get_lines():
                label = line.get_label()
                for cls in CLASSES:
                    if label.endswith(f" {cls}"):
                        colours.setdefault(cls, set()).add(tuple(line.get_color()))
    assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == 3


def test_an_infinite_kappa_is_marked_and_left_off_the_line(figures: dict) -> None:
    bn = figures["kappas"].axes[2]
    exact = next(line for line in bn.get_lines() if line.get_label() == "b1, exact")
    assert list(exact.get_ydata()[:2]) == [10.0, 100.0] and math.isnan(exact.get_ydata()[2])
    marks = [t for t in bn.texts if t.get_text() == "inf"]
    assert len(marks) == 1 and marks[0].xy[0] == 10
    colours = {tuple(line.get_color()) for ax in figures["kappas"].axes for line in ax.get_lines()
               if line.get_label().startswith("b1,")}
    assert len(colours) == 1  # a block keeps its colour in every panel
    plain = figures["kappas"].axes[0]  # a block without shortcut: its plain kappas
    assert list(next(line for line in plain.get_lines() if line.get_label() == "b2, exact").get_ydata()) == [7.0] * 3


def test_models_with_other_stages_keep_their_own_axis(figures: dict) -> None:
    deep, shallow = figures["by_model"].axes
    assert [t.get_text() for t in deep.get_xticklabels()] == STAGES
    assert [t.get_text() for t in shallow.get_xticklabels()] == STAGES[:3]
    assert deep.get_title() == "deep" and shallow.get_title() == "shallow"
    inter = [line for line in shallow.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in inter][0] == [45.0, 46.0, 47.0]  # cat: median of 40+s, 50+s
