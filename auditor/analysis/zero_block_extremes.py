"""Extreme singular values of linearized blocks with zero padding (the real convolutions).

A block with factors ``W_1 .. W_k`` (the convolutions of
:class:`auditor.analysis.spectra.ConvOperator`, every factor of the
linearization folded in) and shortcut ``S`` is, with ReLU taken as the
identity, the linear map ``A = S + W_k ... W_1`` that torch applies: each
``W_i`` is ``conv2d`` with the layer's own stride, padding and groups (a
dilated kernel enters as its zero-filled plain kernel), times its per-channel
output factors; ``S`` is the identity, option A (``x[:, ::s, ::s]`` between
zero channels) or a convolution (a 1x1 projection with stride, the pooled
projection of :mod:`auditor.analysis.pooled_projection`); its torch maps are
:func:`auditor.analysis.zero_maps.block_map`. The plain branch is
``B = W_k ... W_1``. Singular values are over ``m = min(rows, cols)``: the
Gram operator ``G`` of the smaller side (``A^T A`` for a tall or square ``A``,
``A A^T`` for a wide one) has them squared as eigenvalues.

How each extreme is found, and what certifies it:

1. **Structural zero.** ``rank B <= min_i min(rows_i, cols_i)`` and
   ``rank A <= rank B + rank S``; a bound below ``m`` proves ``sigma_min = 0``
   (a bottleneck's plain branch). No solve.
2. **Dense** (``m <= dense_max``): the operator's matrix (the torch map applied
   to the identity's columns) and LAPACK's SVD: every value, exact.
3. **Factored** (stride-1 operators on one grid within the torus solver's
   limits, or a matrix of at most ``sparse_max_nnz`` stored entries: every
   CIFAR ResNet block): ``sigma_max^2`` is the top eigenvalue of ``G`` by
   Lanczos with full reorthogonalization on the torch products (``conv2d`` and
   its adjoint: ``conv_transpose2d``, or at stride 1 ``conv2d`` with the
   flipped kernel), stopped when the Ritz residual
   ``||G y - theta y|| <= tol theta`` (an eigenvalue lies within it; Parlett,
   Thm 4.5.1; :func:`auditor.analysis.zero_lanczos.lanczos`). ``sigma_min``: a
   single convolution, or a block of stride-1 convolutions on one grid with an
   identity or stride-1 shortcut, is solved
   on a slightly larger torus (:mod:`auditor.analysis.torus_capacitance`, the
   capacitance matrix method, checked by its backward error; it needs no sparse
   matrix, so it also reaches operators beyond ``sparse_max_nnz``). Otherwise, or
   where its check fails, the matrix built exactly from the kernels
   (``scipy.sparse``, one entry per tap and pixel; a ``C x C`` block per pair of
   coupled pixels) is factored by nested dissection
   (:mod:`auditor.analysis.grid_lu`, checked by its backward error; SuperLU
   where its front-local pivoting fails): ``A`` itself when square, ``G``
   otherwise (formed from the blocks; a strided factor's grid grouped into
   cells); a plain branch of square factors: each ``W_i`` on its own,
   ``B^{-1} = W_1^{-1} ... W_k^{-1}``, whose 3x3 stencils fill in far less than
   the product's 5x5 one; a plain branch whose first factor is strided:
   ``(B B^T)^{-1} = W_k^{-T} .. (W_1 W_1^T)^{-1} .. W_k^{-1}``. Lanczos on
   ``G^{-1}`` gives ``sigma_min^2 = 1 / lambda_max(G^{-1})`` with the same
   residual test. An exactly singular pivot is ``sigma_min = 0``; a value from a
   formed Gram matrix below ``sqrt(n eps) sigma_max`` (what its rounding
   resolves) is an interval.
4. **Interval** (larger operators, e.g. 224 px down-sampling or residual
   blocks, or step 3 not converged within ``max_iterations``): no number, a
   certified interval
   ``[lower, upper]``. ``upper`` is the Rayleigh quotient ``y^T G y`` of the
   smallest Ritz vector of the Lanczos run on ``G`` (of the inverse run in
   step 3: ``1 / sqrt(theta)``), which no eigenvalue's minimum exceeds
   (Courant-Fischer); ``lower`` is Weyl's ``sigma_min(S) - ||B||`` with
   ``||B|| <= prod_i ||W_i||`` and ``||W_i|| <= sum_taps ||c_o K_ab||_2``
   (the triangle inequality over the taps: a provable bound), or 0.

References
----------
.. [1] B. N. Parlett, "The Symmetric Eigenvalue Problem", SIAM 1998 (Ritz
   values, residual bounds, Lanczos with reorthogonalization).
.. [2] H. Weyl, "Das asymptotische Verteilungsgesetz der Eigenwerte linearer
   partieller Differentialgleichungen", Math. Ann. 71 (1912) (perturbation of
   singular values).
.. [3] X. S. Li, "An overview of SuperLU", ACM TOMS 31 (2005).
.. [4] A. George, "Nested dissection of a regular finite element mesh", SIAM J. Numer. Anal. 10 (1973).
.. [5] B. L. Buzbee, F. W. Dorr, J. A. George, G. H. Golub, "The direct solution of the discrete Poisson
   equation on irregular regions", SIAM J. Numer. Anal. 8 (1971) (the capacitance matrix method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .batched import blas_single_thread, torch_single_thread
from .grid_lu import FactorTooLarge, factor_bytes
from .spectra import ConvOperator, IdentityShortcut, OptionAShortcut
from .torus_capacitance import GridStencil, torus_feasible, torus_solver
from .zero_lanczos import lanczos, restarted_top
from .zero_maps import BlockMap, block_map
from .zero_matrices import (
    block_stencil,
    bsr_product,
    coarse_blocks,
    conv_blocks,
    conv_matrix,
    estimated_nnz,
    operator_blocks,
    sparse_matrix,
)

__all__ = [
    "ZeroOperatorExtremes", "ZeroBlockExtremes", "BlockMap", "zero_block_extremes", "zero_operator_extremes", "block_map", "sparse_matrix",
    "DEFAULT_MAX_ITERATIONS", "DENSE_MAX", "SPARSE_MAX_NNZ", "LARGE_MAX_STEPS", "factorable",
    "shares_factorization", "grid_factorable", "torus_reachable", "lu_bytes", "GRID_LU_MAX_BYTES",
]

# Lanczos steps (largest values, and the smallest by inverse iteration) before an extreme is given up
# as not certified: the interval then.
DEFAULT_MAX_ITERATIONS = 300
# Operators with at most this many singular values take the dense SVD.
DENSE_MAX = 1024
# Operators whose sparse matrix (the product of the factors' matrices) holds more entries take the interval path.
SPARSE_MAX_NNZ = 40_000_000
# Lanczos steps on the operators beyond the sparse factorization (224 px: each step is a block's forward
# and adjoint in float64; the basis is kept for the reorthogonalization).
LARGE_MAX_STEPS = 80
# ... where the basis of max_iterations steps would take more than this (operators beyond the sparse
# factorization with fewer unknowns run the full max_iterations: a 64-channel block at 32 px, 65,536 of them).
LANCZOS_BASIS_BYTES = 1 << 28
# Nested-dissection factors above this many bytes are not built (the operator's sigma_min is then an interval;
# a 64-channel 3x3 convolution at 32x32 takes 1.2 GB, ResNet-56's largest 0.2 GB).
GRID_LU_MAX_BYTES = 1 << 30
# A block's branch convolutions share their LU with the plain branch when each takes at most this (both are
# kept while the branch is conditioned, on each worker thread).
SHARED_MAX_BYTES = 1 << 28
_TOL = 1e-7  # relative Ritz residual of the Lanczos runs (an eigenvalue within 1e-7: sigma to 5e-8)
# Operators up to this many unknowns run on one thread (products of one vector: thread barriers cost more
# than the work on a busy machine, see batched.torch_single_thread).
_ONE_THREAD_MAX = 1 << 17
_EPS = float(np.finfo(np.float64).eps)


@dataclass(frozen=True)
class ZeroOperatorExtremes:
    """``sigma_max`` and ``sigma_min`` of one zero-padded operator, or an interval for ``sigma_min``.

    Attributes
    ----------
    sigma_max : float
        Largest singular value (a Lanczos lower bound when ``max_converged`` is False).
    sigma_min : float or None
        Smallest of ``min(rows, cols)`` singular values; None when only ``sigma_min_interval`` is known.
    sigma_min_interval : (float, float)
        ``[lower, upper]`` certified to hold ``sigma_min`` (both equal to it when it is known).
    method : str
        ``dense-svd``, ``lanczos; grid-lu-inverse-lanczos`` (``...-per-factor-...``: a plain branch by its
        factors; ``sparse-lu`` where SuperLU took over), ``lanczos; structural-zero (...)``,
        ``lanczos; interval`` ...
    max_converged : bool
        The Lanczos residual test of ``sigma_max`` passed.
    reason : str or None
        Why ``sigma_min`` is an interval (or why ``sigma_max`` did not converge).
    steps : int
        Operator products spent.
    """

    sigma_max: float
    sigma_min: float | None
    sigma_min_interval: tuple[float, float]
    method: str
    max_converged: bool = True
    reason: str | None = None
    steps: int = 0


@dataclass(frozen=True)
class ZeroBlockExtremes:
    """Extremes of the plain branch and of the residual block (None without a shortcut)."""

    plain: ZeroOperatorExtremes
    residual: ZeroOperatorExtremes | None
    side: int
    factors: tuple[ZeroOperatorExtremes | None, ...] = ()  # each convolution alone (``factor_extremes``)


def factorable(convs: Sequence[ConvOperator], sparse_max_nnz: float = SPARSE_MAX_NNZ) -> bool:
    """Whether the sparse matrix of ``W_k ... W_1`` is within reach (its stored entries at most ``sparse_max_nnz``).

    Beyond it only the torus solver (:func:`torus_reachable`) certifies ``sigma_min``; elsewhere it is an interval
    (e.g. 224 px residual blocks).
    """
    return estimated_nnz(convs) <= sparse_max_nnz


def _gram(mapping: BlockMap) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, ...], int]:
    """The Gram operator of the smaller side on flat vectors, its shape and size."""
    if mapping.rows >= mapping.cols:
        shape = mapping.input_shape

        def apply(v: torch.Tensor) -> torch.Tensor:
            return mapping.adjoint(mapping.forward(v.reshape(1, *shape))).reshape(-1)
    else:
        shape = mapping.output_shape

        def apply(v: torch.Tensor) -> torch.Tensor:
            return mapping.forward(mapping.adjoint(v.reshape(1, *shape))).reshape(-1)
    return apply, shape, math.prod(shape)


# ---------------------------------------------------------------- bounds


def _tap_norm_bound(op: ConvOperator) -> float:
    """``||W|| <= sum_taps ||c_o K_ab||_2`` (triangle inequality; each tap is a shifted, masked copy)."""
    weight = op.scaled_weight().detach().to("cpu", torch.float64)
    c_out, per_in, kh, kw = weight.shape
    per_out = c_out // op.groups
    total = 0.0
    for a in range(kh):
        for b in range(kw):
            tap = weight[:, :, a, b].reshape(op.groups, per_out, per_in)
            total += float(torch.linalg.matrix_norm(tap, ord=2).max())
    return total


def _shortcut_sigma_min(shortcut: Any, side: str) -> float:
    """A provable lower bound of ``sigma_min(S)`` over the block's ``min(rows, cols)`` values (0 if unknown)."""
    if isinstance(shortcut, IdentityShortcut):
        return 1.0
    if isinstance(shortcut, OptionAShortcut):
        c, h, w = shortcut.input_shape
        dropped = shortcut.stride > 1 and (h > 1 or w > 1)
        # wide side: rows of the zero channels are zero (if any); tall side: dropped pixels are a kernel
        zero_rows = shortcut.out_channels > c
        return 0.0 if (side == "wide" and zero_rows) or (side == "tall" and dropped) else 1.0
    if shortcut.kernel_size == (1, 1) and shortcut.padding == (0, 0) and shortcut.groups == 1:
        matrix = shortcut.scaled_weight().detach().to("cpu", torch.float64)[:, :, 0, 0]
        c_out, c_in = matrix.shape
        values = torch.linalg.svdvals(matrix)
        strided = shortcut.stride != (1, 1)
        if side == "wide" and c_out <= c_in:  # S S^T = I (x) W W^T on the output pixels
            return float(values[-1])
        if side == "tall" and not strided and c_in <= c_out:  # S^T S = I (x) W^T W
            return float(values[-1])
    return 0.0


