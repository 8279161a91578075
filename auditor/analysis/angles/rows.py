"""Rows read, centred and unit-normalised, with each row's validity recorded the first time it is seen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import DataError
from .kernels import row_norms
from .source import RowSource

__all__ = ["LoadedRows", "RowLoader"]


@dataclass
class LoadedRows:
    """Rows ``[start, start + n)``: unit-normalised rows, labels, validity."""

    start: int
    rows: torch.Tensor  # (n, d) float64, unit rows (invalid rows: anything)
    labels: np.ndarray  # (n,) int64
    valid: np.ndarray  # (n,) bool

    def sub(self, lo: int, hi: int) -> LoadedRows:
        """Positions ``[lo, hi)`` of these rows."""
        return LoadedRows(self.start + lo, self.rows[lo:hi], self.labels[lo:hi], self.valid[lo:hi])


class RowLoader:
    """Reads rows of ``source`` into two reused float64 buffers (a panel, a tile) and keeps their validity.

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

    def __init__(self, source: RowSource, labels: np.ndarray, panel_rows: int, tile_rows: int) -> None:
        self.src = source
        self.labels = labels
        self.valid = np.zeros(source.n, dtype=bool)  # filled when rows are first seen
        self.scanned = 0  # rows [0, scanned) have been seen
        self.bad_rows = 0
        self.first_bad = -1
        self.mean: torch.Tensor | None = None
        self.raw_valid: np.ndarray | None = None
        self._buf_panel = np.empty((panel_rows, source.d))
        self._buf_tile = np.empty((tile_rows, source.d))

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
        if self.mean is not None:
            t -= self.mean
        norms = row_norms(x)
        valid = norms > 0  # False for NaN too
        if self.raw_valid is not None:
            valid &= self.raw_valid[a:b]
        t /= torch.from_numpy(np.where(valid, norms, 1.0))[:, None]
        if a >= self.scanned:
            if a != self.scanned:  # pragma: no cover - the passes read in order
                raise RuntimeError("rows must be seen in order")
            self.note_rows(a, b, norms, valid)
        else:
            valid &= self.valid[a:b]
        return LoadedRows(a, t, self.labels[a:b], valid)
