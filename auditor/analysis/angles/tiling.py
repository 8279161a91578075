"""How the rows are cut: panels held in memory, tiles streamed against them, each tile numbered in order.

Two ways to hold rows, chosen by their width (:meth:`Tiling.of`):

- *whole*: the float64 unit rows of a panel and of a tile fit in ``_ROW_BYTES``;
  each is made once, when read, and a tile of the Gram matrix is one GEMM;
- *blocked* (wide rows, e.g. ResNet-50's first stage at 224 px, 802,816
  features): the rows are held as read (the store's float32 or float16, 2 to 4
  times smaller than float64) and as few as fit in ``_ROW_BYTES`` (a panel twice
  the tile); a Gram tile is a sum of float64 GEMMs over blocks of ``width``
  columns, each block made float64, centred and normalised just before its GEMM
  (two buffers of ``_BLOCK_BYTES``).

- *float32* (:meth:`Tiling.of_float32`, the float32 products of :mod:`.exact`): the
  rows are held as float32 (half the bytes of float64: twice the rows in a panel),
  centred once when read; a stage that fits in ``_ROW_BYTES`` is one panel, read once.

Either way the memory of the rows is bounded whatever the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tiling"]

_TILE_ROWS = 256  # rows of a streamed tile and of an in-panel strip
_STRIP_ROWS = 64  # float32 rows of one panel: rows of an in-panel strip
_ROW_BYTES = 1 << 30  # rows held at once (a panel and a tile): 1 GiB
_BLOCK_BYTES = 32 << 20  # float64 columns made at once, per side of a GEMM (blocked rows)


@dataclass(frozen=True)
class Tiling:
    """Panels of ``panel_rows`` rows, and tiles of ``tile_rows`` rows, over ``n`` rows of ``d`` values.

    For each panel, in order: its strips of :attr:`strip` rows against the rest of the
    panel (the upper triangle: a strip's own lower triangle is computed and thrown away,
    ``strip / (2 panel_rows)`` of the panel's work), then the tiles of the rows after it.
    The tiles are numbered in that order, which is the order of the Gram pass.
    ``blocked`` rows are held as read and made float64 ``width`` columns at a time
    (module docstring).
    """

    n: int
    panel_rows: int
    tile_rows: int
    panels: tuple[tuple[int, int], ...]
    d: int = 1
    blocked: bool = False
    width: int = 1
    float32: bool = False
    strip_rows: int = 0  # rows of an in-panel strip (0: tile_rows)

    @property
    def strip(self) -> int:
        """Rows of an in-panel strip: ``strip_rows``, else ``tile_rows``."""
        return self.strip_rows or self.tile_rows

    @classmethod
    def of(cls, n: int, block_rows: int, d: int = 1, itemsize: int = 8) -> Tiling:
        """The tiling of ``n`` rows of ``d`` values (held as ``itemsize`` bytes when blocked).

        Panels have at most ``block_rows`` rows; fewer when rows are so wide that a
        panel and a tile of float64 rows would pass ``_ROW_BYTES``.
        """
        d = max(1, int(d))
        panel_rows = min(int(block_rows), n)
        tile_rows = min(panel_rows, _TILE_ROWS)
        blocked = 8 * d * (panel_rows + tile_rows) > _ROW_BYTES
        width = d
        if blocked:
            fit = max(2, _ROW_BYTES // (d * int(itemsize)))  # rows held at once, as read
            panel_rows = min(panel_rows, max(1, 2 * fit // 3))
            tile_rows = min(panel_rows, _TILE_ROWS, max(1, fit - panel_rows))
            width = min(d, max(1, _BLOCK_BYTES // (8 * panel_rows)))
        panels = tuple((p, min(p + panel_rows, n)) for p in range(0, n, panel_rows))
        return cls(n, panel_rows, tile_rows, panels, d, blocked, width)

    @classmethod
    def of_float32(cls, n: int, block_rows: int, d: int, parts: int = 1) -> Tiling:
        """The tiling of ``n`` rows of ``d`` values held as float32 (4 bytes each), within ``_ROW_BYTES``.

        One panel of every row when they fit (and ``block_rows`` allows), in strips of
        ``_STRIP_ROWS``; else a panel of two thirds of what fits and tiles of the rest (at
        most ``_TILE_ROWS``), the panel in strips of at most ``_STRIP_ROWS`` too (strips of
        256 rows in panels of 891 threw away a fifth of the work). Split
        among ``parts`` processes: tiles of at most a quarter of a part of a panel (at
        least 16 rows), so that the parts can be balanced.
        """
        d = max(1, int(d))
        fit = max(2, _ROW_BYTES // (4 * d))
        panel_rows = min(int(block_rows), n)
        if panel_rows < n or n > fit:
            panel_rows = min(panel_rows, max(1, 2 * fit // 3))
            tile_rows = min(panel_rows, _TILE_ROWS, max(1, fit - panel_rows))
        else:  # one panel: strips of few rows, as the diagonal blocks are computed whole (256: 1.4x the work)
            tile_rows = min(panel_rows, _STRIP_ROWS)
        if parts > 1:
            tile_rows = min(tile_rows, max(16, panel_rows // (4 * parts)))
        panels = tuple((p, min(p + panel_rows, n)) for p in range(0, n, panel_rows))
        return cls(n, panel_rows, tile_rows, panels, d, False, d, True, min(tile_rows, _STRIP_ROWS))

    def column_blocks(self) -> list[tuple[int, int]]:
        """The columns ``[k0, k1)`` made float64 at once (one block of every column unless blocked)."""
        return [(k, min(k + self.width, self.d)) for k in range(0, self.d, self.width)]

    def count_tiles(self) -> int:
        """Tiles in all (strips and streamed tiles)."""
        count = 0
        for p0, p1 in self.panels:
            count += -(-(p1 - p0) // self.strip) + -(-(self.n - p1) // self.tile_rows)
        return count

    def tile_of(self, g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
        """Tile number (in execution order) of the pairs ``g1 < g2``."""
        n, pr, tr, sr = self.n, self.panel_rows, self.tile_rows, self.strip
        p = g1 // pr
        p0 = p * pr
        p1 = np.minimum(p0 + pr, n)
        strips = -(-(p1 - p0) // sr)
        starts = np.cumsum([0] + [
            -(-(b - a) // sr) + -(-(n - b) // tr) for a, b in self.panels
        ])[:-1]
        inside = g2 < p1
        return np.where(
            inside, starts[p] + (g1 - p0) // sr, starts[p] + strips + (g2 - p1) // tr
        )
