"""``resdyn data``: the named data sources and what each resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ._options import Format, FormatOpt, OutputOpt

__all__ = ["register", "data_command", "data_document"]

DirOpt = Annotated[
    Optional[Path],
    typer.Option("--dir", help="Folder whose resdyn.toml / pyproject.toml to read (default: the current one).",
                 exists=True, file_okay=False),
]


def _describe(source: Any) -> dict[str, Any]:
    """A source's entry: its keys, and the classes and images its path holds (or why it cannot be read)."""
    from ..errors import AuditorError
    from ..io.images import images_per_class, scan_image_folder, select_samples

    entry: dict[str, Any] = {"name": source.name, "path": str(source.path),
                             **{k: list(v) if isinstance(v, tuple) else v for k, v in source.options.items()}}
    try:
        index = scan_image_folder(source.path, source.options.get("classes"))
        entry.update(classes=list(index.classes), images_per_class=images_per_class(index.classes, index.samples),
                     images=len(index.samples))
        select_samples(index, source.options.get("per_class"), source.options.get("seed", 0))
        entry["ok"] = True
    except AuditorError as exc:
        entry.update(ok=False, error=exc.one_line())
    return entry


def data_document(file: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``data`` report: the configuration file and one entry per source."""
    from ..report.document import report_header

    return {**report_header("data"), "file": str(file), "sources": entries}


def _table(doc: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    table = Table(title=f"Data sources in {doc['file']}", title_justify="left")
    for column in ("name", "path", "classes", "images", "per class", "status"):
        table.add_column(column)
    for row in _rows(doc):
        table.add_row(*row)
    return [table]


def _markdown(doc: dict[str, Any]) -> str:
    lines = [f"## Data sources in {doc['file']}", "", "| name | path | classes | images | per class | status |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _rows(doc)]
    return "\n".join(lines) + "\n"


def _rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for entry in doc["sources"]:
        counts = entry.get("images_per_class", {})
        spread = f"{min(counts.values())}-{max(counts.values())}" if counts else ""
        rows.append((entry["name"], entry["path"], str(len(entry.get("classes", []))) if entry["ok"] else "",
                     f"{entry.get('images', '')} ({spread} per class)" if entry["ok"] else "",
                     str(entry.get("per_class", "all")), "ok" if entry["ok"] else entry["error"]))
    return rows


def data_command(fmt: FormatOpt = Format.table, output: OutputOpt = None, folder: DirOpt = None) -> None:
    """List the data sources of ./resdyn.toml (or ./pyproject.toml) and what each resolves to.

    Exit 2 when a source cannot be used (missing folder, unknown class, too few images).
    """
    from ..errors import DataError, UsageError
    from ..io.data_sources import load_data_sources
    from ._output import emit

    sources, file = load_data_sources(folder)
    if file is None:
        raise UsageError("no data sources: neither ./resdyn.toml has [data.NAME] tables nor ./pyproject.toml "
                         "[tool.resdyn.data.NAME]", hint="declare one with path = \"folder\" (see 'resdyn man data')")
    document = data_document(file, [_describe(source) for source in sources.values()])
    emit(document, fmt, output, table=_table, markdown=_markdown)
    broken = [e for e in document["sources"] if not e["ok"]]
    if broken:  # the report lists every source; the exit code and one line say that one cannot be used
        raise DataError(f"data source {broken[0]['name']!r}: {broken[0]['error']}"
                        + (f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("data")(data_command)
