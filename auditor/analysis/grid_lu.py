"""LU factorization of a square operator on a pixel grid, by geometric nested dissection.

A zero-padded convolution, or a block of them, maps ``(C, H, W)`` to
``(C, H, W)`` and couples two pixels only when they are at most ``r`` apart
(Chebyshev distance; ``r = 1`` for a 3x3 kernel, 2 for two of them). Its
matrix (unknown ``c H W + y W + x``; here grouped by pixel, a dense ``C x C``
block per pair of coupled pixels) is sparse, but a general sparse LU orders
it by local heuristics and fills in far more than the grid needs: SuperLU took
3-13 s on a ResNet-56 convolution that this module factors in 0.3-0.6 s.

Nested dissection [1]_ cuts the grid by a strip of ``r`` pixel columns (or
rows) into two halves that no entry couples, recursively, down to small
regions. Unknowns are eliminated leaves first, a strip after both halves; the
multifrontal method [2]_ does each elimination in a dense *front*: the strip's
unknowns (every channel of its pixels) and the unknowns of the enclosing
strips within ``r`` of the region (its *boundary*), which receive the Schur
complement ``F22 - F21 F11^{-1} F12`` ("update") for the parent's front.
The dense steps are LAPACK's LU with partial pivoting and BLAS 3 products.

Pivoting is restricted to a front's own unknowns (static pivoting): an
operator whose principal blocks are singular or nearly so is refused
(:class:`FrontSingular`), and every factorization is checked by the normwise
backward error of a random solve (:func:`grid_lu`), so a caller falls back to
a general sparse LU rather than use an inaccurate one.

References
----------
.. [1] A. George, "Nested dissection of a regular finite element mesh",
   SIAM J. Numer. Anal. 10 (1973).
.. [2] I. S. Duff, J. K. Reid, "The multifrontal solution of indefinite sparse
   symmetric linear equations", ACM TOMS 9 (1983).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FrontSingular", "FactorTooLarge", "GridLU", "grid_lu", "factor_bytes", "pixel_blocks", "channel_major",
           "normwise_backward_error", "BACKWARD_ERROR_MAX", "LEAF_UNKNOWNS"]

# Regions with at most this many unknowns are not cut further (ResNet-56 blocks, one thread: 128 factors the
# 5x5-stencil residuals 1.2-1.5x faster than 512, the 3x3 convolutions alike; 1024 and more cost more flops).
LEAF_UNKNOWNS = 128
# A factorization whose random solve has a larger normwise backward error is refused (LAPACK-quality LU gives
# ~1e-16 to 1e-15 on these operators).
BACKWARD_ERROR_MAX = 1e-12


class FrontSingular(np.linalg.LinAlgError):
    """A front's own block has an exactly zero pivot: the static pivoting cannot go on."""


class FactorTooLarge(MemoryError):
    """The factors would take more memory than the caller allows (:func:`factor_bytes`)."""


@dataclass
class _Front:
    """One elimination step: ``sep`` is eliminated, ``bound`` receives the update (unknown indices)."""

    sep: np.ndarray
    bound: np.ndarray
    children: list[int]
    depth: int
    lu: Any = None  # LAPACK getrf's L\U of F11 (Fortran order); symmetric: potrf's Cholesky factor L11
    perm: Any = None  # P^T F11 = L U: row k of P^T F11 is row perm[k] of F11 (None: symmetric)
    l21: Any = None  # F21 U^{-1} (symmetric: F21 L11^{-T})
    u12: Any = None  # L^{-1} P^T F12 (symmetric: l21^T)


def _pixel_order(grid: tuple[int, int, int]) -> np.ndarray:
    """``order[p C + c] = c H W + p``: the channel-major index of each pixel-major unknown."""
    channels, h, w = grid
    return (np.arange(channels)[None, :] * (h * w) + np.arange(h * w)[:, None]).ravel()


def pixel_blocks(matrix: Any, grid: tuple[int, int, int]) -> Any:
    """A channel-major ``(C H W)^2`` matrix as pixel-major BSR with ``C x C`` blocks (the input of :class:`GridLU`)."""
    import scipy.sparse as sp

    order = _pixel_order(grid)
    return sp.csr_matrix(matrix)[order][:, order].tobsr(blocksize=(grid[0], grid[0]))


def channel_major(blocks: Any, grid: tuple[int, int, int]) -> Any:
    """The inverse of :func:`pixel_blocks`: a CSR matrix on channel-major unknowns."""
    inverse = np.argsort(_pixel_order(grid))
    return blocks.tocsr()[inverse][:, inverse]


