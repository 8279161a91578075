"""PNG figures of one network (matplotlib, imported only when a plot is asked for).

The figures that compare runs or models are in :mod:`auditor.report.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .figures.canvas import pyplot, save_figure

__all__ = ["plot_angles_by_stage", "plot_error_trajectory", "plot_conditioning", "stability_figure", "audit_figures"]

_MANY_PAIRS = 12  # above this, inter-class angles are drawn as a band, not one line per pair


def _values(mapping: Mapping[str, float | None]) -> list[float]:
    return [v for v in mapping.values() if v is not None]


def _draw_angles(ax: Any, x: Sequence[Any], series: Sequence[Mapping[str, Any]], *, legend: bool) -> None:
    """Intra per class (solid), inter per pair (dashed) or as a min-max band."""
    classes = list(series[0]["intra"]) if series else []
    colors = pyplot().get_cmap("tab10")
    for index, name in enumerate(classes):
        ys = [s["intra"].get(name) for s in series]
        ax.plot(x, [float("nan") if y is None else y for y in ys], "-o", ms=3, lw=1.4,
                color=colors(index % 10), label=f"intra {name}")
    pairs = list(series[0]["inter"]) if series else []
    if len(pairs) <= _MANY_PAIRS:
        for index, pair in enumerate(pairs):
            ys = [s["inter"].get(pair) for s in series]
            ax.plot(x, [float("nan") if y is None else y for y in ys], "--", lw=1.0,
                    color=colors((index + len(classes)) % 10), label=f"inter {pair.replace('|', ',')}")
    else:
        lows = [min(_values(s["inter"]), default=float("nan")) for s in series]
        highs = [max(_values(s["inter"]), default=float("nan")) for s in series]
        medians = [sorted(_values(s["inter"]))[len(_values(s["inter"])) // 2] if _values(s["inter"]) else float("nan") for s in series]
        ax.fill_between(x, lows, highs, color="0.6", alpha=0.35, label=f"inter, min-max of {len(pairs)} pairs")
        ax.plot(x, medians, "k--", lw=1.4, label="inter, median pair")
    ax.set_ylabel("median principal angle (degrees)")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, ncol=2, loc="best")


def plot_angles_by_stage(stages: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> Path:
    """Angle against stage: within-class (solid) and between-class (dashed / band) medians."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    names = [s["name"] for s in stages]
    _draw_angles(ax, list(range(len(names))), stages, legend=True)
    ax.set_xticks(list(range(len(names))), names)
    ax.set_xlabel("stage (before each down-sampling)")
    ax.set_title(title or "Median principal angles by stage")
    return save_figure(fig, path)


def plot_error_trajectory(points: Sequence[Mapping[str, Any]], eps: float, path: Path, *, title: str = "") -> Path:
    """Relative error after every block for an input perturbation of relative size eps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [p["name"] for p in points]
    x = list(range(len(names)))
    lo = [p.get("min") for p in points]
    hi = [p.get("max") for p in points]
    med = [p.get("median") for p in points]
    nan = float("nan")
    ax.fill_between(x, [nan if v is None else v for v in lo], [nan if v is None else v for v in hi],
                    alpha=0.3, label="min-max over samples")
    ax.plot(x, [nan if v is None else v for v in med], "-o", ms=3, label="median")
    ax.axhline(eps, color="k", ls=":", lw=1, label=f"input perturbation eps = {eps:g}")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("after block")
    ax.set_ylabel("relative error ||dh|| / ||h||")
    ax.set_title(title or "Perturbation along the network (the dynamical system's trajectory)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_conditioning(blocks: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> Path:
    """Paper and exact condition numbers per block (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [b["name"] for b in blocks]
    x = list(range(len(names)))
    nan = float("nan")
    for key, label, style in [
        ("kappa_paper_residual", "paper (prod M + 1)/(prod m + 1)", "-o"),
        ("kappa_linear_residual", "exact, linearized block", "-s"),
        ("kappa_linear_plain", "exact, without shortcut", ":^"),
    ]:
        ax.plot(x, [nan if b.get(key) is None else b[key] for b in blocks], style, ms=4, label=label)
    for i, b in enumerate(blocks):
        if b.get("lemma1_lower_holds") is False:
            ax.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.08)
        if "kappa_linear_residual" in (b.get("infinite") or {}):  # singular: off the chart, marked at its top
            ax.annotate("inf", (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top", color="red",
                        fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("block (red: Lemma 1 lower bound violated)")
    ax.set_ylabel("condition number")
    ax.set_title(title or "Block condition numbers")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def stability_figure(document: Mapping[str, Any], path: Path) -> Path:
    """The perturbation trajectory of a ``stability`` or ``audit`` report into ``path``."""
    arch, eps = document["checkpoint"]["arch"], document["stability"]["eps"]
    return plot_error_trajectory(document["stability"]["trajectory"]["points"], eps, path,
                                 title=f"Perturbation through {arch} (eps={eps:g})")


def audit_figures(directory: Path, document: Mapping[str, Any]) -> list[Path]:
    """The figures of an ``audit`` report into ``directory``: conditioning, and with images angles and stability."""
    arch = document["checkpoint"]["arch"]
    written = [plot_conditioning(document["blocks"], directory / "conditioning.png",
                                 title=f"Block condition numbers, {arch}")]
    if document.get("stages"):
        written.append(plot_angles_by_stage(document["stages"], directory / "angles.png",
                                            title=f"Median principal angles, {arch}"))
    if document.get("stability"):
        written.append(stability_figure(document, directory / "error-trajectory.png"))
    return written
