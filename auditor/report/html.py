"""One self-contained HTML page of a report: inline CSS, figures as data URIs, no script, no network.

The page is drawn from the same renderables as the table view (the command's
``*_tables(document)``): each rich table becomes an HTML ``<table>`` with its title as
caption, each line of text a paragraph with its colour kept as a class. So the page
shows every table and note of the terminal report, with the same numbers, and the
verdict and findings on top; the PNG figures the run drew are embedded below.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from .fit import table_cells
from .verdict import verdict_headline

__all__ = ["html_report", "table_html", "text_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#1f2328;background:#fff;line-height:1.4}
h1{font-size:1.5rem;margin:0 0 .5rem}h2{font-size:1.15rem;margin:2rem 0 .5rem}
.verdict{padding:.6rem 1rem;border-radius:6px;margin:.5rem 0 1rem;border:1px solid #d0d7de}
.verdict.passed{background:#dafbe1}.verdict.failed{background:#ffebe9}.verdict.none{background:#fff8c5}
p{margin:.25rem 0}.header p{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.9rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem;display:block;overflow-x:auto;max-width:100%}
caption{text-align:left;font-weight:600;padding:.25rem 0;caption-side:top}
th,td{border:1px solid #d0d7de;padding:.2rem .5rem;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.center{text-align:center}tr.group td{background:#eef6ff;font-weight:600}
.bad{color:#b3261e;font-weight:600}.good{color:#116329;font-weight:600}.warn{color:#8a6100}
tr.bad td{color:#b3261e}figure{margin:1.5rem 0}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-size:.9rem;color:#57606a}
"""


def _style_class(style: Any) -> str:
    """A CSS class for a rich style: red -> bad, green -> good, yellow -> warn, cyan -> group."""
    name = str(style or "")
    for colour, css in (("red", "bad"), ("green", "good"), ("yellow", "warn"), ("cyan", "group")):
        if colour in name:
            return css
    return ""


def _attr(css: str) -> str:
    return f' class="{css}"' if css else ""


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def text_html(text: Text | str, tag: str = "p") -> str:
    """A line of rich text as ``<p>``, its coloured spans as ``<span class>``; line breaks kept."""
    if not isinstance(text, Text):
        return f"<{tag}>{html.escape(str(text))}</{tag}>"
    plain = text.plain
    cuts = sorted({0, len(plain), *(s.start for s in text.spans), *(s.end for s in text.spans)})
    pieces = []
    for start, end in zip(cuts, cuts[1:]):
        styles = [s.style for s in text.spans if s.start <= start and s.end >= end]
        chunk = html.escape(plain[start:end]).replace("\n", "<br>")
        css = _style_class(styles[-1]) if styles else ""
        pieces.append(f"<span{_attr(css)}>{chunk}</span>" if css else chunk)
    return f"<{tag}{_attr(_style_class(text.style))}>{''.join(pieces)}</{tag}>"


def table_html(table: Table) -> str:
    """A rich table as an HTML table: caption, header row, a row per row (a stage's group row marked)."""
    justify = ["num" if column.justify == "right" else "center" if column.justify == "center" else ""
               for column in table.columns]
    head = "".join(f"<th>{html.escape(_plain(column.header))}</th>" for column in table.columns)
    rows = []
    for cells, row in zip(table_cells(table), table.rows):
        group = sum(1 for cell in cells if _plain(cell)) == 1 and _style_class(getattr(cells[0], "style", "")) == "group"
        css = "group" if group else _style_class(row.style)
        if group:  # a stage's heading row: one cell across the table
            body = f'<td colspan="{len(cells)}">{html.escape(_plain(cells[0]).strip())}</td>'
        else:
            body = "".join(f"<td{_attr(j)}>{html.escape(_plain(cell).strip())}</td>" for j, cell in zip(justify, cells))
        rows.append(f"<tr{_attr(css)}>{body}</tr>")
    caption = f"<caption>{html.escape(_plain(table.title))}</caption>" if table.title else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
            f"<figcaption>{name}</figcaption></figure>")


def _body(renderables: Iterable[Any]) -> list[str]:
    parts = []
    for index, renderable in enumerate(renderables):
        if isinstance(renderable, Table):
            parts.append(table_html(renderable))
        elif index == 0 and isinstance(renderable, Text):  # every view starts with the checkpoint's header
            parts.append(f'<div class="header">{text_html(renderable)}</div>')
        else:
            parts.append(text_html(renderable))
    return parts


def html_report(document: Mapping[str, Any], renderables: Sequence[Any], figures: Sequence[Path] = ()) -> str:
    """The report as one self-contained HTML page.

    Parameters
    ----------
    document
        The command's JSON document (its header and verdict).
    renderables
        The command's table view of ``document`` (rich tables and lines of text).
    figures
        PNG files to embed, in order.
    """
    command = document.get("command", "report")
    subject = (document.get("checkpoint") or {}).get("path", "")
    title = f"resdyn {command}" + (f": {subject}" if subject else "")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if "verdict" in document:
        status, findings = verdict_headline(document)
        css = {"passed": "passed", "FAILED": "failed"}.get(status, "none")
        parts.append(f'<div class="verdict {css}"><strong>verdict: {html.escape(status)}</strong><br>'
                     f"findings: {html.escape(findings)}</div>")
    parts += _body(renderables)
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(path) for path in figures]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