def _weyl_lower(convs: Sequence[ConvOperator], shortcut: Any, side: str) -> float:
    """``max(0, sigma_min(S) - prod_i ||W_i||)`` with provable bounds of both terms."""
    if shortcut is None:
        return 0.0
    branch = math.prod(_tap_norm_bound(op) for op in convs)
    return max(0.0, _shortcut_sigma_min(shortcut, side) - branch)


def _rank_bound(convs: Sequence[ConvOperator], shortcut: Any) -> int | None:
    """An upper bound of ``rank A`` from the factors' sizes; None when the identity makes none."""
    chain = min(min(math.prod(op.output_shape), math.prod(op.input_shape)) for op in convs)
    if shortcut is None:
        return chain
    if isinstance(shortcut, IdentityShortcut):
        return None
    return chain + min(math.prod(shortcut.output_shape), math.prod(shortcut.input_shape))


# ---------------------------------------------------------------- one operator


def _dense_extremes(mapping: BlockMap) -> ZeroOperatorExtremes:
    columns = torch.eye(mapping.cols, dtype=torch.float64).reshape(mapping.cols, *mapping.input_shape)
    matrix = torch.cat([mapping.forward(part) for part in columns.split(512)]).reshape(mapping.cols, -1).T
    values = np.linalg.svd(matrix.numpy(), compute_uv=False)
    top, bottom = float(values[0]), float(values[-1])
    return ZeroOperatorExtremes(top, bottom, (bottom, bottom), "dense-svd")


