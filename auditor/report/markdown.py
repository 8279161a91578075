"""Markdown renderers: reports a person pastes into a pull request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .tables import fmt_shape

__all__ = ["md_table", "inspect_markdown", "checkpoint_markdown"]


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def checkpoint_markdown(doc: Mapping[str, Any]) -> str:
    """The header shared by every Markdown report."""
    ck = doc["checkpoint"]
    converted = f"  \n**Weights** stored as {ck['converted_from']}, analysed as float32" if ck.get("converted_from") else ""
    return (
        f"**Checkpoint** `{ck['path']}` ({ck['format']}, sha256 `{ck['sha256'][:12]}`)  \n"
        f"**Architecture** `{ck['arch']}` ({ck['arch_source']}: {ck['arch_reason']})  \n"
        f"**Parameters** {ck['parameters']:,}, **classes** {ck['num_classes']}, "
        f"**input** {fmt_shape(doc.get('input_shape'))}{converted}\n"
    )


def inspect_markdown(doc: Mapping[str, Any]) -> str:
    """The ``inspect`` report as Markdown."""
    parts = ["## resdyn inspect\n", checkpoint_markdown(doc), "\n### Residual blocks\n"]
    parts.append(
        md_table(
            ["block", "stage", "convolutions", "BN", "shortcut", "input", "output"],
            [
                [
                    b["name"], b["stage"],
                    ", ".join(f"{c['name']} {c['in_channels']}->{c['out_channels']} "
                              f"{fmt_shape(c['kernel'])}/s{c['stride'][0]}" for c in b["convs"]),
                    "yes" if b["batchnorm"] else "no", b["shortcut"],
                    fmt_shape(b["input_shape"]), fmt_shape(b["output_shape"]),
                ]
                for b in doc["blocks"]
            ],
        )
    )
    parts.append("\n### Stages\n")
    stages = doc["stages"] + ([doc["penultimate"]] if doc.get("penultimate") else [])
    parts.append(md_table(["stage", "captured at", "shape"],
                          [[s["name"], s["module_path"], fmt_shape(s["shape"])] for s in stages]))
    return "".join(parts)


