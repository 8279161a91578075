"""Table and Markdown views of a ``trajectory`` report: angles per run, epoch and stage; kappas per run and epoch."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .markdown import md_table
from .nonfinite import shown

__all__ = ["ANGLE_HEADER", "KAPPA_HEADER", "angle_rows", "kappa_rows", "exact_kappa_key", "trajectory_tables",
           "trajectory_markdown"]

ANGLE_HEADER = ["run", "epoch", "checkpoint", "stage", "intra mean", "inter median", "inter min", "inter max",
                "separation"]
KAPPA_HEADER = ["run", "epoch", "blocks", "max exact kappa", "median exact kappa", "worst block",
                "max paper kappa", "Lemma 1 lower violated"]


def _deg(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _kappa(value: float) -> str:
    return f"{value:.4g}"


def angle_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """One row per run, checkpoint and stage (degrees): intra mean over classes, inter median / min / max over pairs."""
    rows = []
    for run in doc["series"]:
        for point in run["checkpoints"]:
            for stage in point["stages"]:
                intra = [v for v in stage["intra"].values() if v is not None]
                inter = [v for v in stage["inter"].values() if v is not None]
                rows.append([
                    str(run["name"]), "-" if point["epoch"] is None else str(point["epoch"]),
                    Path(point["checkpoint"]).name, stage["name"],
                    _deg(statistics.fmean(intra) if intra else None),
                    _deg(statistics.median(inter) if inter else None),
                    _deg(min(inter) if inter else None), _deg(max(inter) if inter else None),
                    _deg(stage.get("separation")),
                ])
    return rows


def exact_kappa_key(summary: Mapping[str, Any]) -> str:
    """The summary's exact kappa: of the residual blocks, or of every block (plain) in a network without shortcuts."""
    return "kappa_linear_residual" if summary.get("residual_blocks") else "kappa_linear_plain"


def kappa_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """One row per run and checkpoint with ``condition``: the summary's largest and median kappas."""
    rows = []
    for run in doc["series"]:
        for point in run["checkpoints"]:
            if "condition" not in point:
                continue
            summary = point["condition"]["summary"]
            key = exact_kappa_key(summary)
            paper = "kappa_paper_residual" if key == "kappa_linear_residual" else None
            rows.append([
                str(run["name"]), "-" if point["epoch"] is None else str(point["epoch"]), str(summary["blocks"]),
                shown(summary, f"max_{key}", _kappa), shown(summary, f"median_{key}", _kappa),
                summary.get("worst_block") or "-",
                shown(summary, f"max_{paper}", _kappa) if paper else "-",
                str(summary["lemma1_lower_violations"]) if paper else "-",  # Lemma 1 is about residual blocks
            ])
    return rows


def _notes(doc: Mapping[str, Any]) -> list[str]:
    return [f"{run['name']}: {run['order_note']}" for run in doc["series"] if run.get("order_note")]


def trajectory_tables(doc: Mapping[str, Any]) -> list[Any]:
    """Rich renderables: the angles table (a section per run), the kappa table with ``--condition``, notes."""
    from rich.table import Table
    from rich.text import Text

    def table(title: str, header: list[str], rows: list[list[str]], left: set[str]) -> Any:
        out = Table(title=title, title_justify="left")
        for column in header:
            out.add_column(column, justify="left" if column in left else "right")
        previous = None
        for row in rows:
            if previous is not None and row[0] != previous:
                out.add_section()
            previous = row[0]
            out.add_row(*row)
        return out

    out: list[Any] = [table("Median principal angles across training (degrees; full matrices in JSON)",
                            ANGLE_HEADER, angle_rows(doc), {"run", "checkpoint", "stage"})]
    kappas = kappa_rows(doc)
    if kappas:
        out.append(table("Block condition numbers across training (exact: the linearized block; paper: Lemma 1's "
                         "ratio)", KAPPA_HEADER, kappas, {"run", "worst block"}))
    out.extend(Text(note, style="yellow") for note in _notes(doc))
    return out


def trajectory_markdown(doc: Mapping[str, Any]) -> str:
    """The Markdown report: the angles table, the kappa table with ``--condition``, notes."""
    text = "## resdyn trajectory\n\n### Median principal angles (degrees)\n\n" + md_table(ANGLE_HEADER, angle_rows(doc))
    kappas = kappa_rows(doc)
    if kappas:
        text += "\n### Block condition numbers\n\n" + md_table(KAPPA_HEADER, kappas)
    notes = _notes(doc)
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    return text