class _Operand:
    """A square matrix to factor: channel-major CSR (built on demand, for SuperLU); where its unknowns are one
    grid's, the same matrix as pixel-major blocks for :class:`auditor.analysis.grid_lu.GridLU` (built on first
    use); for stride-1 convolutions on one grid, their stencil (the torus solver's input)."""

    def __init__(self, csr: Callable[[], Any], blocks: Any = None, grid: tuple[int, int, int] | None = None,
                 key: int | None = None, stencil: Callable[[], GridStencil | None] | None = None,
                 spd: bool = False) -> None:
        self.csr, self.grid, self.key, self.stencil = csr, grid, key, stencil
        self.spd = spd  # a formed Gram matrix: Cholesky fronts first
        self._blocks = blocks  # the BSR matrix, or a function that builds it

    @property
    def blocks(self) -> Any:
        """The pixel-major BSR matrix (None without one)."""
        if callable(self._blocks):
            self._blocks = self._blocks()
        return self._blocks


class TorusRefused(FactorTooLarge):
    """An operator beyond the sparse factorization whose torus solver failed its accuracy check."""


def _factor_solves(operand: _Operand, ordering: str, cache: dict[int, Any] | None = None, sparse: bool = True
                   ) -> tuple[Callable[[np.ndarray, str], np.ndarray], str]:
    """``(b, trans) -> M^{-1} b`` (``trans="T"``: ``M^{-T} b``) and the factorization's name.

    The torus capacitance solver where the operand is a stencil (:func:`auditor.analysis.torus_capacitance.
    torus_solver`: a dense LU of the grid's boundary strip; ResNet-56's operators 1.7-5x faster than by nested
    dissection, bench/README.md) and its backward-error check passes; else nested dissection where the operand
    has blocks (:func:`auditor.analysis.grid_lu.grid_lu`, 3-40x faster than SuperLU), unless its static
    pivoting fails or its backward-error check does; then SuperLU, which raises RuntimeError when a pivot is
    exactly 0. ``cache`` keeps a factorization by its operand's key, for the next operator that has the same
    factor. ``sparse=False`` (an operator beyond the sparse factorization): the torus solver or
    :class:`TorusRefused`.
    """
    if cache is not None and operand.key is not None and operand.key in cache:
        return cache[operand.key]
    found = _new_factor_solves(operand, ordering, sparse)
    if cache is not None and operand.key is not None:
        cache[operand.key] = found
    return found


