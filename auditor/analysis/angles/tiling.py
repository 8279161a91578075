"""How the rows are cut: panels held in memory, tiles streamed against them, each tile numbered in order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tiling"]

_TILE_ROWS = 256  # rows of a streamed tile and of an in-panel strip


@dataclass(frozen=True)
class Tiling:
    """Panels of ``panel_rows`` rows, and tiles of ``tile_rows`` rows, over ``n`` rows.

    For each panel, in order: its strips of ``tile_rows`` rows against the rest of the
    panel (the upper triangle), then the tiles of the rows after it. The tiles are
    numbered in that order, which is the order of the Gram pass.
    """

    n: int
    panel_rows: int
    tile_rows: int
    panels: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, n: int, block_rows: int) -> Tiling:
        """The tiling of ``n`` rows with panels of at most ``block_rows`` rows."""
        panel_rows = min(int(block_rows), n)
        tile_rows = min(panel_rows, _TILE_ROWS)
        return cls(n, panel_rows, tile_rows, tuple((p, min(p + panel_rows, n)) for p in range(0, n, panel_rows)))

    def count_tiles(self) -> int:
        """Tiles in all (strips and streamed tiles)."""
        count = 0
        for p0, p1 in self.panels:
            count += -(-(p1 - p0) // self.tile_rows) + -(-(self.n - p1) // self.tile_rows)
        return count

    def tile_of(self, g1: np.ndarray, g2: np.ndarray) -> np.ndarray:
        """Tile number (in execution order) of the pairs ``g1 < g2``."""
        n, pr, tr = self.n, self.panel_rows, self.tile_rows
        p = g1 // pr
        p0 = p * pr
        p1 = np.minimum(p0 + pr, n)
        strips = -(-(p1 - p0) // tr)
        starts = np.cumsum([0] + [
            -(-(b - a) // tr) + -(-(n - b) // tr) for a, b in self.panels
        ])[:-1]
        inside = g2 < p1
        return np.where(
            inside, starts[p] + (g1 - p0) // tr, starts[p] + strips + (g2 - p1) // tr
        )
