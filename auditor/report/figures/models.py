"""Median principal angles against the down-sampling stage, one panel per model (the paper's Figure 5).

Stages on the x axis in network order; per class its within-class angle (solid)
and its between-class angle (dashed: the median over the class pairs that hold
the class), both in the class's colour.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .canvas import as_floats, class_colours, figure_legend, pyplot, save_figure

__all__ = ["inter_of_class", "draw_angles_by_model", "plot_angles_by_model"]


def inter_of_class(stage: Mapping[str, Any], cls: str) -> float | None:
    """The median of the between-class angles of the pairs that hold ``cls`` (None when none has one)."""
    values = [v for pair, v in stage["inter"].items() if v is not None and cls in pair.split("|")]
    return float(statistics.median(values)) if values else None


def draw_angles_by_model(models: Sequence[Mapping[str, Any]], *, classes: Sequence[str], title: str = "") -> Any:
    """One panel per model (returns the matplotlib Figure).

    Parameters
    ----------
    models : sequence of dict
        Per model ``name`` and ``stages`` (entries of an ``angles`` report).
    classes : sequence of str
        Every class, in the report's order (it fixes each class's colour).
    title : str
        Default: "Median principal angles by stage: A vs B".
    """
    plt = pyplot()
    count = len(models)
    widest = max(len(m["stages"]) for m in models)
    fig, axes = plt.subplots(1, count, figsize=(1.0 + max(3.6, 0.9 * widest) * count, 4.2), squeeze=False,
                             sharey=True, layout="constrained")
    colours = class_colours(classes)
    for ax, model in zip(axes[0], models):
        names = [s["name"] for s in model["stages"]]
        x = list(range(len(names)))
        for cls in classes:
            ax.plot(x, as_floats(s["intra"].get(cls) for s in model["stages"]), "-", marker="o", ms=3, lw=1.2,
                    color=colours[cls], label=f"class {cls}")
            ax.plot(x, as_floats(inter_of_class(s, cls) for s in model["stages"]), "--", marker="x", ms=3, lw=1.0,
                    color=colours[cls])
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_xlabel("stage (network order)")
        ax.set_title(str(model["name"]), fontsize=11, fontweight="bold")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("median principal angle (degrees)")
    handles, _ = axes[0][0].get_legend_handles_labels()
    key = [plt.Line2D([], [], color="k", ls="-", marker="o", ms=3, label="intra-class (within the class)"),
           plt.Line2D([], [], color="k", ls="--", marker="x", ms=3,
                      label="inter-class (median over the pairs holding the class)")]
    figure_legend(fig, [*handles, *key], columns=min(6, len(handles) + 2))
    fig.suptitle(title or "Median principal angles by stage: " + " vs ".join(str(m["name"]) for m in models))
    return fig


def plot_angles_by_model(models: Sequence[Mapping[str, Any]], path: Path, *, classes: Sequence[str],
                         title: str = "") -> Path:
    """Write :func:`draw_angles_by_model`'s figure to ``path`` (PNG, atomically)."""
    return save_figure(draw_angles_by_model(models, classes=classes, title=title), path)