def _new_factor_solves(operand: _Operand, ordering: str, sparse: bool = True
                       ) -> tuple[Callable[[np.ndarray, str], np.ndarray], str]:
    """:func:`_factor_solves` without a cache."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    from .grid_lu import grid_lu

    stencil = operand.stencil() if operand.stencil is not None else None
    if stencil is not None:
        torus = torus_solver(stencil, max_bytes=GRID_LU_MAX_BYTES)
        if torus is not None:
            if stencil.n == math.prod(operand.grid or ()):
                return torus.solve, "torus-capacitance"
            first = slice(0, math.prod(operand.grid or ()))  # the Schur complement: the first variable

            def schur_solve(b: np.ndarray, trans: str = "N") -> np.ndarray:
                full = np.zeros(stencil.n)
                full[first] = b
                return torus.solve(full, trans)[first]

            return schur_solve, "torus-capacitance"
    if not sparse:
        raise TorusRefused("the operator is beyond the sparse factorization, and its torus solve failed the "
                           "backward-error check")
    if operand.blocks is not None and operand.grid is not None:
        if operand.spd:  # Cholesky fronts: half the flops and factors; LU where it is not numerically definite
            nested = grid_lu(operand.blocks, operand.grid, max_bytes=GRID_LU_MAX_BYTES, symmetric=True)
            if nested is not None:
                return nested.solve, "grid-cholesky"
        nested = grid_lu(operand.blocks, operand.grid, max_bytes=GRID_LU_MAX_BYTES)
        if nested is not None:
            return nested.solve, "grid-lu"
    factor = splu(sp.csc_matrix(operand.csr()), permc_spec=ordering)
    return (lambda b, trans="N": factor.solve(b, trans=trans)), "sparse-lu"


def _resolved(solve: Callable[[np.ndarray, str], np.ndarray], operand: _Operand, n: int) -> bool:
    """Whether a formed Gram matrix ``M`` resolves its smallest eigenvalue: ``lambda_min >= 10 n eps ||M||_inf``.

    Forming and factoring ``M`` perturbs its eigenvalues by up to ~``n eps ||M||``; ``lambda_min`` comes from a
    short Lanczos run on ``M^{-1}`` (a Ritz value bounds ``lambda_max(M^{-1})`` from below, so the
    estimate of ``lambda_min`` is an upper bound: the test errs towards "not resolved" only by that).
    """
    matrix = operand.blocks if operand.blocks is not None else operand.csr()
    norm = float(abs(matrix).sum(axis=1).max())
    run = lanczos(lambda v: torch.from_numpy(solve(v.numpy(), "N")), n, 60, 1e-3, want_bottom=False)
    return run.top > 0 and 1.0 / run.top >= 10 * n * _EPS * norm


def _inverse_smallest(operands: Sequence[_Operand], mode: str, max_steps: int, tol: float,
                      ordering: str, cache: dict[int, Any] | None = None, sparse: bool = True
                      ) -> tuple[float | None, float, str]:
    """``sigma_min`` by Lanczos on ``G^{-1}`` from LU factors; (value or None, upper bound, note).

    ``mode``:

    - ``"gram"``: ``operands == [G]``, the Gram matrix itself;
    - ``"factors"``: the square factors ``W_1 .. W_k`` of ``B = W_k ... W_1`` (``[A]`` for a square ``A``):
      each is factored on its own (a 3x3 stencil's matrix fills in far less than the product's 5x5 one) and
      ``B^{-1} B^{-T} = W_1^{-1} ... W_k^{-1} W_k^{-T} ... W_1^{-T}`` has the eigenvalues of ``(B^T B)^{-1}``;
    - ``"wide-factors"``: ``[W_1 W_1^T, W_2, .., W_k]`` for a wide first factor (a strided convolution) and
      square others: ``(B B^T)^{-1} = W_k^{-T} .. W_2^{-T} (W_1 W_1^T)^{-1} W_2^{-1} .. W_k^{-1}``, which squares
      the condition of ``W_1`` alone, not that of ``B``.

    ``sparse=False``: only the torus solver (an operator beyond the sparse factorization).
    """
    try:
        solves, kinds = zip(*(_factor_solves(operand, ordering, cache, sparse) for operand in operands))
    except RuntimeError:  # SuperLU: "Factor is exactly singular"
        return 0.0, 0.0, "sparse-lu (exactly singular pivot)"
    except TorusRefused as err:
        return None, math.inf, f"torus-capacitance (not built: {err})"
    except FactorTooLarge as err:
        return None, math.inf, f"grid-lu (not built: {err})"

    def inverse_gram(v: torch.Tensor) -> torch.Tensor:
        x = v.numpy()
        if mode == "gram":
            return torch.from_numpy(solves[0](x, "N"))
        if mode == "wide-factors":
            for solve in reversed(solves[1:]):  # W_k^{-1} first
                x = solve(x, "N")
            x = solves[0](x, "N")
            for solve in solves[1:]:  # then W_2^{-T} first
                x = solve(x, "T")
            return torch.from_numpy(x)
        for solve in solves:  # B^{-T} = W_k^{-T} ... W_1^{-T}: W_1^{-T} first
            x = solve(x, "T")
        for solve in reversed(solves):  # B^{-1} = W_1^{-1} ... W_k^{-1}: W_k^{-1} first
            x = solve(x, "N")
        return torch.from_numpy(x)

    lu = "+".join(sorted(set(kinds)))
    n = int(operands[0].csr().shape[1]) if operands[0].grid is None else math.prod(operands[0].grid)
    if mode == "wide-factors" and not _resolved(solves[0], operands[0], n):
        return None, math.inf, f"{lu}-per-factor-inverse-lanczos (W_1 W_1^T not resolved)"
    run = lanczos(inverse_gram, n, max_steps, tol, want_bottom=False)
    if not math.isfinite(run.top) or run.top <= 0:
        return 0.0, 0.0, f"{lu} (singular to working precision)"
    bound = 1.0 / math.sqrt(run.top)  # theta <= lambda_max(G^{-1}), so this is >= sigma_min
    note = f"{lu}-per-factor-inverse-lanczos" if mode != "gram" and len(operands) > 1 else f"{lu}-inverse-lanczos"
    return (bound if run.top_converged else None), bound, note


def _grid(shape: tuple[int, ...], other: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``shape`` when a square operator maps it to ``other == shape`` (one grid's unknowns), else None."""
    return (int(shape[0]), int(shape[1]), int(shape[2])) if tuple(shape) == tuple(other) else None


