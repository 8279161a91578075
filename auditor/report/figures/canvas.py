"""What the figures share: pyplot on the Agg backend, the atomic PNG writer, one colour per class."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..document import write_atomic

__all__ = ["pyplot", "save_figure", "class_colours", "as_floats", "figure_legend", "integer_epochs", "DPI"]

DPI = 110


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported here, on first use, for start-up cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (a temporary sibling, then a rename), and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def class_colours(classes: Sequence[str]) -> dict[str, Any]:
    """One colour per class by its place in ``classes`` (tab10, tab20 beyond ten classes), the same in every figure."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    return {name: cmap(index % cmap.N) for index, name in enumerate(classes)}


def as_floats(values: Iterable[float | None]) -> list[float]:
    """``values`` with None as NaN (a gap in a line)."""
    return [float("nan") if v is None else float(v) for v in values]


def figure_legend(fig: Any, handles: Sequence[Any], *, columns: int) -> Any:
    """One legend for the whole figure, below the panels, where it hides no data (needs the constrained layout)."""
    return fig.legend(handles=list(handles), loc="outside lower center", ncol=columns, fontsize=8, frameon=False)


def integer_epochs(ax: Any, epochs: Iterable[float]) -> None:
    """Whole-number ticks on the x axis when every epoch is a whole number."""
    if all(float(e).is_integer() for e in epochs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
