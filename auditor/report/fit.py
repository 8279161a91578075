"""Tables that fit the console: whole names and whole numbers at any width.

A view builds one rich :class:`~rich.table.Table` with every column. :func:`fitted`
wraps it so that, when it is drawn, each column is at least as wide as its longest
word (a cell may wrap at spaces, never cut to ``1.587…``); when the columns do not
fit side by side, they are dealt out into several tables, each repeating the key
column (the block, layer or stage name) and titled ``(continued)``. A wide console
gets one table. The decision is made at drawing time, from the console's width, so
the views stay free of widths; the numbers are the view's cells, unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.cells import cell_len
from rich.table import Column, Table
from rich.text import Text

__all__ = ["Fitted", "fitted", "fit_renderables", "table_cells"]

_OVERHEAD = 3  # a column's bar and its two spaces of padding (plus one bar per table)
_MIN_NAME = 4  # a column narrower than this would wrap even its header's short words


def table_cells(table: Table) -> list[list[Any]]:
    """The table's rows as lists of cells (renderables), in column order."""
    columns = [list(column.cells) for column in table.columns]
    return [[column[i] if i < len(column) else "" for column in columns] for i in range(table.row_count)]


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _words_width(text: str) -> int:
    """The width ``text`` needs when wrapped at spaces: its widest word, an indented first word whole."""
    widest = 0
    for line in text.splitlines():
        words = line.split()
        if words:
            indent = len(line) - len(line.lstrip(" "))
            widest = max(widest, indent + cell_len(words[0]), *(cell_len(word) for word in words))
    return widest


def _min_width(column: Column) -> int:
    """The widest single word of the column (header included): its width when wrapped at spaces."""
    return max([_MIN_NAME, *(_words_width(_plain(cell)) for cell in [column.header, *column.cells])])


def _max_width(column: Column) -> int:
    """The width of the column's longest line (header included): its width unwrapped."""
    return max([_MIN_NAME, *(cell_len(line) for cell in [column.header, *column.cells]
                             for line in _plain(cell).splitlines())])


def _spread(least: Sequence[int], most: Sequence[int], room: int) -> list[int]:
    """Column widths from their least toward their most, sharing ``room`` in proportion to what each lacks."""
    lacking = [m - w for w, m in zip(least, most)]
    spare = room - sum(least)
    if spare >= sum(lacking):
        return list(most)
    if spare <= 0 or not any(lacking):
        return list(least)
    widths = [w + spare * gap // sum(lacking) for w, gap in zip(least, lacking)]
    for index in sorted(range(len(widths)), key=lambda i: widths[i] - most[i]):  # the rounding's leftover
        if sum(widths) >= room:
            break
        widths[index] += widths[index] < most[index]
    return widths


def _groups(widths: Sequence[int], width: int, key: int) -> list[list[int]]:
    """Column indexes per table: the key columns, then as many more as fit (at least one more)."""
    overhead = _OVERHEAD
    head = list(range(min(key, len(widths))))
    base = 1 + sum(widths[i] + overhead for i in head)
    groups: list[list[int]] = []
    current: list[int] = []
    used = base
    for index in range(len(head), len(widths)):
        need = widths[index] + overhead
        if current and used + need > width:
            groups.append(head + current)
            current, used = [], base
        current.append(index)
        used += need
    if current or not groups:
        groups.append(head + current)
    return groups


def _continued(title: Any) -> Any:
    """A part's title: the first words of the table's title (before its details), then ``(continued)``."""
    if not title:
        return title
    short = re.split(r"[(:;]", _plain(title), maxsplit=1)[0].strip()
    return f"{short} (continued)"


class Fitted:
    """A table drawn whole when its words fit the console, else split by columns.

    Parameters
    ----------
    table
        The view's table (title, columns with headers and justification, rows with styles
        and section ends).
    key
        How many leading columns name a row; they are repeated in every part.
    """

    def __init__(self, table: Table, key: int = 1) -> None:
        self.table = table
        self.key = key

    def parts(self, console: Console, options: ConsoleOptions) -> list[Table]:
        """The table, or its parts, for ``options.max_width`` columns."""
        columns = self.table.columns
        widths = [_min_width(column) for column in columns]
        most = [max(w, _max_width(column)) for w, column in zip(widths, columns)]
        groups = _groups(widths, options.max_width, self.key)
        rows = table_cells(self.table)
        parts = []
        for number, group in enumerate(groups):
            title = self.table.title if number == 0 else _continued(self.table.title)
            part = Table(title=title, title_justify=self.table.title_justify, box=self.table.box,
                         show_header=self.table.show_header, show_lines=self.table.show_lines)
            room = options.max_width - 1 - _OVERHEAD * len(group)
            for index, width in zip(group, _spread([widths[i] for i in group], [most[i] for i in group], room)):
                column = columns[index]
                part.add_column(column.header, justify=column.justify, style=column.style,
                                header_style=column.header_style, vertical=column.vertical,
                                width=width, overflow="fold")
            for row, meta in zip(rows, self.table.rows):
                part.add_row(*(row[i] for i in group), style=meta.style, end_section=meta.end_section)
            parts.append(part)
        return parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.parts(console, options)


def fitted(renderable: Any, key: int = 1) -> Any:
    """A table wrapped in :class:`Fitted`; anything else as it is."""
    return Fitted(renderable, key) if isinstance(renderable, Table) else renderable


def fit_renderables(renderables: Iterable[Any]) -> Iterator[Any]:
    """Every table of a view fitted to the console it is printed on."""
    for renderable in renderables:
        yield fitted(renderable)
