"""``resdyn verify``: check a store written by resdyn, chunk by chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._options import Format, FormatOpt, NoProgressOpt, OutputOpt

__all__ = ["register"]

StoreArg = Annotated[
    Path,
    typer.Argument(help="Activation store (or its .partial, or a --save-spectra file) written by resdyn.",
                   exists=True, dir_okay=False, show_default=False),
]


def verify_command(
    store_path: StoreArg,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Check a store: format, provenance, row counts, every chunk's checksum, finite values (exit 2 when damaged)."""
    from ..errors import StoreError
    from ..io.verify import verify_store
    from ..report.verify_view import verify_document, verify_markdown, verify_tables, verify_text
    from ._output import emit, progress_bar, warn

    with progress_bar("verify", enabled=not no_progress and fmt is not Format.json, unit="datasets") as update:
        check = verify_store(store_path, progress=update)
    document = verify_document(check)
    for note in check.notes:
        warn(f"{store_path}: {note}")
    if fmt is Format.table:  # plain lines, never wrapped (paths are long): written as text, like markdown
        emit(document, Format.markdown, output, table=verify_tables, markdown=verify_text)
    else:
        emit(document, fmt, output, table=verify_tables, markdown=verify_markdown)
    if not check.ok:
        first = check.problems[0].line()
        more = len(check.problems) - 1
        raise StoreError(f"{store_path}: {first}" + (f" (and {more} more problem(s))" if more else ""))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("verify")(verify_command)
