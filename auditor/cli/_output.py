"""One output sink: the report to stdout (or ``-o FILE``), everything else to stderr."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from ..report.document import dumps, write_atomic
from ._options import Format

__all__ = ["stderr", "emit", "progress_bar", "warn"]

stderr = Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    """One warning line on stderr."""
    stderr.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def _render_text(renderables: list[RenderableType], width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None, highlight=False)
    for renderable in renderables:
        console.print(renderable)
    return buffer.getvalue()


def emit(
    document: Mapping[str, Any],
    fmt: Format,
    output: Path | None,
    *,
    table: Callable[[Mapping[str, Any]], list[RenderableType]],
    markdown: Callable[[Mapping[str, Any]], str] | None = None,
) -> None:
    """Render ``document`` in ``fmt`` to stdout, or atomically to ``output``."""
    if fmt is Format.json:
        text = dumps(document)
    elif fmt is Format.markdown:
        if markdown is None:
            raise ValueError("this command has no markdown renderer")
        text = markdown(document)
    else:
        renderables = table(document)
        if output is None:
            # Piped output keeps every column readable instead of rich's 80-column default.
            console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
            for renderable in renderables:
                console.print(renderable)
            return
        text = _render_text(renderables)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(output, text)
        stderr.print(f"wrote {output}")


@contextmanager
def progress_bar(description: str, *, enabled: bool, unit: str = "") -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a rich bar on stderr when enabled."""
    show = enabled and stderr.is_terminal and not os.environ.get("CI")
    if not show:
        yield lambda done, total: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            elapsed = bar.tasks[0].elapsed or 0.0
            rate = f"{done / elapsed:.1f} {unit}/s" if unit and elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update
