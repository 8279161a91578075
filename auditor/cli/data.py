"""``resdyn data``: the named data sources and what each resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import Format, FormatOpt, OutputOpt

__all__ = ["register", "data_command"]

DirOpt = Annotated[
    Optional[Path],
    typer.Option("--dir", help="Folder whose resdyn.toml / pyproject.toml to read (default: the current one).",
                 exists=True, file_okay=False),
]


def data_command(fmt: FormatOpt = Format.table, output: OutputOpt = None, folder: DirOpt = None) -> None:
    """List the data sources of ./resdyn.toml (or ./pyproject.toml) and what each resolves to.

    Exit 2 when a source cannot be used (missing folder, unknown class, too few images).
    """
    from ..errors import DataError
    from ..report.data_view import data_markdown, data_tables
    from ..tasks.sources import data_sources
    from ._output import emit

    document = data_sources(folder)
    emit(document, fmt, output, table=data_tables, markdown=data_markdown)
    broken = [e for e in document["sources"] if not e["ok"]]
    if broken:  # the report lists every source; the exit code and one line say that one cannot be used
        raise DataError(f"data source {broken[0]['name']!r}: {broken[0]['error']}"
                        + (f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("data")(data_command)
