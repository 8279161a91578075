"""Rows read, centred and unit-normalised, with each row's validity recorded the first time it is seen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import DataError
from .kernels import row_norms
from .source import RowSource
from .tiling import Tiling

__all__ = ["LoadedRows", "RowLoader", "center_float32", "float32_norms"]

_TINY_NORM = 1e-150  # as kernels.row_norms: below (or non-finite above), rescale the row first
_NORM_BYTES = 32 << 20  # float64 values made at once for the norms of float32 rows


@dataclass
class LoadedRows:
    """Rows ``[start, start + n)``: their values, labels and validity.

    Whole rows (``norms`` None): ``values`` are the float64 unit rows. Blocked rows:
    ``values`` are the rows as read, ``mean`` (or None) is subtracted and the row
    divided by ``scale`` then ``norms`` (1 where invalid) when :meth:`unit` makes a
    block of columns float64. Float32 rows (``float32``, :meth:`.tiling.Tiling.of_float32`):
    ``values`` are the float32 rows, centred (then rounded to float32) when centred, and
    ``norms`` the float64 norms of the exact (centred) rows; never made unit rows.
    """

    start: int
    values: torch.Tensor  # (n, d): float64 unit rows, or the rows as read (blocked)
    labels: np.ndarray  # (n,) int64
    valid: np.ndarray  # (n,) bool
    norms: torch.Tensor | None = None  # (n,) float64 (blocked)
    scale: torch.Tensor | None = None  # (n,) float64, rows rescaled before their norm (blocked, rare)
    mean: torch.Tensor | None = None  # (d,) float64 (blocked, centred)
    float32: bool = False  # float32 rows (see the class docstring)

    def sub(self, lo: int, hi: int) -> LoadedRows:
        """Positions ``[lo, hi)`` of these rows."""
        cut = (lambda t: None if t is None else t[lo:hi])  # noqa: E731
        return LoadedRows(self.start + lo, self.values[lo:hi], self.labels[lo:hi], self.valid[lo:hi],
                          cut(self.norms), cut(self.scale), self.mean, self.float32)

    def unit(self, k0: int, k1: int, index: torch.Tensor | None = None, out: torch.Tensor | None = None,
             *, divide: bool = True) -> torch.Tensor:
        """Float64 unit rows (those at positions ``index``, default all), columns ``[k0, k1)``.

        Whole rows: a view (or a copy of the rows picked). Blocked rows: made into
        ``out`` (a flat float64 buffer large enough) when given; without ``divide``,
        centred but not divided by :meth:`divisors` (for a caller that divides the
        products instead).
        """
        if self.norms is None:
            rows = self.values if index is None else self.values[index]
            return rows if (k0, k1) == (0, rows.shape[1]) else rows[:, k0:k1]
        raw = self.values[:, k0:k1] if index is None else self.values[index, k0:k1]
        norms = self.norms if index is None else self.norms[index]
        m, w = raw.shape
        dst = out[: m * w].view(m, w) if out is not None else torch.empty((m, w), dtype=torch.float64)
        if self.mean is not None:
            torch.sub(raw, self.mean[k0:k1], out=dst)
        else:
            dst.copy_(raw)
        if not divide:
            return dst
        if self.scale is not None:
            dst /= (self.scale if index is None else self.scale[index])[:, None]
        dst /= norms[:, None]
        return dst

    def divisors(self, index: torch.Tensor | None = None) -> torch.Tensor | None:
        """What blocked rows are divided by, when one division is exact enough: None for whole rows,
        and for rows rescaled first or held as float64 (their products could overflow)."""
        if self.norms is None or self.scale is not None or self.values.dtype == torch.float64:
            return None
        return self.norms if index is None else self.norms[index]

    def unit_rows(self, index: np.ndarray) -> torch.Tensor:
        """Every column of the float64 unit rows at positions ``index``."""
        return self.unit(0, self.values.shape[1], torch.from_numpy(np.asarray(index, dtype=np.int64)))


def float32_norms(rows: torch.Tensor, mean: torch.Tensor | None, total: torch.Tensor | None) -> np.ndarray:
    """Float64 norms of float32 ``rows`` (minus ``mean``, float64, when given), a few rows at a time.

    With ``mean`` the centred rows are written back rounded to float32 (each value within a
    relative ``2**-24`` of the exact one: :func:`.exact.cos_bound` counts it); with ``total``
    (float64) their column sums are added to it. NaN or inf give a non-finite norm.
    """
    n, d = rows.shape
    if mean is None and total is None:  # one fused pass: float32 products are exact in float64
        x = rows.numpy()
        return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norms = np.empty(n)
    step = max(1, _NORM_BYTES // (8 * max(1, d)))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        v = rows[r0:r1].to(torch.float64)
        if mean is not None:
            v -= mean
            rows[r0:r1] = v
        if total is not None:
            total += v.sum(dim=0)
        norms[r0:r1] = torch.linalg.vector_norm(v, dim=1).numpy()
    return norms


def center_float32(rows: torch.Tensor, mean: torch.Tensor) -> None:
    """Subtract the float64 ``mean`` from float32 ``rows`` in place, as :func:`float32_norms` does (rounded to
    float32), without the norms."""
    n, d = rows.shape
    step = max(1, _NORM_BYTES // (8 * max(1, d)))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        v = rows[r0:r1].to(torch.float64)
        v -= mean
        rows[r0:r1] = v


class RowLoader:
    """Reads rows of ``source`` into two reused buffers (a panel, a tile) and keeps their validity.

    Whole rows are read into float64 buffers and normalised in place; blocked rows
    (``tiling.blocked``) are kept as read and their norms taken a block of columns
    at a time (see :mod:`.tiling`).

    Attributes
    ----------
    valid : ndarray of bool, shape (n_samples,)
        Rows with a direction (finite, non-zero; after centring when centred), filled as
        rows are first seen.
    scanned : int
        Rows ``[0, scanned)`` have been seen.
    bad_rows, first_bad : int
        Rows with NaN or inf seen, and the first of them (-1: none).
    mean : Tensor or None
        The stage mean subtracted from every row (after a pre-scan with ``center``).
    raw_valid : ndarray of bool or None
        ``valid`` before centring (after a pre-scan; None without one).
    """

    def __init__(self, source: RowSource, labels: np.ndarray, tiling: Tiling) -> None:
        self.src = source
        self.labels = labels
        self.tiling = tiling
        self.valid = np.zeros(source.n, dtype=bool)  # filled when rows are first seen
        self.scanned = 0  # rows [0, scanned) have been seen
        self.bad_rows = 0
        self.first_bad = -1
        self.mean: torch.Tensor | None = None
        self.raw_valid: np.ndarray | None = None
        dtype = np.float32 if tiling.float32 else source.hold if tiling.blocked else np.float64
        self._buf_panel = np.empty((tiling.panel_rows, source.d), dtype)
        streamed = len(tiling.panels) > 1
        self._buf_tile = np.empty((tiling.tile_rows if streamed else 0, source.d), dtype)
        self._scratch = torch.empty(tiling.panel_rows * tiling.width, dtype=torch.float64) if tiling.blocked else None
        self.panel_span = (0, 0)  # rows [a, b) in the panel buffer as read (float32 rows, not centred)
        self.norm_range = (np.inf, 0.0)  # smallest and largest norm of a valid row (float32 rows)
        self.norms = np.ones(source.n) if tiling.float32 else None  # float64 norms (float32 rows; 1 if invalid)

    def note_rows(self, a: int, b: int, norms: np.ndarray, valid: np.ndarray) -> None:
        """Record validity of rows ``[a, b)`` the first time they are seen."""
        finite = np.isfinite(norms)
        if not finite.all():
            self.bad_rows += int((~finite).sum())
            if self.first_bad < 0:
                self.first_bad = a + int(np.flatnonzero(~finite)[0])
        self.valid[a:b] = valid
        self.scanned = b

    def raise_bad(self) -> None:
        """Refuse the rows with NaN or inf seen so far."""
        raise DataError(
            f"{self.bad_rows} of {self.src.n} rows of features (shape {self.src.shape}) "
            f"contain NaN or inf (first: row {self.first_bad})",
            hint="the activations overflowed or the store is corrupt; re-extract in float32",
        )

    def prescan(self, panels: Sequence[tuple[int, int]], center: bool, tick: Callable[[], None]) -> None:
        """Validate every row, find zero rows, sum the rows for the mean."""
        total = torch.zeros(self.src.d, dtype=torch.float64)
        for p0, p1 in panels:
            x = self._buf_panel[:p1 - p0]
            self.src.read_into(p0, p1, x)
            if self.tiling.float32:
                norms = float32_norms(torch.from_numpy(x), None, total if center else None)
            elif self.tiling.blocked:
                norms, _ = self._blocked_norms(torch.from_numpy(x), None, total if center else None)
            else:
                if center:
                    total += torch.from_numpy(x).sum(dim=0)  # zero rows add nothing
                norms = row_norms(x)
            self.note_rows(p0, p1, norms, norms > 0)
            tick()
        if self.bad_rows:
            self.raise_bad()
        self.raw_valid = self.valid.copy()
        n_valid = int(self.raw_valid.sum())
        if center and n_valid:
            self.mean = total / n_valid
        self.scanned = 0  # the Gram pass notes rows again (centring may zero some)
        self.valid[:] = False

    def load(self, a: int, b: int, *, tile: bool = False) -> LoadedRows:
        """Read, centre and unit-normalise rows ``[a, b)`` (into the tile buffer or the panel's); note them if new."""
        x = (self._buf_tile if tile else self._buf_panel)[:b - a]
        self.src.read_into(a, b, x)
        t = torch.from_numpy(x)
        scale = None
        if self.tiling.float32 and b <= self.scanned:  # seen before: norms and validity are known
            return self._again(a, b, t, tile)
        if self.tiling.float32:
            norms = float32_norms(t, self.mean, None)
            self.panel_span = (a, b) if not tile and self.mean is None else (0, 0)
        elif self.tiling.blocked:
            norms, scale = self._blocked_norms(t, self.mean, None)
        else:
            if self.mean is not None:
                t -= self.mean
            norms = row_norms(x)
        valid = norms > 0  # False for NaN too
        if self.raw_valid is not None:
            valid &= self.raw_valid[a:b]
        divisor = torch.from_numpy(np.where(valid, norms, 1.0))
        if not (self.tiling.blocked or self.tiling.float32):
            t /= divisor[:, None]
        if a >= self.scanned:
            if a != self.scanned:  # pragma: no cover - the passes read in order
                raise RuntimeError("rows must be seen in order")
            self.note_rows(a, b, norms, valid)
        else:
            valid &= self.valid[a:b]
        if self.tiling.float32:
            assert self.norms is not None
            self.norms[a:b] = divisor.numpy()
            if valid.any():
                seen = norms[valid]
                low, high = self.norm_range
                self.norm_range = (min(low, float(seen.min())), max(high, float(seen.max())))
            return LoadedRows(a, t, self.labels[a:b], valid, divisor, float32=True)
        if not self.tiling.blocked:
            return LoadedRows(a, t, self.labels[a:b], valid)
        return LoadedRows(a, t, self.labels[a:b], valid, divisor, scale, self.mean)

    def _again(self, a: int, b: int, t: torch.Tensor, tile: bool) -> LoadedRows:
        """Float32 rows ``[a, b)`` read again (``t``): centred as the first time, their norms and validity
        those noted then (the same values: only the first read takes the norms)."""
        assert self.norms is not None
        if self.mean is not None:
            center_float32(t, self.mean)
        self.panel_span = (a, b) if not tile and self.mean is None else (0, 0)
        divisor = torch.from_numpy(self.norms[a:b].copy())
        return LoadedRows(a, t, self.labels[a:b], self.valid[a:b].copy(), divisor, float32=True)

    def raw_rows(self, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``pick`` (increasing, at most ``panel_rows``) as read (float32 rows, not centred).

        Returns rows ``x`` and the position in ``x`` of every row of ``pick``: a view of the
        panel buffer when it still holds them as read (a stage of one panel, not centred);
        else they are read again, in runs of consecutive rows, into it (after the Gram pass,
        which no longer needs it).
        """
        p0, p1 = self.panel_span
        if pick.size and p0 <= pick[0] and pick[-1] < p1:
            return self._buf_panel[:p1 - p0], pick - p0
        self.panel_span = (0, 0)
        out = self._buf_panel[:pick.size]
        at = 0
        for run in np.split(pick, np.flatnonzero(np.diff(pick) != 1) + 1):
            a, b = int(run[0]), int(run[-1]) + 1
            self.src.read_into(a, b, out[at:at + b - a])
            at += b - a
        return out, np.arange(pick.size)

    def _blocked_norms(
        self, raw: torch.Tensor, mean: torch.Tensor | None, total: torch.Tensor | None,
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Norms of the (centred) rows ``raw``, a block of columns at a time; column sums into ``total``.

        Returns the norms (NaN for rows with NaN or inf) and, when some row's squares
        under- or overflow float64 (float64 input only), the factor each row is divided
        by before its norm (None when no row needs one).
        """
        n = raw.shape[0]
        squares = torch.zeros(n, dtype=torch.float64)
        rows = LoadedRows(0, raw, self.labels[:0], self.valid[:0], torch.ones(n, dtype=torch.float64), None, mean)
        for k0, k1 in self.tiling.column_blocks():
            block = rows.unit(k0, k1, out=self._scratch, divide=False)
            if total is not None:
                total[k0:k1] += block.sum(dim=0)  # zero rows add nothing
            squares += torch.einsum("ij,ij->i", block, block)  # one pass (square_ + sum: 2.7x the time)
        norms = squares.sqrt_().numpy().copy()
        scale = None
        for i in np.flatnonzero(~np.isfinite(norms) | (norms < _TINY_NORM)):
            row = rows.unit_rows(np.array([i]))[0].numpy()  # one row, float64
            top = np.abs(row).max() if np.isfinite(row).all() else np.nan
            if not np.isfinite(top):
                norms[i] = np.nan
            elif top == 0.0:
                norms[i] = 0.0
            else:  # divide by the largest magnitude first: the direction is unchanged
                scale = torch.ones(n, dtype=torch.float64) if scale is None else scale
                scale[i] = top
                norms[i] = np.linalg.norm(row / top)
        return norms, scale
