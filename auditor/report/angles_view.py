"""Table and Markdown views of the class-geometry section (``stages``)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from .markdown import md_table


__all__ = ["angles_table", "angles_rows", "angles_markdown_table", "FULL_MATRIX_CLASSES"]

FULL_MATRIX_CLASSES = 4  # up to this many classes every in-c and out-c,d column is shown


def _deg(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _stats(values: Sequence[float | None]) -> tuple[str, str, str]:
    present = [v for v in values if v is not None]
    if not present:
        return "-", "-", "-"
    return _deg(statistics.fmean(present)), _deg(min(present)), _deg(max(present))


def angles_rows(stages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: full in-c / out-c,d columns for few classes, else a summary."""
    if not stages:
        return ["stage"], []
    classes = list(stages[0]["intra"])
    pairs = list(stages[0]["inter"])
    if len(classes) <= FULL_MATRIX_CLASSES:
        header = ["stage", "shape"] + [f"in-{c}" for c in classes] + [f"out-{p.replace('|', ',')}" for p in pairs] + ["separation"]
        rows = [
            [s["name"], "x".join(map(str, s["shape"]))]
            + [_deg(s["intra"].get(c)) for c in classes]
            + [_deg(s["inter"].get(p)) for p in pairs]
            + [_deg(s.get("separation"))]
            for s in stages
        ]
        return header, rows
    header = ["stage", "shape", "intra mean", "intra min", "intra max", "inter mean", "inter min", "inter max", "separation"]
    rows = []
    for s in stages:
        rows.append([s["name"], "x".join(map(str, s["shape"])), *_stats(list(s["intra"].values())),
                     *_stats(list(s["inter"].values())), _deg(s.get("separation"))])
    return header, rows


def angles_table(stages: Sequence[Mapping[str, Any]], *, note: str = "") -> list[Any]:
    """Stages as rows; separation = smallest inter minus largest intra (degrees)."""
    header, rows = angles_rows(stages)
    classes = len(stages[0]["intra"]) if stages else 0
    title = "Median principal angles (degrees)"
    if classes > FULL_MATRIX_CLASSES:
        title += f": summary over {classes} classes (full matrix in --format json)"
    table = Table(title=title, title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column in ("stage", "shape") else "right")
    for row in rows:
        separation = row[-1]
        style = "red" if separation != "-" and float(separation) < 0 else None
        table.add_row(*row, style=style)
    out: list[Any] = [table]
    excluded = {s["name"]: sum(s.get("excluded_zero", {}).values()) for s in stages}
    if any(excluded.values()):
        out.append(Text("zero activation vectors excluded: " + ", ".join(f"{k} {v}" for k, v in excluded.items() if v), style="yellow"))
    reasons = {f"{s['name']}/{c}": r for s in stages for c, r in (s.get("intra_reason") or {}).items()}
    for where, reason in list(reasons.items())[:10]:
        out.append(Text(f"no intra angle for {where}: {reason}", style="yellow"))
    if any(s.get("pairs_sampled") for s in stages):
        out.append(Text("medians estimated from sampled pairs (--max-pairs); not exact", style="yellow"))
    if note:
        out.append(Text(note))
    return out


def angles_markdown_table(stages: Sequence[Mapping[str, Any]]) -> str:
    """The angles table as Markdown."""
    header, rows = angles_rows(stages)
    return md_table(header, rows)


