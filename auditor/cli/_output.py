"""One output sink: the report to stdout (or ``-o FILE``), everything else to stderr."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._options import Format

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["stderr", "emit", "progress_bar", "warn"]

# rich's Console and Progress and the report writers are imported on first use, not with the
# command line: ``resdyn --help``, a usage error and shell completion need none of them.


@cache
def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def __getattr__(name: str) -> Any:
    if name == "stderr":  # ``from ._output import stderr``: the stderr console, made on first use
        return _stderr_console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warn(message: str) -> None:
    """One warning line on stderr."""
    _stderr_console().print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def _render_text(renderables: list[RenderableType], width: int = 120) -> str:
    from rich.console import Console

    from ..report.fit import fit_renderables

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    for renderable in fit_renderables(renderables):
        console.print(renderable)
    return buffer.getvalue()


def emit(
    document: Mapping[str, Any],
    fmt: Format,
    output: Path | None,
    *,
    table: Callable[[Mapping[str, Any]], list[RenderableType]],
    markdown: Callable[[Mapping[str, Any]], str] | None = None,
    figures: Sequence[Path] = (),
) -> None:
    """Render ``document`` in ``fmt`` to stdout, or atomically to ``output`` (under torchrun: rank 0 only).

    ``figures`` (PNG files the run drew) are embedded in the HTML report.
    """
    from ..distributed import world
    from ..report.document import dumps

    if not world().is_main:
        return

    checkpoint = document.get("checkpoint")
    if isinstance(checkpoint, Mapping) and checkpoint.get("converted_from"):  # every format, on stderr
        warn(f"{checkpoint['path']}: weights stored as {checkpoint['converted_from']} were converted to float32 "
             "for the analysis")
    if fmt is Format.json:
        text = dumps(document)
    elif fmt is Format.markdown:
        if markdown is None:
            raise ValueError("this command has no markdown renderer")
        text = markdown(document)
    elif fmt is Format.html:
        from ..report.html import html_report

        text = html_report(document, table(document), figures)
    elif fmt is Format.junit:
        from ..report.junit import junit_report

        text = junit_report(document)
    else:
        renderables = table(document)
        if output is None:
            from rich.console import Console

            from ..report.fit import fit_renderables

            # Tables fit the terminal (or COLUMNS); piped output is 140 wide instead of rich's 80.
            wide = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
            console = Console(highlight=False, width=None if wide else 140)
            for renderable in fit_renderables(renderables):
                console.print(renderable)
            return
        text = _render_text(renderables)
    from ..errors import OutputError

    if output is None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # stdout redirected to a full or read-only file system
            raise OutputError("stdout", exc, hint="redirect to a writable location, or pass -o FILE") from exc
    else:
        _write_output(output, text, document)
        _stderr_console().print(f"wrote {output}")


def _named_files(value: Any, found: list[str]) -> list[str]:
    """Every string in a report that could name a file (the checkpoint, a store): ``-o`` must not replace one."""
    if isinstance(value, str):
        if 0 < len(value) < 4096 and "\n" not in value and "\0" not in value:
            found.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _named_files(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _named_files(item, found)
    return found


def _write_output(output: Path, text: str, document: Mapping[str, Any]) -> None:
    """``-o FILE``: a regular file or a new name in an existing folder, never an input; written atomically."""
    from ..errors import OutputError
    from ..io.safe_output import OutputRefused, safe_output

    try:
        with safe_output(output, _named_files(document, [])) as temporary:
            temporary.write_bytes(text.encode())
    except OutputRefused:
        raise
    except OutputError as exc:
        exc.hint = "pass -o/--output a writable path with enough free space"
        raise


@contextmanager
def progress_bar(description: str, *, enabled: bool, unit: str = "") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a rich bar on stderr when enabled.

    Its ``note(text)`` method shows ``text`` at the end of the line (absent when not drawn).
    """
    stderr = _stderr_console()
    show = enabled and stderr.is_terminal and not os.environ.get("CI")
    if not show:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    ]
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None, rate="", note="")

        def update(done: int, total: int) -> None:
            elapsed = bar.tasks[0].elapsed or 0.0
            rate = f"{done / elapsed:.1f} {unit}/s" if unit and elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        def note(text: str) -> None:
            bar.update(task, note=text)

        update.note = note  # type: ignore[attr-defined]  # e.g. the store's estimated size, before the first image
        yield update