def _operands(mapping: BlockMap, convs: Sequence[ConvOperator], shortcut: Any,
              side: str) -> tuple[list[_Operand], str]:
    """What :func:`_inverse_smallest` factors for ``S + W_k ... W_1``, and its mode (see its docstring)."""
    from .grid_lu import channel_major

    def square(op: ConvOperator) -> _Operand:
        grid = _grid(op.input_shape, op.output_shape)
        on_grid = grid is not None and op.stride == (1, 1)
        return _Operand((lambda: conv_matrix(op)), (lambda: conv_blocks(op)) if on_grid else None, grid, id(op),
                        (lambda: block_stencil([op], None)) if on_grid else None)

    def is_square(op: ConvOperator) -> bool:
        return math.prod(op.output_shape) == math.prod(op.input_shape)

    if shortcut is None and all(is_square(op) for op in convs):
        # a plain branch of square factors: each factor's own LU (ResNet-56, COLAMD, load ~4: 10-12 s against
        # 21 s for the product on a 32x32x16 block, 1.7 s against 5.0 s on an 8x8x64 one)
        return [square(op) for op in convs], "factors"
    first = convs[0]
    if (shortcut is None and len(convs) > 1 and math.prod(first.output_shape) < math.prod(first.input_shape)
            and all(is_square(op) for op in convs[1:])):
        blocks = coarse_blocks(conv_matrix(first), first.input_shape, first.output_shape,
                                (int(first.output_shape[1]), int(first.output_shape[2])))
        if blocks is not None:
            gram = bsr_product(blocks, blocks, tuple(first.output_shape[1:]), transpose_right=True)
            grid = (gram.blocksize[0], int(first.output_shape[1]), int(first.output_shape[2]))
            return [_Operand(lambda: channel_major(gram, grid), gram, grid, spd=True),
                    *(square(op) for op in convs[1:])], "wide-factors"
    grid = _grid(mapping.input_shape, mapping.output_shape)
    if grid is not None:  # a square operator on one grid: its blocks when the torus solver does not take it

        def on_grid_blocks() -> Any:
            found = operator_blocks(convs, shortcut)
            return found if found is not None and found.blocksize == (grid[0], grid[0]) else None

        return [_Operand(lambda: sparse_matrix(convs, shortcut), on_grid_blocks, grid, None,
                         lambda: block_stencil(convs, shortcut))], "factors"
    blocks = operator_blocks(convs, shortcut)
    cells = tuple(int(v) for v in mapping.output_shape[1:])
    if mapping.rows == mapping.cols:
        fits = blocks is not None and blocks.blocksize[0] == blocks.blocksize[1]
        return [_Operand(lambda: sparse_matrix(convs, shortcut), blocks if fits else None,
                         (blocks.blocksize[0], *cells) if fits else None)], "factors"
    if blocks is not None:  # the Gram matrix of the smaller side, as blocks over the output grid's pixels
        smaller = blocks.T.tobsr() if side == "tall" else blocks  # the Gram matrix is smaller @ smaller^T
        gram = bsr_product(smaller, smaller, cells, transpose_right=True)
        grid = (gram.blocksize[0], *cells)
        # the fallback's CSR: the same matrix up to a symmetric permutation (the same eigenvalues)
        return [_Operand(lambda: channel_major(gram, grid), gram, grid, spd=True)], "gram"
    matrix = sparse_matrix(convs, shortcut)
    gram_csr = ((matrix.T @ matrix) if side == "tall" else (matrix @ matrix.T)).tocsr()
    return [_Operand(lambda: gram_csr)], "gram"


