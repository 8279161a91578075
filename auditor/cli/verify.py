"""``resdyn verify``: check a store written by resdyn, chunk by chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._options import Format, FormatOpt, NoProgressOpt, OutputOpt

__all__ = ["register", "verify_document"]

StoreArg = Annotated[
    Path,
    typer.Argument(help="Activation store (or its .partial, or a --save-spectra file) written by resdyn.",
                   exists=True, dir_okay=False, show_default=False),
]


def verify_document(check: Any) -> dict[str, Any]:
    """The ``verify`` report of a :class:`~auditor.io.verify.StoreCheck`."""
    from ..report.document import report_header

    return {**report_header("verify"), **check.to_dict()}


def _summary(doc: dict[str, Any]) -> str:
    store, checked = doc["store"], doc["checked"]
    if not doc["ok"]:
        return f"{store['path']}: {len(doc['problems'])} problem(s)"
    how = "checksums verified" if store["checksums"] == "fletcher32" else "no checksums to verify"
    return (f"{store['path']}: OK ({store['format']} {store['format_version']}, {store['samples']} samples, "
            f"{len(store['stages'])} stages, {checked['chunks']} chunks read back, {how}, values finite)"
            if store["format"] == "resdyn-activations" else
            f"{store['path']}: OK ({store['format']} {store['format_version']}, {checked['datasets']} datasets, "
            f"{checked['chunks']} chunks read back, {how}, values finite)")


def _lines(doc: dict[str, Any]) -> list[str]:
    from ..io.verify import problem_line

    return [_summary(doc)] + [f"{doc['store']['path']}: {problem_line(p)}" for p in doc["problems"]]


def _tables(doc: dict[str, Any]) -> list[Any]:
    from rich.text import Text

    return [Text(line, no_wrap=True, overflow="ignore") for line in _lines(doc)]


def _markdown(doc: dict[str, Any]) -> str:
    lines = _lines(doc)
    return "## resdyn verify\n\n" + lines[0] + "\n" + "".join(f"\n- {line}" for line in lines[1:]) + "\n"


def verify_command(
    store_path: StoreArg,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Check a store: format, provenance, row counts, every chunk's checksum, finite values (exit 2 when damaged)."""
    from ..errors import StoreError
    from ..io.verify import verify_store
    from ._output import emit, progress_bar, warn

    with progress_bar("verify", enabled=not no_progress and fmt is not Format.json, unit="datasets") as update:
        check = verify_store(store_path, progress=update)
    document = verify_document(check)
    for note in check.notes:
        warn(f"{store_path}: {note}")
    if fmt is Format.table:  # plain lines, never wrapped (paths are long): written as text, like markdown
        emit(document, Format.markdown, output, table=_tables, markdown=lambda doc: "\n".join(_lines(doc)) + "\n")
    else:
        emit(document, fmt, output, table=_tables, markdown=_markdown)
    if not check.ok:
        first = check.problems[0].line()
        more = len(check.problems) - 1
        raise StoreError(f"{store_path}: {first}" + (f" (and {more} more problem(s))" if more else ""))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("verify")(verify_command)
