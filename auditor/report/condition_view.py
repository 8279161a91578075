"""Table and Markdown views of the conditioning sections (``layers``, ``blocks``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from .markdown import checkpoint_markdown, md_table
from .nonfinite import names, shown
from .tables import fmt_num

__all__ = ["blocks_table", "summary_text", "condition_tables", "condition_markdown", "blocks_markdown"]


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def _kappa(entry: Mapping[str, Any], key: str) -> str:
    """A kappa cell: the number, ``inf`` for a singular operator, ``-`` when there is none."""
    return shown(entry, key, fmt_num)


def _sigmas(block: Mapping[str, Any]) -> str:
    return " ".join(f"{fmt_num(s['max'], 3)}/{fmt_num(s['min'], 3)}" for s in block.get("sigma", []))


# the caption's words for each rule of the linearization (auditor.models.block_graph.RULES)
_RULE_LABELS = {
    "activation": "activations as identity",
    "batchnorm": "BN eval affine",
    "layernorm": "LayerNorm as its affine part",
    "groupnorm": "GroupNorm as its affine part",
    "gate": "SE gates as 1",
    "scale": "layer scale kept",
    "dropout": "drop path as identity",
    "per_position_linear": "per-position Linear as 1x1 conv",
}


def linearization_caption(blocks: list[Mapping[str, Any]]) -> str:
    """The rules the blocks' linearizations applied, in rule order (reports without them: ReLU)."""
    used = {entry["rule"] for block in blocks for entry in block.get("linearization", [])}
    if not used:
        return "ReLU as identity"
    return ", ".join(label for rule, label in _RULE_LABELS.items() if rule in used)


def blocks_table(doc: Mapping[str, Any]) -> Table:
    """Blocks in order, stages as groups, the worst block highlighted."""
    summary = doc.get("summary", {})
    worst = summary.get("worst_block")
    caption = linearization_caption(doc["blocks"])
    boundary = doc.get("config", {}).get("boundary", "circular")
    table = Table(title=f"Block conditioning ({boundary} boundary, linearized: {caption})", title_justify="left")
    for column, justify in [
        ("block", "left"), ("shortcut", "left"), ("sigma max/min per conv", "left"),
        ("kappa paper res", "right"), ("kappa paper plain", "right"), ("kappa exact res", "right"),
        ("kappa exact plain", "right"), ("L1 upper", "center"), ("L1 lower", "center"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    previous_stage = None
    for block in doc["blocks"]:
        if block["stage"] != previous_stage:
            if previous_stage is not None:
                table.add_section()
            table.add_row(Text(block["stage"], style="bold cyan"))
            previous_stage = block["stage"]
        style = "bold red" if block["name"] == worst else None
        table.add_row(
            "  " + block["name"], block["shortcut"], _sigmas(block),
            _kappa(block, "kappa_paper_residual"), _kappa(block, "kappa_paper_plain"),
            _kappa(block, "kappa_linear_residual"), _kappa(block, "kappa_linear_plain"),
            _yes_no(block.get("lemma1_upper_holds")), _yes_no(block.get("lemma1_lower_holds")),
            style=style,
        )
    return table


def _summary_kappa(summary: Mapping[str, Any], key: str) -> str:
    """A summary kappa: the number, ``inf`` (a singular block), ``undefined`` (its reason in JSON) or ``-``."""
    return shown(summary, key, fmt_num, "undefined" if summary.get(f"{key}_reason") else "-")


def summary_text(doc: Mapping[str, Any]) -> Text:
    """One summary line: Lemma 1 violations, largest and median kappas, the singular blocks."""
    s = doc.get("summary", {})
    text = Text()
    violations = s.get("lemma1_lower_violations", 0)
    text.append(
        f"{violations} of {s.get('residual_blocks', s.get('blocks', 0))} residual blocks violate Lemma 1's lower bound",
        style="bold red" if violations else "bold green",
    )
    text.append(
        f"; exact kappa max {_summary_kappa(s, 'max_kappa_linear_residual')} "
        f"({s.get('worst_block') or '-'}), median {_summary_kappa(s, 'median_kappa_linear_residual')}; "
        f"paper kappa max {_summary_kappa(s, 'max_kappa_paper_residual')}, "
        f"median {_summary_kappa(s, 'median_kappa_paper_residual')}; "
        f"exact kappa without shortcuts max {_summary_kappa(s, 'max_kappa_linear_plain')}"
    )
    singular = s.get("singular_block_names")
    if singular:
        text.append(f"; {len(singular)} of {s.get('blocks', len(singular))} blocks singular (kappa infinite): "
                    f"{names(singular)}", style="bold red")
    elif s.get("singular_blocks"):  # reports before the names were written
        text.append(f"; {s['singular_blocks']} singular block(s) (kappa null)", style="yellow")
    undefined = s.get("undefined_blocks") or {}
    if undefined:
        first, reason = next(iter(undefined.items()))
        text.append(f"; {len(undefined)} block(s) without a kappa: {names(list(undefined))} ({first}: {reason})",
                    style="yellow")
    return text


def _layers_table(doc: Mapping[str, Any]) -> Table:
    table = Table(title="Layers as operators", title_justify="left")
    for column in ("layer", "input", "sigma max", "sigma min", "kappa", "BN folded", "method"):
        table.add_column(column)
    for layer in doc["layers"]:
        table.add_row(
            layer["name"], "x".join(map(str, layer["input_shape"])), fmt_num(layer["sigma_max"]),
            fmt_num(layer["sigma_min"]), fmt_num(layer["kappa"]), layer.get("batchnorm_folded") or "-",
            layer["method"] + ("" if layer.get("converged", True) else " (NOT converged)"),
        )
    return table


def condition_tables(doc: Mapping[str, Any]) -> list[Any]:
    """Renderables of ``resdyn condition``."""
    from .tables import header_text

    return [header_text(doc), _layers_table(doc), blocks_table(doc), summary_text(doc)]


def blocks_markdown(doc: Mapping[str, Any]) -> str:
    """The blocks table as Markdown (worst block in bold)."""
    worst = doc.get("summary", {}).get("worst_block")
    rows = []
    for b in doc["blocks"]:
        name = f"**{b['name']}**" if b["name"] == worst else b["name"]
        rows.append([
            name, b["stage"], b["shortcut"], _kappa(b, "kappa_paper_residual"),
            _kappa(b, "kappa_linear_residual"), _kappa(b, "kappa_linear_plain"),
            _yes_no(b.get("lemma1_upper_holds")), _yes_no(b.get("lemma1_lower_holds")),
        ])
    return md_table(
        ["block", "stage", "shortcut", "kappa paper", "kappa exact", "kappa exact plain", "Lemma 1 upper", "Lemma 1 lower"],
        rows,
    ) + "\n" + summary_text(doc).plain + "\n"


def condition_markdown(doc: Mapping[str, Any]) -> str:
    """The ``condition`` report as Markdown."""
    return "## resdyn condition\n\n" + checkpoint_markdown(doc) + "\n### Blocks\n\n" + blocks_markdown(doc)