def zero_operator_extremes(convs: Sequence[ConvOperator], shortcut: Any, *,
                           max_iterations: int = DEFAULT_MAX_ITERATIONS, tol: float = _TOL,
                           dense_max: int = DENSE_MAX, sparse_max_nnz: float = SPARSE_MAX_NNZ,
                           factor_cache: dict[int, Any] | None = None) -> ZeroOperatorExtremes:
    """Extremes of ``S + W_k ... W_1`` (``shortcut=None``: the plain branch) with zero padding.

    Parameters
    ----------
    convs : sequence of ConvOperator
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
    max_iterations : int
        Lanczos steps of each run before it stops without certificate.
    tol : float
        Relative Ritz residual of the convergence tests.
    dense_max : int
        Dense SVD up to this many singular values.
    sparse_max_nnz : float
        Sparse factorization up to this many (estimated) stored entries.
    factor_cache : dict, optional
        LU factorizations of single convolutions (square factors), kept by the id of their
        :class:`ConvOperator` and reused by later calls with the same objects (a block's plain branch after
        its layers).

    Returns
    -------
    ZeroOperatorExtremes
        See the module docstring for the methods and certificates.
    """
    mapping = block_map(convs, shortcut)
    if max(mapping.rows, mapping.cols) > _ONE_THREAD_MAX:
        return _extremes(mapping, convs, shortcut, max_iterations, tol, dense_max, sparse_max_nnz, factor_cache)
    # imported before blas_single_thread(): that limits the BLAS libraries loaded so far
    import scipy.sparse.linalg  # noqa: F401

    with blas_single_thread(), torch_single_thread():
        return _extremes(mapping, convs, shortcut, max_iterations, tol, dense_max, sparse_max_nnz, factor_cache)


