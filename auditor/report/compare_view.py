"""Table and Markdown views of the ``compare`` report."""

from __future__ import annotations

from typing import Any

__all__ = ["compare_tables", "compare_markdown"]


def _cell(entry: dict[str, Any], key: str) -> str:
    """A value of the comparison: the number, ``inf`` / ``-inf`` (a singular block), or ``-``."""
    from ..report.nonfinite import shown
    from ..report.tables import fmt_num

    return shown(entry, key, fmt_num)


def _change(entry: dict[str, Any], key: str = "change") -> str:
    """A change B - A with its sign: ``+12.5``, ``-3``, ``+inf``, ``-inf`` or ``-``."""
    text = _cell(entry, key)
    value = entry.get(key)
    return "+" + text if (value is not None and value > 0) or text == "inf" else text


def compare_tables(doc: dict[str, Any]) -> list[Any]:
    """The rich renderables of a ``compare`` report: the two sides, the metrics, the block kappas, the rules."""
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = [Text(f"A: {doc['a']['path']} ({doc['a']['arch']})\nB: {doc['b']['path']} ({doc['b']['arch']})")]
    table = Table(title="Metrics", title_justify="left")
    for column in ("metric", "A", "B", "B - A"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for m in doc["comparison"]["metrics"]:
        table.add_row(m["metric"], _cell(m, "a"), _cell(m, "b"), _change(m))
    out.append(table)
    if doc["comparison"]["blocks"]:
        blocks = Table(title="Exact block kappa (matching block names)", title_justify="left")
        for column in ("block", "A", "B"):
            blocks.add_column(column)
        for b in doc["comparison"]["blocks"]:
            blocks.add_row(b["name"], _cell(b, "a"), _cell(b, "b"))
        out.append(blocks)
    if doc.get("verdict", {}).get("rules"):
        for rule in doc["verdict"]["rules"]:
            style = "green" if rule["passed"] else "bold red"
            change = _change(rule, "value")
            if rule["value"] is None and rule.get("reason"):
                change += f": {rule['reason']}"
            out.append(Text(f"{'PASS' if rule['passed'] else 'FAIL'} {rule['rule']} (change {change})", style=style))
    return out


def compare_markdown(doc: dict[str, Any]) -> str:
    """A ``compare`` report as Markdown."""
    from ..report.markdown import md_table

    rows = [[m["metric"], _cell(m, "a"), _cell(m, "b"), _change(m)] for m in doc["comparison"]["metrics"]]
    return (f"## resdyn compare\n\nA: `{doc['a']['path']}` ({doc['a']['arch']})  \nB: `{doc['b']['path']}` "
            f"({doc['b']['arch']})\n\n" + md_table(["metric", "A", "B", "B - A"], rows))
