"""The blocks' condition numbers against epoch, one panel per run (log scale).

Per block (colour by depth) its exact kappa (solid: the linearized block with its
shortcut, or without for a block that has none) and the paper's kappa (dashed);
an infinite kappa (a singular block) is marked "inf" at the top of its panel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..nonfinite import INFINITE
from .canvas import as_floats, figure_legend, integer_epochs, pyplot, save_figure

__all__ = ["block_kappa_keys", "draw_kappa_runs", "plot_kappa_runs", "run_block_names"]


def block_kappa_keys(block: Mapping[str, Any]) -> tuple[str, str]:
    """The block's own (exact, paper) kappa keys: the residual ones, the plain ones for a block without shortcut."""
    if block.get("shortcut") == "none":
        return "kappa_linear_plain", "kappa_paper_plain"
    return "kappa_linear_residual", "kappa_paper_residual"


def run_block_names(run: Mapping[str, Any]) -> list[str]:
    """The blocks of a run's checkpoints, in network order."""
    names: list[str] = []
    for point in run["checkpoints"]:
        names.extend(b["name"] for b in point["condition"]["blocks"] if b["name"] not in names)
    return names


def _kappa(point: Mapping[str, Any], name: str, which: int) -> tuple[float | None, bool]:
    block = next((b for b in point["condition"]["blocks"] if b["name"] == name), None)
    if block is None:
        return None, False
    key = block_kappa_keys(block)[which]
    return block.get(key), key in (block.get(INFINITE) or {})


def draw_kappa_runs(series: Sequence[Mapping[str, Any]], *, title: str = "") -> Any:
    """The conditioning figure of a ``trajectory --condition`` report's ``series`` (returns the Figure)."""
    plt = pyplot()
    columns = len(series)
    fig, axes = plt.subplots(1, columns, figsize=(1.2 + 3.6 * columns, 4.0), squeeze=False, sharey=True, sharex=True,
                             layout="constrained")
    depth = plt.get_cmap("viridis")
    every: list[str] = []  # one colour per block name, by depth, in every panel
    for run in series:
        every.extend(n for n in run_block_names(run) if n not in every)
    colours = {name: depth(index / max(1, len(every) - 1) * 0.9) for index, name in enumerate(every)}
    for ax, run in zip(axes[0], series):
        epochs = [p["epoch"] for p in run["checkpoints"]]
        for name in run_block_names(run):
            colour = colours[name]
            exact = [_kappa(p, name, 0) for p in run["checkpoints"]]
            paper = [_kappa(p, name, 1) for p in run["checkpoints"]]
            ax.plot(epochs, as_floats(v for v, _ in exact), "-", marker="o", ms=3, lw=1.4, color=colour,
                    label=f"{name}, exact")
            ax.plot(epochs, as_floats(v for v, _ in paper), "--", marker="s", ms=2.5, lw=1.0, color=colour,
                    label=f"{name}, paper")
            for epoch, (_, infinite) in zip(epochs, exact):
                if infinite:
                    ax.annotate("inf", (epoch, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                                color="red", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(str(run["name"]), fontsize=11, fontweight="bold")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
        integer_epochs(ax, epochs)
    axes[0][0].set_ylabel("block condition number kappa (log scale)")
    key = [plt.Line2D([], [], color="k", ls="-", marker="o", ms=3, label="exact kappa (linearized block)"),
           plt.Line2D([], [], color="k", ls="--", marker="s", ms=2.5, label="paper kappa (prod M + 1)/(prod m + 1)")]
    labelled = [plt.Line2D([], [], color=colours[n], lw=2, label=f"block {n}") for n in every]
    figure_legend(fig, [*labelled, *key], columns=min(5, len(labelled) + 2))
    names = " vs ".join(str(run["name"]) for run in series)
    fig.suptitle(title or f"Block condition numbers across training: {names}")
    return fig


def plot_kappa_runs(series: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> Path:
    """Write :func:`draw_kappa_runs`' figure to ``path`` (PNG, atomically)."""
    return save_figure(draw_kappa_runs(series, title=title), path)
