"""Gram tiles of loaded rows: one float64 GEMM of whole unit rows, a sum over blocks of columns, or float32 products."""

from __future__ import annotations

import numpy as np
import torch

from .exact import float32_products
from .kernels import gemm
from .rows import LoadedRows
from .tiling import Tiling

__all__ = ["GramProducts"]


class GramProducts:
    """``a @ b.T`` of unit rows, in float64, for the tiling's rows (see :mod:`.tiling`).

    Whole rows: one GEMM (:func:`~.kernels.gemm`). Blocked rows: for every block of
    columns, both sides are made float64 (centred) in two reused buffers of
    ``panel_rows * width`` values and multiplied into one accumulated tile, which
    is divided by the rows' norms at the end (float32 / float16 rows; float64
    rows are divided value by value first, as their products could overflow).
    Float32 rows: :func:`~.exact.float32_products` (float32 GEMMs over chunks of
    columns, summed in float64) divided by the float64 norms: cosines within
    :func:`~.exact.cos_bound` of the exact ones.
    """

    def __init__(self, tiling: Tiling) -> None:
        self.tiling = tiling
        size = tiling.panel_rows * tiling.width if tiling.blocked else 0
        self._left = torch.empty(size, dtype=torch.float64)
        self._right = torch.empty(size, dtype=torch.float64)

    def gram(
        self, a: LoadedRows, b: LoadedRows, ia: np.ndarray | None = None, ib: np.ndarray | None = None,
    ) -> np.ndarray:
        """Cosines between the rows of ``a`` (at positions ``ia``, default all) and of ``b`` (``ib``)."""
        pick_a = None if ia is None else torch.from_numpy(np.asarray(ia, dtype=np.int64))
        pick_b = None if ib is None else torch.from_numpy(np.asarray(ib, dtype=np.int64))
        if self.tiling.float32:
            out = float32_products(a.values, b.values, pick_a, pick_b)
            out /= (a.norms if pick_a is None else a.norms[pick_a])[:, None]
            out /= (b.norms if pick_b is None else b.norms[pick_b])[None, :]
            return out.numpy()
        if not self.tiling.blocked:
            return gemm(a.unit(0, self.tiling.d, pick_a), b.unit(0, self.tiling.d, pick_b))
        rows = a.values.shape[0] if ia is None else len(ia)
        cols = b.values.shape[0] if ib is None else len(ib)
        out = torch.zeros((rows, cols), dtype=torch.float64)
        # Rows stored as float32 / float16 cannot overflow their products: divide the tile by the
        # norms once instead of every value of every block (half the passes over the blocks).
        div_a, div_b = a.divisors(pick_a), b.divisors(pick_b)
        fold = div_a is not None and div_b is not None
        for k0, k1 in self.tiling.column_blocks():
            left = a.unit(k0, k1, pick_a, out=self._left, divide=not fold)
            right = b.unit(k0, k1, pick_b, out=self._right, divide=not fold)
            out.addmm_(left, right.T)
        if fold:
            out /= div_a[:, None]
            out /= div_b[None, :]
        return out.numpy()
