"""The ``verify`` report (a store checked chunk by chunk): document, plain lines, table and Markdown."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..io.verify import StoreCheck, problem_line
from .document import report_header

__all__ = ["verify_document", "verify_lines", "verify_tables", "verify_text", "verify_markdown"]


def verify_document(check: StoreCheck) -> dict[str, Any]:
    """The ``verify`` report of a :class:`~auditor.io.verify.StoreCheck`."""
    return {**report_header("verify"), **check.to_dict()}


def _summary(doc: Mapping[str, Any]) -> str:
    store, checked = doc["store"], doc["checked"]
    if not doc["ok"]:
        return f"{store['path']}: {len(doc['problems'])} problem(s)"
    how = "checksums verified" if store["checksums"] == "fletcher32" else "no checksums to verify"
    return (f"{store['path']}: OK ({store['format']} {store['format_version']}, {store['samples']} samples, "
            f"{len(store['stages'])} stages, {checked['chunks']} chunks read back, {how}, values finite)"
            if store["format"] == "resdyn-activations" else
            f"{store['path']}: OK ({store['format']} {store['format_version']}, {checked['datasets']} datasets, "
            f"{checked['chunks']} chunks read back, {how}, values finite)")


def verify_lines(doc: Mapping[str, Any]) -> list[str]:
    """The summary line, then one line per problem (each naming the file)."""
    return [_summary(doc)] + [f"{doc['store']['path']}: {problem_line(p)}" for p in doc["problems"]]


def verify_tables(doc: Mapping[str, Any]) -> list[Any]:
    """The lines as rich text, never wrapped (paths are long)."""
    from rich.text import Text

    return [Text(line, no_wrap=True, overflow="ignore") for line in verify_lines(doc)]


def verify_text(doc: Mapping[str, Any]) -> str:
    """The lines as plain text (the table format, written like Markdown so that nothing wraps)."""
    return "\n".join(verify_lines(doc)) + "\n"


def verify_markdown(doc: Mapping[str, Any]) -> str:
    """The report as Markdown: a heading, the summary line, the problems as a list."""
    lines = verify_lines(doc)
    return "## resdyn verify\n\n" + lines[0] + "\n" + "".join(f"\n- {line}" for line in lines[1:]) + "\n"
