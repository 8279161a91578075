"""``resdyn metrics`` and ``resdyn man``: the reference that ships with the program itself.

The metrics are read from :data:`auditor.report.verdict.METRICS` (the rules'
own table), the manual pages are generated from the command line
(:mod:`auditor.cli.manpage`), so both are there after any install, ``pip``
included, and never disagree with the program.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ._options import Format, FormatOpt

__all__ = ["metrics_help", "metrics_rows", "roff_to_text", "register"]


def metrics_rows() -> list[tuple[str, str, str]]:
    """``(metric, section, meaning)`` of every ``--fail-on`` metric, in the rules' order."""
    from ..report.verdict import METRICS

    return [(name, metric.section, metric.help) for name, metric in METRICS.items()]


def metrics_help() -> str:
    """The metrics as one line each, for an option's help (kept unwrapped by click's ``\\b`` marker)."""
    rows = metrics_rows()
    width = max(len(name) for name, _, _ in rows)
    return "\n\n\b\n" + "\n".join(f"{name:<{width}}  {meaning}" for name, _, meaning in rows)


def metrics_command(fmt: FormatOpt = Format.table) -> None:
    """The metrics --fail-on rules compare, one line each: name, report section, meaning."""
    rows = metrics_rows()
    if fmt is Format.json:
        print(json.dumps([{"metric": m, "section": s, "meaning": h} for m, s, h in rows], indent=2))
        return
    if fmt is not Format.table:
        raise UsageError(f"resdyn metrics prints a table or JSON, not {fmt.value}", hint="pass --format table or json")
    width = max(len(m) for m, _, _ in rows)
    section = max(len(s) for _, s, _ in rows)
    for metric, where, meaning in rows:
        print(f"{metric:<{width}}  {where:<{section}}  {meaning}")


_INLINE = [(re.compile(r"\\f(\(CW|[BIRP])"), ""), (re.compile(r"\\-"), "-"), (re.compile(r"\\&"), ""),
           (re.compile(r"\\e"), "\\\\")]


def _inline(text: str) -> str:
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return text


def roff_to_text(roff: str, width: int = 78) -> str:
    """Plain text of a page in the roff subset :mod:`auditor.cli.manpage` writes (where ``man`` is missing)."""
    out: list[str] = []
    indent, tag_next, in_tag = 0, False, False
    for line in roff.splitlines():
        if line.startswith(".TH"):
            parts = line.split()
            out.append(f"{_inline(parts[1])}({parts[2]})" if len(parts) > 2 else "")
        elif line.startswith(".SH"):
            out += ["", _inline(line[4:]).strip()]
            indent, in_tag = 7, False
        elif line.startswith(".TP"):
            tag_next, in_tag = True, True
        elif line.startswith(".PP"):
            out.append("")
            in_tag = False
        elif line.startswith(".RS"):
            indent += 4
        elif line.startswith(".RE"):
            indent -= 4
        elif line.startswith(".br"):
            continue
        elif tag_next:
            out.append(" " * 7 + _inline(line))
            tag_next = False
        else:
            pad = " " * (14 if in_tag else indent)
            text = _inline(line)
            out += textwrap.wrap(text, width, initial_indent=pad, subsequent_indent=pad) or [""]
    return "\n".join(out) + "\n"


def man_command(
    command: Annotated[Optional[str], typer.Argument(help="A command (audit, condition, ...); none: resdyn(1).",
                                                     show_default=False)] = None,
    roff: Annotated[bool, typer.Option("--roff", help="Print the page's roff source (to install it: "
                                       "resdyn man audit --roff > ~/.local/share/man/man1/resdyn-audit.1).")] = False,
) -> None:
    """Show a manual page: through man(1) on a terminal, as plain text otherwise."""
    from .manpage import render_pages

    pages = render_pages()
    name = "resdyn.1" if command in (None, "resdyn") else f"resdyn-{command}.1"
    if name not in pages:
        known = ", ".join(sorted(p[len("resdyn-"):-2] for p in pages if p != "resdyn.1"))
        raise UsageError(f"no manual page for {command!r}", hint=f"one of: {known}")
    page = pages[name]
    if roff:
        sys.stdout.write(page)
        return
    viewer = shutil.which("man")
    if viewer and sys.stdout.isatty():
        with tempfile.TemporaryDirectory(prefix="resdyn-man-") as folder:
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(page)
            subprocess.run([viewer, "-l", path], check=False)
        return
    sys.stdout.write(roff_to_text(page))


def register(app: typer.Typer) -> None:
    """Add ``metrics`` and ``man`` to the app."""
    app.command("metrics")(metrics_command)
    app.command("man")(man_command)
