"""Reports for CI systems beside the main one: ``--junit FILE`` and ``--step-summary``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import OutputError, UsageError

__all__ = ["JunitOpt", "StepSummaryOpt", "SUMMARY_LIMIT", "step_summary_file", "write_junit", "append_step_summary",
           "shortened"]

SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"
SUMMARY_LIMIT = 1024 * 1024  # GitHub shows a job summary of at most 1 MiB per step

JunitOpt = Annotated[
    Optional[Path],
    typer.Option("--junit", help="Also write the verdict as JUnit XML to FILE (every --fail-on rule a test case, "
                 "Lemma 1 per block as properties), beside the report in --format.", dir_okay=False,
                 show_default=False),
]
StepSummaryOpt = Annotated[
    bool,
    typer.Option("--step-summary", help=f"Also append the Markdown report to the file named by ${SUMMARY_VARIABLE} "
                 "(a GitHub Actions job summary), shortened with a note below its 1 MiB limit."),
]


def step_summary_file(wanted: bool) -> Path | None:
    """The job summary file when ``--step-summary`` is given; refused before any work when it is not set."""
    if not wanted:
        return None
    value = os.environ.get(SUMMARY_VARIABLE, "")
    if not value:
        raise UsageError(f"--step-summary: ${SUMMARY_VARIABLE} is not set",
                         hint="run inside a GitHub Actions step, or set it to a file to append to")
    return Path(value)


def write_junit(document: Mapping[str, Any], path: Path) -> None:
    """Write the JUnit XML of ``document`` to ``path`` atomically (the report's inputs are never replaced)."""
    from ..io.safe_output import safe_output
    from ..report.junit import junit_report
    from ._output import stderr

    text = junit_report(document)
    try:
        with safe_output(path, [str(document.get("checkpoint", {}).get("path", ""))]) as temporary:
            temporary.write_bytes(text.encode())
    except OutputError as exc:
        exc.hint = "pass --junit a writable path"
        raise
    stderr.print(f"wrote {path}")


def shortened(text: str, room: int) -> str:
    """``text`` whole when it fits ``room`` bytes (UTF-8), else cut at a line with a note saying so."""
    data = text.encode()
    if len(data) <= room:
        return text
    note = (f"\n\n> **Shortened**: this report is {len(data):,} bytes; a job summary holds at most "
            f"{SUMMARY_LIMIT:,}. The whole report is in the JSON or HTML output (`--format json|html -o FILE`).\n")
    keep = data[: max(0, room - len(note.encode()))].decode(errors="ignore")
    return keep[: keep.rfind("\n") + 1] + note


def append_step_summary(path: Path, markdown: str) -> None:
    """Append ``markdown`` to the job summary ``path``, shortened to what is left of its 1 MiB."""
    try:
        used = path.stat().st_size if path.exists() else 0
        with open(path, "a", encoding="utf-8") as summary:
            summary.write(shortened(markdown if markdown.endswith("\n") else markdown + "\n", SUMMARY_LIMIT - used))
    except OSError as exc:
        raise OutputError(path, exc, hint=f"set ${SUMMARY_VARIABLE} to a writable file") from exc
