"""Median principal angles against epoch for several runs side by side (the paper's Figure 2).

One column per run, one row per stage, shared axes: within-class angles one line
per class (its colour), between-class angles as the median over class pairs
(black, dashed) with its min-max band (grey).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .canvas import as_floats, class_colours, figure_legend, integer_epochs, pyplot, save_figure

__all__ = ["inter_summary", "draw_angle_runs", "plot_angle_runs", "run_stage_names", "series_classes",
           "trajectory_figures"]


def inter_summary(stage: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """Median, min and max of a stage's between-class angles (None when no pair has one)."""
    values = [v for v in stage["inter"].values() if v is not None]
    if not values:
        return None, None, None
    return float(statistics.median(values)), min(values), max(values)


def run_stage_names(series: Sequence[Mapping[str, Any]]) -> list[str]:
    """The stages of the runs, in network order (first run first; stages only later runs have after them)."""
    names: list[str] = []
    for run in series:
        for point in run["checkpoints"]:
            names.extend(s["name"] for s in point["stages"] if s["name"] not in names)
    return names


def series_classes(series: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every class of the runs' stages, in order of appearance (the first run's order first)."""
    found: list[str] = []
    for run in series:
        for point in run["checkpoints"]:
            for stage in point["stages"]:
                found.extend(c for c in stage["intra"] if c not in found)
    return found


def _stage(point: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    return next((s for s in point["stages"] if s["name"] == name), None)


def draw_angle_runs(series: Sequence[Mapping[str, Any]], *, classes: Sequence[str], title: str = "") -> Any:
    """The figure of a ``trajectory`` report's ``series`` (returns the matplotlib Figure).

    Parameters
    ----------
    series : sequence of dict
        The report's ``series``: per run ``name`` and ``checkpoints``.
    classes : sequence of str
        Every class, in the report's order (it fixes each class's colour).
    title : str
        Default: "Median principal angles across training: A vs B vs C".
    """
    plt = pyplot()
    stages = run_stage_names(series)
    rows, columns = len(stages), len(series)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 + 3.3 * columns, 0.8 + 2.3 * rows), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    colours = class_colours(classes)
    for column, run in enumerate(series):
        epochs = [p["epoch"] for p in run["checkpoints"]]
        for row, name in enumerate(stages):
            ax = axes[row][column]
            points = [_stage(p, name) for p in run["checkpoints"]]
            summaries = [inter_summary(s) if s is not None else (None, None, None) for s in points]
            ax.fill_between(epochs, as_floats(s[1] for s in summaries), as_floats(s[2] for s in summaries),
                            color="0.55", alpha=0.3, lw=0, label="inter-class: min-max over class pairs")
            ax.plot(epochs, as_floats(s[0] for s in summaries), "k--", lw=1.5,
                    label="inter-class: median over class pairs")
            for cls in classes:
                ax.plot(epochs, as_floats(s["intra"].get(cls) if s is not None else None for s in points), "-",
                        marker="o", ms=2.5, lw=1.1, color=colours[cls], label=f"intra-class {cls}")
            ax.grid(alpha=0.3)
            integer_epochs(ax, epochs)
            if row == 0:
                ax.set_title(run["name"], fontsize=11, fontweight="bold")
            if column == 0:
                ax.set_ylabel(f"stage {name}\nangle (degrees)")
            if row == rows - 1:
                ax.set_xlabel("epoch")
    handles, _ = axes[0][0].get_legend_handles_labels()
    handles = handles[2:] + handles[1::-1]  # the classes, then the median, then its band
    figure_legend(fig, handles, columns=min(6, len(handles)))
    names = " vs ".join(str(run["name"]) for run in series)
    fig.suptitle(title or f"Median principal angles across training: {names}")
    return fig


def plot_angle_runs(series: Sequence[Mapping[str, Any]], path: Path, *, classes: Sequence[str],
                    title: str = "") -> Path:
    """Write :func:`draw_angle_runs`' figure to ``path`` (PNG, atomically)."""
    return save_figure(draw_angle_runs(series, classes=classes, title=title), path)


def trajectory_figures(document: Mapping[str, Any], plot: Path | None, kappa_plot: Path | None) -> list[Path]:
    """The figures of a ``trajectory`` report: the angles into ``plot``, the blocks' kappas into ``kappa_plot``."""
    written = []
    if plot is not None:
        written.append(plot_angle_runs(document["series"], plot, classes=series_classes(document["series"])))
    if kappa_plot is not None:
        from .kappas import plot_kappa_runs

        written.append(plot_kappa_runs(document["series"], kappa_plot))
    return written
