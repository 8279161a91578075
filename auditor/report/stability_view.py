"""Table and Markdown views of the ``stability`` section (Lemmas 2 and 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from .markdown import checkpoint_markdown, md_table
from .tables import fmt_num, header_text

__all__ = ["stability_tables", "stability_markdown", "stability_report_tables", "stability_report_markdown",
           "worst_gain_note"]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _lower_bound(block: Mapping[str, Any], key: str) -> str:
    """A worst-direction value, as ``>= x`` where its Lanczos run did not meet the residual test."""
    text = fmt_num(block.get(key))
    return f">= {text}" if block.get(f"{key}_converged") is False and block.get(key) is not None else text


def worst_gain_note(section: Mapping[str, Any]) -> str:
    """One line: whether every block's worst gain met the residual test, or which did not (and worst r's)."""
    blocks = section.get("blocks") or []
    searched = [b for b in blocks if b.get("worst_gain_converged") is not None]
    if not searched:
        return ""
    lower = [b["name"] for b in searched if b["worst_gain_converged"] is False]
    tolerance = section.get("power_tolerance")
    test = f"relative Lanczos residual <= {tolerance:g}" if tolerance is not None else "the residual test"
    if not lower:
        line = f"worst gain: converged ({test}) in all {len(searched)} blocks"
    else:
        line = (f"worst gain: {len(lower)} of {len(searched)} blocks are lower bounds ('>='; {test} not met "
                f"within power_iterations): {_names(lower)}")
    r_lower = [b["name"] for b in searched if b.get("worst_r_converged") is False]
    if r_lower:  # worst r's sample may be one the race left after a few steps
        line += (f"; worst r: {len(r_lower)} of {len(searched)} lower bounds ('>='; its sample's run did not "
                 f"meet the test): {_names(r_lower)}")
    return line


def _names(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _block_rows(section: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            b["name"], b.get("shortcut", ""), fmt_num(b.get("r_min")), fmt_num(b.get("r_median")),
            fmt_num(b.get("r_max")), _lower_bound(b, "worst_gain"), _lower_bound(b, "worst_r"),
            _share(b.get("share_in_paper_bounds")), _share(b.get("share_in_linear_bounds")),
        ]
        for b in section["blocks"]
    ]


_BLOCK_HEADER = ["block", "shortcut", "r min", "r median", "r max", "worst gain", "worst r",
                 "in paper bounds", "in exact bounds"]


def stability_tables(section: Mapping[str, Any]) -> list[Any]:
    """Per-block amplification, BatchNorm (Lemma 3) and the end-to-end trajectory."""
    out: list[Any] = []
    table = Table(
        title=f"Perturbation amplification r per block (eps={section['eps']:g}, {section['samples']} samples x "
        f"{section['directions']} directions; Lemma 2 predicts 1/kappa <= r <= kappa)",
        title_justify="left",
    )
    for column in _BLOCK_HEADER:
        table.add_column(column, justify="left" if column in ("block", "shortcut") else "right")
    for row in _block_rows(section):
        table.add_row(*row)
    out.append(table)
    note = worst_gain_note(section)
    if note:
        out.append(Text(note, style="yellow" if ">=" in note else ""))
    if section.get("batchnorm"):
        bn = Table(title="BatchNorm (Lemma 3): relative perturbation after / before", title_justify="left")
        for column in ("layer", "before (median)", "after (median)", "ratio min", "ratio median", "ratio max"):
            bn.add_column(column, justify="left" if column == "layer" else "right")
        for b in section["batchnorm"]:
            bn.add_row(b["name"], fmt_num(b.get("before_median")), fmt_num(b.get("after_median")),
                       fmt_num(b.get("ratio_min")), fmt_num(b.get("ratio_median")), fmt_num(b.get("ratio_max")))
        out.append(bn)
    trajectory = section.get("trajectory") or {}
    points = trajectory.get("points") or []
    if points:
        traj = Table(title="End to end: relative error after each block for an input perturbation eps",
                     title_justify="left")
        for column in ("after", "median", "min", "max"):
            traj.add_column(column, justify="left" if column == "after" else "right")
        for p in [*points, *([trajectory["logits"] | {"name": "logits"}] if trajectory.get("logits") else [])]:
            traj.add_row(p["name"], fmt_num(p.get("median")), fmt_num(p.get("min")), fmt_num(p.get("max")))
        out.append(traj)
        out.append(Text(f"predicted class changed in {trajectory.get('flips', 0)} of {trajectory.get('runs', 0)} runs"))
    return out


def stability_markdown(section: Mapping[str, Any]) -> str:
    """The stability section as Markdown."""
    text = f"Perturbation eps = {section['eps']:g}, {section['samples']} samples x {section['directions']} directions.\n\n"
    text += md_table(_BLOCK_HEADER, _block_rows(section))
    note = worst_gain_note(section)
    if note:
        text += f"\n{note.capitalize()}.\n"
    trajectory = section.get("trajectory") or {}
    if trajectory.get("logits"):
        text += (f"\nEnd to end: median relative error of the logits {fmt_num(trajectory['logits'].get('median'))}; "
                 f"predicted class changed in {trajectory.get('flips', 0)} of {trajectory.get('runs', 0)} runs.\n")
    return text


def stability_report_tables(doc: Mapping[str, Any]) -> list[Any]:
    """The ``stability`` report as tables: the checkpoint's header, then the section."""
    return [header_text(doc), *stability_tables(doc["stability"])]


def stability_report_markdown(doc: Mapping[str, Any]) -> str:
    """The ``stability`` report as Markdown."""
    return "## resdyn stability\n\n" + checkpoint_markdown(doc) + "\n" + stability_markdown(doc["stability"])