def _extremes(mapping: BlockMap, convs: Sequence[ConvOperator], shortcut: Any, max_iterations: int, tol: float,
              dense_max: int, sparse_max_nnz: float, cache: dict[int, Any] | None = None) -> ZeroOperatorExtremes:
    """:func:`zero_operator_extremes` once the threads are set."""
    m = min(mapping.rows, mapping.cols)
    if m <= dense_max:
        return _dense_extremes(mapping)
    apply, _, n = _gram(mapping)
    rank = _rank_bound(convs, shortcut)
    structural = rank is not None and rank < m
    large = estimated_nnz(convs) > sparse_max_nnz
    capped = large and 8 * n * max_iterations > LANCZOS_BASIS_BYTES
    steps = min(max_iterations, LARGE_MAX_STEPS) if capped else max_iterations
    run = lanczos(apply, n, steps, tol, want_bottom=large and not structural)
    if capped and not run.top_converged:  # restarts keep a small basis: up to max_iterations more products
        value, converged, more = restarted_top(apply, n, max_iterations, tol)
        run = replace(run, top=value if converged else max(value, run.top), top_converged=converged,
                                  steps=run.steps + more)
    top = math.sqrt(max(run.top, 0.0))
    max_note = None if run.top_converged else (
        f"sigma_max did not converge in {steps} Lanczos steps" + (" and restarted Lanczos" if capped else ""))
    if structural:
        return ZeroOperatorExtremes(top, 0.0, (0.0, 0.0), f"lanczos; structural-zero (rank <= {rank} < {m})",
                                    run.top_converged, max_note, run.steps)
    side = "tall" if mapping.rows >= mapping.cols else "wide"
    lower = _weyl_lower(convs, shortcut, side)
    if large and not torus_reachable(convs, shortcut):
        upper = math.sqrt(max(run.bottom_upper, 0.0))
        why = (f"sigma_min not certified: the operator ({mapping.rows} x {mapping.cols}) is beyond the sparse "
               f"factorization, and Lanczos ({run.steps} products) bounds it only from above")
        return ZeroOperatorExtremes(top, None, (min(lower, upper), upper), "lanczos; interval", run.top_converged,
                                    "; ".join(filter(None, [max_note, why])), run.steps)
    # COLAMD for a plain branch: its fill bound holds whatever rows partial pivoting swaps (a nearly
    # singular branch pivots off the diagonal: 19 s against minutes for the symmetric ordering on a
    # ResNet-56 block); the shortcut keeps the residual's pivots on the diagonal, where the symmetric
    # ordering is 3-4x cheaper.
    ordering = "COLAMD" if shortcut is None else "MMD_AT_PLUS_A"
    operands, mode = _operands(mapping, convs, shortcut, side)
    value, upper, method = _inverse_smallest(operands, mode, max_iterations, tol,
                                             ordering if mode == "factors" else "MMD_AT_PLUS_A", cache,
                                             sparse=not large)
    why = None
    if value is None and "not built" in method:
        # sigma_min <= sigma_max, or (beyond the sparse factorization) the smallest Ritz vector's Rayleigh quotient
        upper = min(top, math.sqrt(max(run.bottom_upper, 0.0))) if large else top
        why = "sigma_min not certified: " + method.split("not built: ", 1)[1].rstrip(")")
    elif value is None and "not resolved" in method:
        upper = top
        why = "sigma_min not certified: the strided factor's Gram matrix W_1 W_1^T does not resolve its smallest value"
    elif value is None:
        why = f"sigma_min not certified: inverse Lanczos did not converge in {max_iterations} steps"
    elif mode == "gram" and 0 < value < math.sqrt(m * _EPS) * top:
        # G = A A^T (or A^T A) is formed and factored with errors up to ~m eps sigma_max^2 in its eigenvalues:
        # a sigma_min below sqrt(m eps) sigma_max is not resolved (ResNet-56 layer3.0's plain branch gave
        # 5.7e-12 and 9.1e-12 from two orders of the same sums): only its upper bound is kept
        upper = math.sqrt(value**2 + m * _EPS * top**2)
        why = (f"sigma_min below what the Gram matrix of the {side} operator resolves "
               f"(sqrt(n eps) sigma_max = {math.sqrt(m * _EPS) * top:.3g}): bounded from above only")
    if why is not None:
        return ZeroOperatorExtremes(top, None, (min(lower, upper), upper), f"lanczos; {method}; interval",
                                    run.top_converged, "; ".join(filter(None, [max_note, why])), run.steps)
    return ZeroOperatorExtremes(top, value, (value, value), f"lanczos; {method}", run.top_converged, max_note,
                                run.steps)


