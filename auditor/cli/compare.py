"""``resdyn compare``: two reports side by side, failing on a regression."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import ExitCode
from ._options import Format, FormatOpt, OutputOpt

__all__ = ["register"]

ReportArg = Annotated[Path, typer.Argument(help="A JSON report written by resdyn --format json.", exists=True, dir_okay=False)]
FailOnChangeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--fail-on", help="Rule on the change B - A, e.g. 'max_kappa_linear_residual>0' (repeatable)."),
]


def _change(value: float | None) -> str:
    from ..report.tables import fmt_num

    return "-" if value is None else ("+" if value > 0 else "") + fmt_num(value)


def _tables(doc: dict[str, Any]) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    from ..report.tables import fmt_num

    out: list[Any] = [Text(f"A: {doc['a']['path']} ({doc['a']['arch']})\nB: {doc['b']['path']} ({doc['b']['arch']})")]
    table = Table(title="Metrics", title_justify="left")
    for column in ("metric", "A", "B", "B - A"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for m in doc["comparison"]["metrics"]:
        table.add_row(m["metric"], fmt_num(m["a"]), fmt_num(m["b"]), _change(m["change"]))
    out.append(table)
    if doc["comparison"]["blocks"]:
        blocks = Table(title="Exact block kappa (matching block names)", title_justify="left")
        for column in ("block", "A", "B"):
            blocks.add_column(column)
        for b in doc["comparison"]["blocks"]:
            blocks.add_row(b["name"], fmt_num(b["a"]), fmt_num(b["b"]))
        out.append(blocks)
    if doc.get("verdict", {}).get("rules"):
        for rule in doc["verdict"]["rules"]:
            style = "green" if rule["passed"] else "bold red"
            out.append(Text(f"{'PASS' if rule['passed'] else 'FAIL'} {rule['rule']} (change {_change(rule['value'])})", style=style))
    return out


def _markdown(doc: dict[str, Any]) -> str:
    from ..report.markdown import md_table
    from ..report.tables import fmt_num

    rows = [[m["metric"], fmt_num(m["a"]), fmt_num(m["b"]), _change(m["change"])] for m in doc["comparison"]["metrics"]]
    return (f"## resdyn compare\n\nA: `{doc['a']['path']}` ({doc['a']['arch']})  \nB: `{doc['b']['path']}` "
            f"({doc['b']['arch']})\n\n" + md_table(["metric", "A", "B", "B - A"], rows))


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
    from ..report.compare import compare_reports, evaluate_changes, load_report
    from ..report.document import report_header
    from ._output import emit

    a, b = load_report(report_a), load_report(report_b)
    comparison = compare_reports(a, b)

    def side(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
        ck = doc.get("checkpoint", {})
        return {"path": str(path), "arch": ck.get("arch"), "sha256": ck.get("sha256")}

    document = {
        **report_header("compare"),
        "a": side(report_a, a),
        "b": side(report_b, b),
        "comparison": comparison,
    }
    if rules:
        document["verdict"] = evaluate_changes(rules, comparison)
    emit(document, fmt, output, table=_tables, markdown=_markdown)
    if rules and not document["verdict"]["passed"]:
        raise typer.Exit(int(ExitCode.RULE_FAILED))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("compare")(compare_command)
