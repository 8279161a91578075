"""The float32 tiling's in-panel strips (auditor.analysis.angles.tiling) against a direct walk of the Gram pass."""

from __future__ import annotations

import numpy as np
import pytest

from auditor.analysis.angles import median_angles
from auditor.analysis.angles import tiling as angles_tiling


def _walk(t):
    """Every pair ``i < j`` with its tile number, in the Gram pass's order (strips, then streamed tiles)."""
    tile, out = 0, {}
    for p0, p1 in t.panels:
        for s0 in range(p0, p1, t.strip):
            for i in range(s0, min(s0 + t.strip, p1)):
                for j in range(i + 1, p1):
                    out[(i, j)] = tile
            tile += 1
        for j0 in range(p1, t.n, t.tile_rows):
            for i in range(p0, p1):
                for j in range(j0, min(j0 + t.tile_rows, t.n)):
                    out[(i, j)] = tile
            tile += 1
    return out, tile


@pytest.mark.parametrize(("n", "block_rows", "parts"), [(300, 150, 1), (257, 100, 1), (200, 90, 2), (100, 1024, 1)])
def test_strips_are_numbered_as_the_pass_meets_them(n, block_rows, parts):
    t = angles_tiling.Tiling.of_float32(n, block_rows, 50, parts=parts)
    assert t.strip <= angles_tiling._STRIP_ROWS and t.strip <= t.tile_rows
    walked, count = _walk(t)
    assert len(walked) == n * (n - 1) // 2 and t.count_tiles() == count
    pairs = np.array(sorted(walked))
    np.testing.assert_array_equal(t.tile_of(pairs[:, 0], pairs[:, 1]), [walked[tuple(p)] for p in pairs])


def test_a_panel_in_short_strips_gives_the_float64_medians():
    """Panels of 150 rows in strips of 64, tiles of 150: float32 products (exact medians) equal float64
    products', all pairs and sampled ones (bucketed by the strips' numbers)."""
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 3, 300)
    x = np.maximum(rng.standard_normal((3, 40))[labels] + 1.5 * rng.standard_normal((300, 40)), 0).astype(np.float32)
    t = angles_tiling.Tiling.of_float32(300, 150, 40)
    assert (t.panel_rows, t.tile_rows, t.strip) == (150, 150, 64)
    for options in ({}, {"max_pairs": 500, "seed": 1}):
        want = median_angles(x, labels, ["a", "b", "c"], products="float64", block_rows=150, **options)
        got = median_angles(x, labels, ["a", "b", "c"], products="float32", block_rows=150, **options)
        assert got.counts == want.counts and got.pairs_sampled == want.pairs_sampled
        for field in ("intra", "inter"):
            for key, value in getattr(want, field).items():
                assert getattr(got, field)[key] == pytest.approx(value, abs=1e-9), key
