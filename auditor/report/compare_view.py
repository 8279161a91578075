"""Table and Markdown views of the ``compare`` report."""

from __future__ import annotations

from typing import Any

__all__ = ["compare_tables", "compare_markdown"]


def _change(value: float | None) -> str:
    from ..report.tables import fmt_num

    return "-" if value is None else ("+" if value > 0 else "") + fmt_num(value)


def compare_tables(doc: dict[str, Any]) -> list[Any]:
    """The rich renderables of a ``compare`` report: the two sides, the metrics, the block kappas, the rules."""
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


def compare_markdown(doc: dict[str, Any]) -> str:
    """A ``compare`` report as Markdown."""
    from ..report.markdown import md_table
    from ..report.tables import fmt_num

    rows = [[m["metric"], fmt_num(m["a"]), fmt_num(m["b"]), _change(m["change"])] for m in doc["comparison"]["metrics"]]
    return (f"## resdyn compare\n\nA: `{doc['a']['path']}` ({doc['a']['arch']})  \nB: `{doc['b']['path']}` "
            f"({doc['b']['arch']})\n\n" + md_table(["metric", "A", "B", "B - A"], rows))
