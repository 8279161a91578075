"""``resdyn compare``: two reports side by side, failing on a regression."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import ExitCode
from ._options import Format, FormatOpt, OutputOpt

__all__ = ["register"]

ReportArg = Annotated[Path, typer.Argument(help="A JSON report written by resdyn --format json.", exists=True, dir_okay=False)]
FailOnChangeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--fail-on", help="Rule on the change B - A, e.g. 'max_kappa_linear_residual>0' (repeatable)."),
]


def compare_command(
    report_a: ReportArg,
    report_b: ReportArg,
    fail_on: FailOnChangeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
) -> None:
    """Show two reports side by side (BN vs no-BN, before vs after fine-tuning) and fail on regressions."""
    from ..report.verdict import parse_rule

    rules = [parse_rule(text) for text in fail_on or []]  # malformed rules fail before any work
    from ..report.compare import compare_document
    from ..report.compare_view import compare_markdown, compare_tables
    from ._output import emit

    document = compare_document(report_a, report_b, rules)
    emit(document, fmt, output, table=compare_tables, markdown=compare_markdown)
    if rules and not document["verdict"]["passed"]:
        raise typer.Exit(int(ExitCode.RULE_FAILED))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("compare")(compare_command)
