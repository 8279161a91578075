"""Views of the full audit report: rich tables and a Markdown report for pull requests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.text import Text

from .angles_view import angles_markdown_table, angles_table
from .condition_view import blocks_markdown, blocks_table, summary_text
from .markdown import checkpoint_markdown
from .nonfinite import INFINITE
from .stability_view import stability_markdown, stability_tables
from .tables import fmt_num, header_text
from .verdict import verdict_headline

__all__ = ["audit_tables", "audit_markdown", "verdict_lines", "measured_text"]


def measured_text(rule: Mapping[str, Any]) -> str:
    """A rule's measured value: the number, ``inf (why)`` or ``undefined (why)``."""
    if rule["value"] is not None:
        return fmt_num(rule["value"])
    sign = (rule.get(INFINITE) or {}).get("value")
    return f"{sign or 'undefined'} ({rule.get('reason', '')})"


def verdict_lines(doc: Mapping[str, Any]) -> list[Text]:
    """PASS / FAIL per rule with the measured value, then the verdict and one line of findings."""
    verdict = doc.get("verdict") or {}
    lines = []
    for rule in verdict.get("rules", []):
        value = measured_text(rule)
        label, style = ("PASS", "bold green") if rule["passed"] else ("FAIL", "bold red")
        lines.append(Text(f"{label}  {rule['rule']}  (measured {value})", style=style))
    status, found = verdict_headline(doc)
    style = {"passed": "bold green", "FAILED": "bold red"}.get(status, "bold yellow")
    line = Text(f"verdict: {status}", style=style)
    line.append(f"; findings: {found}", style="")
    lines.append(line)
    return lines


def audit_tables(doc: Mapping[str, Any]) -> list[Any]:
    """Every section of the audit, in reading order."""
    out: list[Any] = [header_text(doc), blocks_table(doc), summary_text(doc)]
    if doc.get("stages"):
        out += angles_table(doc["stages"])
    if doc.get("stability"):
        out += stability_tables(doc["stability"])
    for note in doc.get("notes", []):
        out.append(Text(f"note: {note}", style="yellow"))
    out += verdict_lines(doc)
    return out


def audit_markdown(doc: Mapping[str, Any]) -> str:
    """The audit as a Markdown report."""
    verdict = doc.get("verdict") or {}
    status, found = verdict_headline(doc)
    status = "**FAILED**" if status == "FAILED" else status
    parts = [f"## resdyn audit: {status}\n\n**Findings**: {found}\n\n", checkpoint_markdown(doc)]
    if doc.get("data"):
        d = doc["data"]
        parts.append(f"**Data** `{d['root']}`: {sum(d['samples_per_class'].values())} images in {len(d['classes'])} classes\n")
    parts += ["\n### Conditioning (Lemma 1)\n\n", blocks_markdown(doc)]
    if doc.get("stages"):
        parts += ["\n### Class geometry: median principal angles (degrees)\n\n", angles_markdown_table(doc["stages"])]
    if doc.get("stability"):
        parts += ["\n### Stability (Lemmas 2 and 3)\n\n", stability_markdown(doc["stability"])]
    if verdict.get("rules"):
        parts.append("\n### Verdict\n\n")
        for rule in verdict["rules"]:
            mark = "pass" if rule["passed"] else "**FAIL**"
            parts.append(f"- {mark} `{rule['rule']}` (measured {measured_text(rule)})\n")
    for note in doc.get("notes", []):
        parts.append(f"\n> {note}\n")
    return "".join(parts)