def torus_reachable(convs: Sequence[ConvOperator], shortcut: Any, *, max_bytes: float = GRID_LU_MAX_BYTES) -> bool:
    """Whether the torus solver can take ``S + W_k ... W_1``'s ``sigma_min`` (``shortcut=None``: the plain branch
    of square factors, each factor's own stencil), with solvers of at most ``max_bytes`` each; it needs no
    sparse matrix, so it reaches operators beyond the entry cap (e.g. a 64-channel block at 32 px)."""
    if shortcut is None:
        if not all(math.prod(op.output_shape) == math.prod(op.input_shape) for op in convs):
            return False
        return all(torus_feasible(block_stencil([op], None), max_bytes=max_bytes) for op in convs)
    return torus_feasible(block_stencil(convs, shortcut), max_bytes=max_bytes)


def grid_factorable(op: ConvOperator, *, max_bytes: float = GRID_LU_MAX_BYTES,
                    sparse_max_nnz: float = SPARSE_MAX_NNZ) -> bool:
    """Whether a convolution's ``sigma_min`` is factored on its grid: stride 1, its grid kept, and the torus
    solver reaches it (:func:`torus_reachable`) or nested dissection does (within the entry cap), each with at
    most ``max_bytes``."""
    if op.stride != (1, 1) or tuple(op.input_shape) != tuple(op.output_shape):
        return False
    return ((factorable([op], sparse_max_nnz) and lu_bytes(op) <= max_bytes)
            or torus_reachable([op], None, max_bytes=max_bytes))


def shares_factorization(op: ConvOperator, *, dense_max: int = DENSE_MAX,
                         sparse_max_nnz: float = SPARSE_MAX_NNZ) -> bool:
    """Whether a convolution's own zero-padded extremes come from the LU its block's plain branch uses.

    A stride-1 convolution that keeps its grid, beyond the dense SVD and within the factorization: its
    ``sigma_min`` is inverse Lanczos on the nested-dissection LU of its matrix, the factor a plain branch of
    square factors takes too (:func:`zero_block_extremes` with ``factor_extremes=True`` gives both from one LU).
    """
    return math.prod(op.input_shape) > dense_max and grid_factorable(op, max_bytes=SHARED_MAX_BYTES,
                                                                     sparse_max_nnz=sparse_max_nnz)


def lu_bytes(op: ConvOperator) -> int:
    """Bytes of the nested-dissection factors of a stride-1 convolution that keeps its grid."""
    (kh, kw), (ph, pw) = op.kernel_size, op.padding
    radius = max(ph, kh - 1 - ph, pw, kw - 1 - pw, 0)
    return factor_bytes(tuple(int(v) for v in op.input_shape), radius)  # type: ignore[arg-type]


def zero_block_extremes(convs: Sequence[ConvOperator], shortcut: Any, *, factor_extremes: bool = False,
                        **options: Any) -> ZeroBlockExtremes:
    """Extremes of a block's plain branch and (with a shortcut) of the residual operator, zero padding.

    Parameters
    ----------
    convs : sequence of ConvOperator
        ``W_1 .. W_k`` as :func:`auditor.tasks.condition.block_operators` builds them.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
    factor_extremes : bool
        Also the extremes of each convolution alone (:func:`zero_operator_extremes` of ``[W_i]``) where
        :func:`shares_factorization`, from the same LU factorizations as the plain branch; None elsewhere.
    **options
        ``max_iterations``, ``tol``, ``dense_max``, ``sparse_max_nnz`` of :func:`zero_operator_extremes`.

    Returns
    -------
    ZeroBlockExtremes
        ``side`` is the larger dimension of the operator (for the singularity threshold).
    """
    cache: dict[int, Any] = {}
    factors: tuple[ZeroOperatorExtremes | None, ...] = ()
    if factor_extremes:
        limits = {k: options[k] for k in ("dense_max", "sparse_max_nnz") if k in options}
        factors = tuple(zero_operator_extremes([op], None, factor_cache=cache, **options)
                        if shares_factorization(op, **limits) else None for op in convs)
    plain = zero_operator_extremes(convs, None, factor_cache=cache, **options)
    cache.clear()
    residual = None if shortcut is None else zero_operator_extremes(convs, shortcut, **options)
    side = max(math.prod(convs[-1].output_shape), math.prod(convs[0].input_shape))
    return ZeroBlockExtremes(plain, residual, side, factors)
