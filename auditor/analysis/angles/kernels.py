"""The numeric kernels of the angles: row norms, float64 Gram tiles, accurate angles from cosines, pair ranks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["Rows", "row_norms", "degrees", "gemm", "unrank_pairs"]

Rows = Callable[[np.ndarray], torch.Tensor]  # positions -> float64 unit rows

_REFINE_COS = 0.9999  # |cos| above this: recompute the angle with atan2
_REFINE_ELEMS = 1 << 21  # float64 elements per chunk of atan2 refinement (16 MiB)
_TINY_NORM = 1e-150  # below (or non-finite above): rescale the row before its norm
_SMALL_GEMM = 1 << 22  # m * n * k below this: numpy, no thread start-up (ms under load)


def row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norms of the rows of ``x`` (float64, modified in place).

    Rows whose norm under- or overflows (only possible for float64 input) are
    divided by their largest magnitude first, which leaves their direction
    unchanged. Rows with NaN or inf get a NaN norm.
    """
    norms = torch.linalg.vector_norm(torch.from_numpy(x), dim=1).numpy().copy()
    for i in np.flatnonzero(~np.isfinite(norms) | (norms < _TINY_NORM)):
        row = x[i]
        if not np.isfinite(row).all():
            norms[i] = np.nan
            continue
        top = np.abs(row).max()
        if top == 0.0:
            norms[i] = 0.0
            continue
        row /= top
        norms[i] = np.linalg.norm(row)
    return norms


def _atan2_degrees(a: Rows, b: Rows, ia: np.ndarray, ib: np.ndarray, d: int) -> np.ndarray:
    """Angles between unit rows ``a(ia)`` and ``b(ib)`` as ``2 atan2(|a-b|, |a+b|)``."""
    out = np.empty(ia.size)
    step = max(1, _REFINE_ELEMS // max(1, d))
    for s in range(0, ia.size, step):
        ra = a(ia[s:s + step])
        rb = b(ib[s:s + step])
        diff = torch.linalg.vector_norm(ra - rb, dim=1)
        summ = torch.linalg.vector_norm(ra + rb, dim=1)
        out[s:s + step] = torch.rad2deg(2.0 * torch.atan2(diff, summ)).numpy()
    return out


def degrees(
    cos: np.ndarray,
    a: Rows,
    b: Rows,
    ia: Callable[[], tuple[np.ndarray, np.ndarray]],
    d: int,
) -> np.ndarray:
    """Angles in degrees from cosines; near 0 or 180 degrees recomputed by atan2.

    ``a(index)`` and ``b(index)`` give the float64 unit rows (``d`` values) at
    positions ``index``; ``ia()`` returns the positions in ``a`` and ``b`` of every
    cosine (only called, lazily, when some pair needs the atan2 form).
    """
    ang = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    near = np.flatnonzero(np.abs(cos) > _REFINE_COS)
    if near.size:
        ra, rb = ia()
        ang[near] = _atan2_degrees(a, b, ra[near], rb[near], d)
    return ang


def gemm(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``a @ b.T`` in float64: torch (MKL, all intra-op threads) unless tiny."""
    if a.shape[0] * b.shape[0] * a.shape[1] < _SMALL_GEMM:
        return a.numpy() @ b.numpy().T
    return torch.mm(a, b.T).numpy()


def unrank_pairs(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major index ``k`` of the pairs ``i < j < n`` to ``(i, j)``."""
    i = np.arange(n - 1, dtype=np.int64)
    start = i * (2 * n - i - 1) // 2  # index of the pair (i, i + 1)
    row = np.searchsorted(start, k, side="right") - 1
    return row, k - start[row] + row + 1
