"""The options of the reports for CI systems beside the main one: ``--junit FILE`` and ``--step-summary``.

The reports themselves are written by :mod:`auditor.report.junit` and :mod:`auditor.report.step_summary`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import OutputError, UsageError
from ..report.step_summary import SUMMARY_VARIABLE

__all__ = ["JunitOpt", "StepSummaryOpt", "step_summary_file", "junit_to"]

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


def junit_to(document: Mapping[str, Any], path: Path) -> None:
    """``--junit FILE``: :func:`auditor.report.junit.write_junit`, a failure's hint naming the option."""
    from ..report.junit import write_junit
    from ._output import stderr

    try:
        write_junit(document, path)
    except OutputError as exc:
        exc.hint = "pass --junit a writable path"
        raise
    stderr.print(f"wrote {path}")
