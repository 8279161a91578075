"""The ``data`` report (the named data sources and what each resolves to): document, table and Markdown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .document import report_header
from .markdown import md_table

__all__ = ["data_document", "data_tables", "data_markdown"]

_HEADER = ("name", "path", "classes", "images", "per class", "status")


def data_document(file: Path, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``data`` report: the configuration file and one entry per source."""
    return {**report_header("data"), "file": str(file), "sources": [dict(entry) for entry in entries]}


def _rows(doc: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for entry in doc["sources"]:
        counts = entry.get("images_per_class", {})
        spread = f"{min(counts.values())}-{max(counts.values())}" if counts else ""
        rows.append((entry["name"], entry["path"], str(len(entry.get("classes", []))) if entry["ok"] else "",
                     f"{entry.get('images', '')} ({spread} per class)" if entry["ok"] else "",
                     str(entry.get("per_class", "all")), "ok" if entry["ok"] else entry["error"]))
    return rows


def data_tables(doc: Mapping[str, Any]) -> list[Any]:
    """The sources as one rich table."""
    from rich.table import Table

    table = Table(title=f"Data sources in {doc['file']}", title_justify="left")
    for column in _HEADER:
        table.add_column(column)
    for row in _rows(doc):
        table.add_row(*row)
    return [table]


def data_markdown(doc: Mapping[str, Any]) -> str:
    """The sources as a Markdown table under a heading."""
    return f"## Data sources in {doc['file']}\n\n" + md_table(_HEADER, _rows(doc))