def _dissect(grid: tuple[int, int, int], radius: int, leaf: int) -> tuple[list[_Front], np.ndarray]:
    """The elimination tree in postorder (children before parents) and each pixel's front.

    A front's ``sep`` and ``bound`` are pixel-major unknowns ``p C + c``.
    """
    channels, h, w = grid
    fronts: list[_Front] = []
    owner = np.empty(h * w, dtype=np.int64)

    def pixels(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return (np.arange(y0, y1)[:, None] * w + np.arange(x0, x1)[None, :]).ravel()

    def build(y0: int, y1: int, x0: int, x1: int, depth: int) -> int:
        rows, cols = y1 - y0, x1 - x0
        children: list[int] = []
        if rows * cols * channels <= leaf or max(rows, cols) < radius + 2:
            sep = pixels(y0, y1, x0, x1)
        elif cols >= rows:  # a strip of `radius` columns: the halves are radius + 1 apart
            m = x0 + (cols - radius) // 2
            children = [build(y0, y1, x0, m, depth + 1), build(y0, y1, m + radius, x1, depth + 1)]
            sep = pixels(y0, y1, m, m + radius)
        else:
            m = y0 + (rows - radius) // 2
            children = [build(y0, m, x0, x1, depth + 1), build(m + radius, y1, x0, x1, depth + 1)]
            sep = pixels(m, m + radius, x0, x1)
        # every pixel within `radius` of the region and outside it lies in an enclosing strip
        ring = pixels(max(0, y0 - radius), min(h, y1 + radius), max(0, x0 - radius), min(w, x1 + radius))
        ys, xs = ring // w, ring % w
        bound = ring[(ys < y0) | (ys >= y1) | (xs < x0) | (xs >= x1)]
        owner[sep] = len(fronts)
        fronts.append(_Front(sep, bound, children, depth))
        return len(fronts) - 1

    build(0, h, 0, w, 0)
    for front in fronts:  # pixels -> pixel-major unknowns, every channel
        front.sep = (np.sort(front.sep)[:, None] * channels + np.arange(channels)[None, :]).ravel()
        front.bound = (np.sort(front.bound)[:, None] * channels + np.arange(channels)[None, :]).ravel()
    return fronts, owner


def factor_bytes(grid: tuple[int, int, int], radius: int, leaf: int = LEAF_UNKNOWNS) -> int:
    """Bytes of the float64 factors :class:`GridLU` keeps for an operator of this grid and coupling radius.

    Each front keeps ``L\\U`` of its own block and the two off-diagonal panels: ``s^2 + 2 s b`` entries for
    ``s`` eliminated and ``b`` boundary unknowns (from the same dissection, before any arithmetic).
    """
    fronts, _ = _dissect(tuple(int(v) for v in grid), int(radius), leaf)  # type: ignore[arg-type]
    return _kept_bytes(fronts)


def _kept_bytes(fronts: list[_Front]) -> int:
    """Bytes of the factors the fronts keep: ``s^2 + 2 s b`` float64 entries each."""
    return 8 * sum(len(f.sep) ** 2 + 2 * len(f.sep) * len(f.bound) for f in fronts)


def _swaps_to_permutation(ipiv: np.ndarray) -> np.ndarray:
    """LAPACK's sequential row swaps as a permutation ``perm`` (row k of ``P^T A`` is row ``perm[k]`` of ``A``)."""
    perm = np.arange(len(ipiv))
    for k, p in enumerate(ipiv):
        if p != k:
            perm[k], perm[p] = perm[p], perm[k]
    return perm


class GridLU:
    """Multifrontal LU of a square operator whose unknowns are the ``(c, y, x)`` of one grid.

    Parameters
    ----------
    blocks : scipy.sparse.bsr_matrix
        The matrix in pixel-major order (unknown ``(y W + x) C + c``) with
        ``C x C`` blocks (:func:`pixel_blocks` converts a channel-major one).
    grid : (C, H, W)
    leaf : int
        Regions of at most this many unknowns are eliminated in one front.
    max_bytes : float
        Refuse (:class:`FactorTooLarge`, before any arithmetic) factors larger than this.
    symmetric : bool
        The matrix is symmetric positive definite (a Gram matrix): Cholesky fronts (LAPACK's ``potrf``, then
        ``F22 - L21 L21^T``), half the flops of LU and no pivoting to restrict.

    Raises
    ------
    FrontSingular
        A front's own block is exactly singular (the matrix may still be regular); symmetric: not numerically
        positive definite.
    FactorTooLarge
        The factors would exceed ``max_bytes``.
    ValueError
        The matrix does not fit the grid.

    Notes
    -----
    :meth:`solve` takes and returns channel-major vectors (unknown
    ``c H W + y W + x``, torch's layout). :attr:`flops` counts the dense LU and
    update arithmetic; :func:`grid_lu` adds the backward-error check.
    """

    def __init__(self, blocks: Any, grid: tuple[int, int, int], *, leaf: int = LEAF_UNKNOWNS,
                 max_bytes: float = float("inf"), symmetric: bool = False) -> None:
        from scipy.linalg import solve_triangular
        from scipy.linalg.lapack import dgetrf, dpotrf

        channels, h, w = grid
        n = channels * h * w
        if blocks.shape != (n, n) or tuple(blocks.blocksize) != (channels, channels):
            raise ValueError(f"a {blocks.shape} matrix of {blocks.blocksize} blocks on the grid {grid}")
        block_rows = np.repeat(np.arange(h * w), np.diff(blocks.indptr))
        block_cols = blocks.indices.astype(np.int64)
        dy = np.abs(block_rows // w - block_cols // w)
        dx = np.abs(block_rows % w - block_cols % w)
        self.n, self.radius = n, int(max(dy.max(initial=0), dx.max(initial=0)))
        self.symmetric = symmetric
        self.order = _pixel_order(grid)
        self.fronts, owner = _dissect(grid, self.radius, leaf)
        needed = _kept_bytes(self.fronts)
        if needed > max_bytes:
            raise FactorTooLarge(f"the factors of a {grid} operator of coupling radius {self.radius} take "
                                 f"{needed / 2**30:.2f} GiB (allowed {max_bytes / 2**30:.2f} GiB)")
        # a block is assembled in the front that eliminates the first of its two pixels (the deeper one)
        depth = np.array([f.depth for f in self.fronts])
        first, second = owner[block_rows], owner[block_cols]
        at = np.where(depth[first] >= depth[second], first, second)
        order = np.argsort(at, kind="stable")
        starts = np.searchsorted(at[order], np.arange(len(self.fronts) + 1))
        block_rows, block_cols, data = block_rows[order], block_cols[order], blocks.data[order]
        position = np.empty(h * w, dtype=np.int64)  # a pixel's place among its front's pixels
        updates: dict[int, np.ndarray] = {}
        self.flops = 0.0
        for k, front in enumerate(self.fronts):
            s, b = len(front.sep), len(front.bound)
            pixels = np.concatenate([front.sep[::channels], front.bound[::channels]]) // channels
            position[pixels] = np.arange(len(pixels))
            dense = np.zeros((s + b, s + b))
            part = slice(starts[k], starts[k + 1])
            dense.reshape(len(pixels), channels, len(pixels), channels)[
                position[block_rows[part]], :, position[block_cols[part]], :] = data[part]
            for child in (c for c in front.children if c in updates):  # radius 0: no boundary, no update
                where = (position[self.fronts[child].bound[::channels] // channels][:, None] * channels
                         + np.arange(channels)[None, :]).ravel()
                dense[np.ix_(where, where)] += updates.pop(child)
            if s == 0:
                continue
            if symmetric:
                l11, info = dpotrf(dense[:s, :s], lower=1, clean=1, overwrite_a=1)
                if info != 0:
                    raise FrontSingular(f"front {k} of {len(self.fronts)}: not positive definite at pivot {info}")
                front.lu = l11
                front.l21 = solve_triangular(l11, dense[s:, :s].T, lower=True, check_finite=False).T
                front.u12 = front.l21.T
                if b:
                    updates[k] = dense[s:, s:] - front.l21 @ front.u12
                self.flops += s**3 / 3 + s * s * b + s * b * b
                continue
            lu, ipiv, info = dgetrf(dense[:s, :s], overwrite_a=1)
            if info > 0:
                raise FrontSingular(f"front {k} of {len(self.fronts)}: pivot {info} of {s} is exactly zero")
            front.lu, front.perm = lu, _swaps_to_permutation(ipiv)
            front.l21 = solve_triangular(lu, dense[s:, :s].T, trans="T", check_finite=False).T
            front.u12 = solve_triangular(lu, dense[:s, s:][front.perm], lower=True, unit_diagonal=True,
                                         check_finite=False)
            if b:
                updates[k] = dense[s:, s:] - front.l21 @ front.u12
            self.flops += 2 / 3 * s**3 + 2 * s * s * b + 2 * s * b * b

    def solve(self, rhs: np.ndarray, trans: str = "N") -> np.ndarray:
        """``A^{-1} rhs`` (``trans="T"``: ``A^{-T} rhs``) for a vector of length ``n``."""
        from scipy.linalg.blas import dtrsv

        x = np.asarray(rhs, dtype=np.float64)[self.order]
        partial: list[np.ndarray | None] = [None] * len(self.fronts)
        live = [(k, f) for k, f in enumerate(self.fronts) if f.lu is not None]
        if trans not in ("N", "T"):
            raise ValueError(f"trans is 'N' or 'T', not {trans!r}")
        # L solves leaves first, then U solves root first; symmetric: L L^T, and A^T = A
        lower, upper = ({"lower": 1}, {"lower": 1, "trans": 1}) if self.symmetric else ({"lower": 1, "diag": 1},
                                                                                     {"lower": 0})
        if trans == "N" or self.symmetric:
            for k, f in live:
                partial[k] = w = dtrsv(f.lu, x[f.sep] if f.perm is None else x[f.sep][f.perm], **lower)
                if len(f.bound):
                    x[f.bound] -= f.l21 @ w
            for k, f in reversed(live):
                w = partial[k]
                if len(f.bound):
                    w = w - f.u12 @ x[f.bound]
                x[f.sep] = dtrsv(f.lu, w, **upper)
        else:  # A^T = U^T L^T P^T, fronts in the same order
            for k, f in live:
                partial[k] = w = dtrsv(f.lu, x[f.sep], lower=0, trans=1)
                if len(f.bound):
                    x[f.bound] -= f.u12.T @ w
            for k, f in reversed(live):
                w = partial[k]
                if len(f.bound):
                    w = w - f.l21.T @ x[f.bound]
                unpermuted = np.empty_like(w)
                unpermuted[f.perm] = dtrsv(f.lu, w, lower=1, trans=1, diag=1)
                x[f.sep] = unpermuted
        out = np.empty_like(x)
        out[self.order] = x
        return out


def normwise_backward_error(residual: np.ndarray, norm: float, x: np.ndarray, rhs: np.ndarray) -> float:
    """``||b - A x||_inf / (||A||_inf ||x||_inf + ||b||_inf)`` from the residual ``b - A x`` and ``||A||_inf``."""
    scale = norm * np.abs(x).max() + np.abs(rhs).max()
    return float(np.abs(residual).max() / scale) if scale > 0 else 0.0


def backward_error(matrix: Any, x: np.ndarray, rhs: np.ndarray, trans: str = "N") -> float:
    """Normwise backward error of a solve with a sparse matrix (``A^T`` for ``"T"``)."""
    a = matrix if trans == "N" else matrix.T
    return normwise_backward_error(rhs - a @ x, float(abs(a).sum(axis=1).max()), x, rhs)


def grid_lu(blocks: Any, grid: tuple[int, int, int], *, leaf: int = LEAF_UNKNOWNS, seed: int = 0,
            max_bytes: float = float("inf"), symmetric: bool = False) -> GridLU | None:
    """:class:`GridLU` of ``blocks``, or None where its static pivoting fails or is inaccurate.

    The factorization is kept when a random solve, plain and transposed, has a
    normwise backward error at most :data:`BACKWARD_ERROR_MAX`.

    Parameters
    ----------
    blocks : scipy.sparse.bsr_matrix
        Pixel-major, ``C x C`` blocks (:func:`pixel_blocks`).
    grid : (C, H, W)
    leaf : int
        As in :class:`GridLU`.
    seed : int
        Seed of the random right-hand side.
    max_bytes : float
        As in :class:`GridLU` (:class:`FactorTooLarge` propagates).
    symmetric : bool
        As in :class:`GridLU`.

    Returns
    -------
    GridLU or None
    """
    try:
        factor = GridLU(blocks, grid, leaf=leaf, max_bytes=max_bytes, symmetric=symmetric)
    except FrontSingular:
        return None
    rhs = np.random.default_rng(seed).standard_normal(factor.n)
    for trans in ("N", "T"):
        x = factor.solve(rhs, trans)  # both channel-major; the check in pixel-major order
        if not np.all(np.isfinite(x)) or backward_error(blocks, x[factor.order], rhs[factor.order],
                                                        trans) > BACKWARD_ERROR_MAX:
            return None
    return factor
