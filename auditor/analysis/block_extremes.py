"""Extreme singular values of a linearized block, without its full spectrum.

The report needs ``sigma_max`` and ``sigma_min`` of every block operator
``A(u) = P_k(u) ... P_1(u) + S(u)`` (one small matrix per frequency ``u``,
see :mod:`auditor.analysis.conditioning`), not all of its singular values.
This module finds exactly those, with far less work than an eigen-decomposition
per frequency, in torch (the same code runs with ``--device cuda``):

1. **Structure first.** When the factors' supports bound the rank of every
   frequency matrix below the number of its singular values (a bottleneck's
   plain branch: rank <= width < channels; a down-sampling bottleneck: rank <=
   width + shortcut rank < output channels), ``sigma_min = 0``: no solve.
2. **Largest**: Lanczos on ``A^H A`` per frequency (all frequencies as one
   batch), applying the factors (``O(n w)`` per product: 1x1 factors are one
   shared matrix, 3x3 ones a sum of tap matrices times phases), never forming
   ``A``; convergence test on the Ritz residual (:mod:`.lanczos`). Only the
   largest over all frequencies is reported: a single-precision run on every
   frequency, then one double-precision product per frequency rules out
   those whose Rayleigh quotient plus residual is below another's Rayleigh
   quotient (:func:`_candidates`), and the double-precision run, which
   decides, refines the few that are left.
3. **Smallest**, when the block is ``S + L M(u) R`` with ``L``, ``R`` (1x1
   convolutions) and ``S`` (identity or a 1x1 projection) the same at every
   frequency and ``A`` square: the Woodbury identity
   ``A^{-1} = S^{-1} - S^{-1} L K(u)^{-1} M(u) R S^{-1}``, ``K = I + M R S^{-1} L``
   (of the bottleneck width), gives ``sigma_min(A) = 1 / sigma_max(A^{-1})``
   by Lanczos on ``A^{-H} A^{-1}`` (pruned as in 2). Accuracy: the Ritz value to 1e-6 (the
   convergence test; 5e-7 in sigma), the solves to about ``kappa(K) eps``: 1e-6 relative or
   better up to kappa 1e10, checked against the dense operator in the tests.
4. **Wide blocks without that structure** (ConvNeXt: a 7x7 depthwise first
   factor; RegNet, inverted bottlenecks: a middle no narrower than ``A``) whose
   reduced frequency matrices are square with a side of at least
   :data:`LANCZOS_MIN_SIDE`: each chunk's matrices are formed once (a depthwise
   kernel with constant factors on one side as one column scaling, ``O(C^2)``),
   ``sigma_max`` by Lanczos on ``P^H P`` with matrix-vector products and
   ``sigma_min`` by Lanczos on ``(P^H P)^{-1}`` with one LU per frequency and
   two solves per step, pruned as in 2 (:func:`_dense_lanczos`, method
   ``dense-lanczos``): ``O(n^2)`` per step instead of an ``O(n^3)``
   eigen-decomposition per frequency. A plain branch ``L diag(d(u))`` (or
   ``diag(d(u)) L``) is never formed: one real GEMM per step over all the
   frequencies and one LU of ``L`` (:class:`_ScaledGram`). ConvNeXt-T's
   features.7.0 (768 channels): about 60 s -> 2.1 s on this 2-core machine.
   Its accuracy is that of steps 2-3.
5. Anything else takes the dense per-frequency path, which is the full
   spectrum's own numpy code (same numbers to the bit): small blocks (reduced
   side below :data:`LANCZOS_MIN_SIDE`, e.g. every CIFAR network, computed in
   the full spectrum's single pass), rectangular ones, and the frequencies where
   ``K(u)`` or an LU of step 4 is singular or Lanczos did not converge.

References
----------
.. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional
   Layers", ICLR 2019.
.. [2] W. W. Hager, "Updating the Inverse of a Matrix", SIAM Review 31 (1989)
   (the Sherman-Morrison-Woodbury identity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .batched import (
    blas_single_thread,
    chunk_slices,
    extremes_of_matrices,
    parallel_map,
    sigma_of_matrices,
    torch_single_thread,
    worker_count,
)
from .block_algebra import block_matrices, block_spectra, compress_ends, depthwise_chain, reduce_block
from .frequencies import constant_tap, half_plane, kernel_symbols
from .frequency_operators import BlockKernels, FrequencyOperator, Woodbury
from .lanczos import DEFAULT_TOL, LanczosResult, largest_eigenvalues

__all__ = ["OperatorExtremes", "BlockExtremes", "block_extremes", "LANCZOS_MIN_SIDE"]

# Operators whose reduced per-frequency matrices (after the exact reductions of
# the full spectrum) have a smaller side below this take the dense path. With
# the single-precision warm start and a convergence test at every step, Lanczos
# beats an eigen-decomposition per frequency from a side of 128 on (ResNet-50's
# layer1 identity blocks: 1.42 -> 1.06 s; it tied there with 70 float64 steps);
# at 256 it is 2-3x faster, at 1024 ten times. Every CIFAR block stays dense.
LANCZOS_MIN_SIDE = 100
# Each Lanczos run (largest values, and the Woodbury smallest) first runs up to this many
# single-precision steps (to a relative residual of WARM_START_TOL; rows stop as they
# converge), then refines in double precision from their Ritz vectors, on the frequencies
# that may hold the extreme (0: no warm start and no pruning: every frequency in double
# precision). 48 lets ResNet-50's layer4 frequencies (25-30 steps) finish in single precision.
WARM_START_STEPS = 48
WARM_START_TOL = 1e-4
# Blocks without Lanczos structure take Lanczos on their formed frequency matrices (dense-lanczos)
# from this side on: ResNet-18's 128-channel basic blocks ran 5-18 % slower on it than on the
# eigen-decompositions, 192-channel and wider blocks 20 % to 3x faster (ConvNeXt-T, RegNet).
DENSE_LANCZOS_MIN_SIDE = 144
# Identity blocks up to this many channels run Lanczos on the reduced operator
# (the SVDs that reduce it cost less than they save: measured 15-20 % faster on
# ResNet-50's layer2 / layer3 blocks, 30 % slower on layer4's 2048 channels).
_REDUCE_MAX_CHANNELS = 1024
# Bytes of frequency data per chunk (estimated as below), per path. Each Lanczos step applies
# every factor to the whole chunk, so a chunk's tap matrices are read once per step for all
# of its frequencies: ResNet-50's layer2-4 blocks took 25-30 % less time with 128 MiB than
# with 64 MiB chunks (blocks 25.4 -> 19.6 s), for about 150 MB more peak memory.
_LANCZOS_CHUNK_BYTES = 1 << 27
_DENSE_CHUNK_BYTES = 1 << 26
# Seed of the Lanczos starting vectors (reproducible reports).
_SEED = 0


@dataclass(frozen=True)
class OperatorExtremes:
    """``sigma_max`` and ``sigma_min`` of one block operator and how they were found.

    Attributes
    ----------
    sigma_max, sigma_min : float
    method : str
        ``dense``, ``dense-lanczos`` (or ``dense-lanczos+dense``, see step 4 of the
        module docstring), or ``max M; min N`` with ``M`` in ``lanczos`` /
        ``lanczos+dense`` and ``N`` in ``structural-zero (rank <= r < n)`` /
        ``woodbury-lanczos`` / ``woodbury-lanczos+dense`` (``+dense``: some
        frequencies computed densely), followed by the Lanczos convergence
        test (``residual <= 1e-06 theta``).
    converged : bool
        Always True today: frequencies where Lanczos does not converge, or
        where ``K(u)`` is singular, are computed densely instead.
    """

    sigma_max: float
    sigma_min: float
    method: str
    converged: bool = True


@dataclass(frozen=True)
class BlockExtremes:
    """Extremes of the plain branch ``W_k ... W_1`` and of the residual block (None without shortcut)."""

    plain: OperatorExtremes
    residual: OperatorExtremes | None
    side: int


def _shortcut_lu(block: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None | bool:
    """LU of a square, well-conditioned, frequency-independent shortcut; None for identity; False if unusable."""
    if block.identity_size:
        return None
    weight = block.short_weight
    if weight is None or weight.shape[2:] != (1, 1) or block.short_padding != (0, 0):
        return False
    s = weight[:, :, 0, 0]
    if s.shape[0] != s.shape[1]:
        return False
    matrix = torch.from_numpy(s)
    values = torch.linalg.svdvals(matrix)
    if values[-1] <= 1e-8 * values[0]:  # Woodbury through S^{-1} would lose the accuracy
        return False
    lu, pivots = torch.linalg.lu_factor(matrix.to(device))
    return lu, pivots


def _woodbury_applies(block: Any, residual: bool) -> bool:
    """``A = S + L M(u) R`` square, with ``L``, ``R`` the same at every frequency and ``S`` identity or constant.

    Only where ``K`` (of the middle width) is narrower than ``A``: an inverted
    bottleneck (MobileNet, EfficientNet: middle 6x wider) takes the dense path.
    """
    weights = block.weights
    return (
        residual
        and len(weights) >= 3
        and weights[-1].shape[0] == weights[0].shape[1]
        and max(w.shape[0] for w in weights[:-1]) < weights[-1].shape[0]
        and constant_tap(weights[0], block.paddings[0], block.grid) is not None
        and constant_tap(weights[-1], block.paddings[-1], block.grid) is not None
        and (block.identity_size > 0 or block.short_weight is not None)
    )


def _support(weight: np.ndarray) -> tuple[int, int]:
    """Numbers of rows and columns of a kernel (rows, cols, kh, kw) that are not zero at every tap."""
    nonzero = weight.any(axis=(2, 3))
    return int(nonzero.any(axis=1).sum()), int(nonzero.any(axis=0).sum())


def _rank_bound(block: Any, residual: bool) -> int:
    """An upper bound of the rank of every frequency matrix, from the factors' supports alone.

    A product has rank at most its narrowest factor (nonzero rows or columns);
    adding a shortcut ``S`` adds at most ``rank S``; the identity makes no bound.
    """
    n = min(block.weights[-1].shape[0], block.weights[0].shape[1])
    chain = min(min(_support(w)) for w in block.weights)
    if not residual:
        return min(n, chain)
    if block.identity_size:
        return n
    return min(n, chain + min(_support(block.short_weight)))


# ---------------------------------------------------------------- per-frequency work


def _start(n_freq: int, n: int, offset: int, device: torch.device, stream: int = 0) -> torch.Tensor:
    """Seeded random complex starting vectors, the same whatever the chunking or device."""
    generator = torch.Generator().manual_seed(_SEED + stream)
    full = torch.randn(offset + n_freq, n, dtype=torch.complex128, generator=generator)
    return full[offset:].to(device)


def _dense(block: Any, residual: bool, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-frequency singular values (F, k) of the block's matrices: the full spectrum's own code.

    The same numpy routine as :func:`auditor.analysis.conditioning.block_singular_values`,
    so where the dense path runs the numbers are those of the full spectrum to
    the last bit (on blocks with kappa 1e10 and more, two LAPACKs differ in the
    leading digits of sigma_min, which is then rounding noise).
    """
    if not len(u):
        return np.zeros((0, 1))
    return sigma_of_matrices(block_matrices(block, residual, u, v))


def _warm_start(apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                restrict: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None,
                ) -> tuple[torch.Tensor, LanczosResult | None]:
    """Starting vectors refined by a single-precision Lanczos run (see :data:`WARM_START_STEPS`).

    Returns the vectors and the single-precision run (None when it did not
    run). Only the double-precision run that follows decides a value (its own
    convergence test). Single precision may overflow where ``K(u)`` is nearly
    singular (kappa 1e8 and more): rows whose warm vector is not finite keep
    their random start, and a run whose small eigenproblem fails on such
    values leaves every row its random start.
    """
    if not WARM_START_STEPS:
        return start, None
    try:
        run = largest_eigenvalues(apply, start.to(torch.complex64), tol=WARM_START_TOL, max_dim=WARM_START_STEPS,
                                  restarts=0, restrict=restrict)
    except torch.linalg.LinAlgError:
        return start, None
    warm = run.vector.to(start.dtype)
    finite = torch.isfinite(torch.view_as_real(warm)).all(dim=-1).all(dim=-1)
    return torch.where(finite[:, None], warm, start), run


def _candidates(apply: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
    """Rows whose top eigenvalue may be the largest of the batch, checked in double precision.

    One product per row, ``z = B y`` for the unit vector ``y`` of the
    single-precision run, gives the Rayleigh quotient ``rho = y^H z`` and the
    residual ``r = ||z - rho y||``. Every ``rho`` is a lower bound of its
    row's top eigenvalue, and the top eigenvalue lies within ``r`` of
    ``rho`` once ``y`` is near the top eigenvector: the same residual bound
    the double-precision run stops on (and that decides which unconverged
    frequencies go dense), here computed in double precision whatever the
    single-precision run's accuracy. A row with ``rho + r < max rho`` cannot
    hold the batch's maximum; the others are returned (sorted indices).
    """
    y = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    z = apply(y)
    rho = (y.conj() * z).sum(dim=1).real
    residual = torch.linalg.vector_norm(z - rho[:, None].to(z.dtype) * y, dim=1)
    finite = torch.isfinite(rho) & torch.isfinite(residual)
    if not bool(finite.any()):
        return torch.arange(len(vectors), device=vectors.device)
    ruled_out = finite & (rho + residual < rho[finite].max())
    return torch.nonzero(~ruled_out).flatten()


def _batch_maximum(apply: Callable[[torch.Tensor], torch.Tensor],
                   restrict: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]],
                   start: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, LanczosResult]:
    """Top eigenvalues of the batch rows that may hold the batch's largest one.

    The report needs the largest over all frequencies only. A
    single-precision run on every row (:func:`_warm_start`), then the rows
    that :func:`_candidates` cannot rule out, those whose single-precision
    run did not converge and those of ``keep`` (a boolean mask) run in double
    precision from their warm vectors: returns those rows' indices and their
    run.
    """
    vectors, warm = _warm_start(apply, start, restrict)
    rows = torch.arange(len(start), device=start.device)
    if warm is not None:
        # only a row whose single-precision run converged may be ruled out (its Ritz pair is
        # then trusted as the top one, as the double-precision run trusts its own)
        mask = ~warm.converged if keep is None else keep | ~warm.converged
        mask[_candidates(apply, vectors)] = True
        rows = torch.nonzero(mask).flatten()
    if len(rows) == len(start):
        return rows, largest_eigenvalues(apply, vectors, restrict=restrict)
    run = largest_eigenvalues(restrict(rows), vectors[rows], restrict=lambda part: restrict(rows[part]))
    return rows, run


class _DenseGram:
    """The per-frequency matrices ``P(u)`` of one chunk, formed, as Lanczos operators (square ``P``).

    ``gram``: ``x -> P^H P x`` by two matrix-vector products (``O(n^2)`` per
    frequency and step); ``inverse_gram``: ``x -> (P^H P)^{-1} x`` by two
    solves with one LU per frequency (:meth:`lu`). The single-precision warm
    start calls both with complex64 vectors: they then use complex64 copies
    of the matrices (and of the LU factors). A :meth:`subset` slices what its
    parent has computed, when it is first needed.
    """

    def __init__(self, matrices: torch.Tensor | None, parent: _DenseGram | None = None,
                 rows: torch.Tensor | None = None) -> None:
        self._parent, self._rows = parent, rows
        if matrices is not None:
            self.__dict__["p"] = matrices

    def subset(self, rows: torch.Tensor) -> _DenseGram:
        """The operator at the frequencies ``rows`` of this batch only."""
        return _DenseGram(None, self, rows)

    def _from_parent(self, name: str) -> Any:
        value = self._parent.__dict__.get(name)
        if value is None:
            return None
        return value[self._rows] if isinstance(value, torch.Tensor) else tuple(t[self._rows] for t in value)

    @cached_property
    def p(self) -> torch.Tensor:
        return self._from_parent("p")

    @cached_property
    def _p_single(self) -> torch.Tensor:
        sliced = None if self._parent is None else self._from_parent("_p_single")
        return self.p.to(torch.complex64) if sliced is None else sliced

    @cached_property
    def _lu(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sliced = None if self._parent is None else self._from_parent("_lu")
        if sliced is not None:
            return sliced
        lu, pivots, info = torch.linalg.lu_factor_ex(self.p)
        bad = (info != 0) | ~torch.isfinite(torch.view_as_real(lu)).flatten(1).all(dim=1)
        return lu, pivots, bad

    def lu(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LU factors, pivots and a (F,) mask of the frequencies whose factorization is unusable."""
        return self._lu

    @cached_property
    def _lu_single(self) -> tuple[torch.Tensor, torch.Tensor]:
        sliced = None if self._parent is None else self._from_parent("_lu_single")
        if sliced is not None:
            return sliced
        lu, pivots, _ = self._lu
        return lu.to(torch.complex64), pivots

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of (F, n) through ``P^H P``."""
        p = self._p_single if x.dtype == torch.complex64 else self.p
        y = torch.bmm(p, x.unsqueeze(-1))
        # P^H y as (y^H P)^H: a product with p.mH would first copy the conjugated matrices
        return torch.bmm(y.mH, p).conj().squeeze(1)

    def inverse_gram(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of (F, n) through ``(P^H P)^{-1} = P^{-1} P^{-H}``: top eigenvalue ``1 / sigma_min(P)^2``."""
        lu, pivots = self._lu_single if x.dtype == torch.complex64 else self.lu()[:2]
        y = torch.linalg.lu_solve(lu, pivots, x.unsqueeze(-1), adjoint=True)
        return torch.linalg.lu_solve(lu, pivots, y).squeeze(-1)


@dataclass
class _ChunkResult:
    top: float
    top_method: str
    bottom: float
    bottom_method: str


def _chunk_dense(block: Any, residual: bool, u: np.ndarray, v: np.ndarray) -> _ChunkResult:
    """Extremes over one chunk of frequencies, each frequency's extremes exactly (step 5)."""
    if not len(u):
        return _ChunkResult(0.0, "dense", math.inf, "dense")
    top, bottom = extremes_of_matrices(block_matrices(block, residual, u, v))
    return _ChunkResult(float(top.max(initial=0.0)), "dense", float(bottom.min(initial=math.inf)), "dense")


def _chunk_largest(op: Any, start: torch.Tensor,
                   exact_largest: Callable[[np.ndarray], float]) -> tuple[float, bool]:
    """sigma_max over one chunk: Lanczos on ``op.gram`` pruned to the frequencies that may hold the maximum.

    Frequencies whose run did not converge where the maximum may be take
    ``exact_largest(rows)`` (the largest singular value over those rows).
    Returns the value and whether any frequency fell back so.
    """
    rows, run = _batch_maximum(op.gram, lambda part: op.subset(part).gram, start)
    rows = rows.cpu().numpy()
    theta = run.value.clamp_min(0).cpu().numpy()
    bound = (run.value + run.residual).cpu().numpy()
    top = float(theta.max())
    unsure = rows[~run.converged.cpu().numpy() & (bound >= top)]
    if unsure.size:
        top = max(top, float(exact_largest(unsure)) ** 2)
    return math.sqrt(top), bool(unsure.size)


def _chunk_extremes(block: Any, kernels: BlockKernels, residual: bool, u: np.ndarray, v: np.ndarray, offset: int,
                    need_min: bool, device: torch.device, s_lu: Any) -> _ChunkResult:
    """Extremes over one chunk of frequencies by Lanczos (see the module docstring, steps 2-3)."""
    op = FrequencyOperator(kernels, u, v)
    # 2. largest: Lanczos on the Gram operator of the smaller side, first in single precision
    #    on every frequency, then in double precision from those Ritz vectors on the
    #    frequencies that may hold the chunk's maximum (its own convergence test decides)
    top, fell_back = _chunk_largest(op, _start(len(u), min(op.rows, op.cols), offset, device),
                                    lambda rows: _dense(block, residual, u[rows], v[rows]).max())
    top_method = "lanczos+dense" if fell_back else "lanczos"
    if not need_min:
        return _ChunkResult(top, top_method, math.inf, "")
    # 3. smallest: Woodbury inverse, Lanczos on A^{-H} A^{-1}, pruned in the same way
    inverse = Woodbury(op, s_lu)
    rows, run = _batch_maximum(inverse.inverse_gram, lambda part: inverse.subset(part).inverse_gram,
                               _start(len(u), op.cols, offset, device, stream=1), keep=inverse.singular)
    rows = rows.cpu().numpy()
    theta = run.value.cpu().numpy()
    ok = run.converged.cpu().numpy() & ~inverse.singular.cpu().numpy()[rows] & (theta > 0)
    safe = np.where(ok, theta, 1.0)
    upper = np.where(ok, 1.0 / np.sqrt(safe), np.inf)  # sigma_min(u) <= upper
    bottom = float(upper.min(initial=math.inf))
    bottom_method = "woodbury-lanczos"
    # 4. where K(u) is singular or Lanczos did not converge: those frequencies densely
    unsure = rows[~ok]
    if unsure.size:
        bottom = min(bottom, float(_dense(block, residual, u[unsure], v[unsure]).min()))
        bottom_method += "+dense"
    return _ChunkResult(top, top_method, bottom, bottom_method)


def _rows_times(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x_f -> M x_f`` for every row of a complex (F, n) batch and a real (m, n) matrix: one real GEMM."""
    f, n = x.shape
    parts = torch.view_as_real(x).transpose(1, 2).reshape(2 * f, n)  # real and imaginary rows
    product = (parts @ matrix.T).reshape(f, 2, -1).transpose(1, 2).contiguous()
    return torch.view_as_complex(product)


def _rows_solve(lu: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x_f -> L^{-1} x_f`` (``L^{-T}`` with ``transpose``) for every row of a complex (F, n) batch, L real."""
    f, n = x.shape
    parts = torch.view_as_real(x).transpose(1, 2).reshape(2 * f, n)
    # rows: X L^{-T} = (L^{-1} X^T)^T, solved from the right
    solved = torch.linalg.lu_solve(*lu, parts, left=False, adjoint=not transpose)
    return torch.view_as_complex(solved.reshape(f, 2, n).transpose(1, 2).contiguous())


class _ScaledGram:
    """``P(u) = L diag(d(u))`` (``first``) or ``diag(d(u)) L`` with one real square ``L``, as Lanczos operators.

    The plain branch of a depthwise chain (ConvNeXt: the 7x7 depthwise kernel, then
    two 1x1 convolutions, ``L = W_3 W_2``): each step is one real GEMM over all the
    chunk's frequencies, and ``P(u)^{-1} = diag(1 / d(u)) L^{-1}`` needs one LU of ``L``
    for the whole operator instead of one per frequency. A frequency where some
    ``d_j(u)`` is zero, or every frequency when ``L``'s LU is singular, is unusable
    (:meth:`lu`) and falls back to its exact extremes.
    """

    def __init__(self, matrix: torch.Tensor, lu: tuple[torch.Tensor, torch.Tensor] | None, first: bool,
                 symbols: Any, d: torch.Tensor) -> None:
        self.matrix, self.l_lu, self.first, self.symbols, self.d = matrix, lu, first, symbols, d

    def subset(self, rows: torch.Tensor) -> _ScaledGram:
        return _ScaledGram(self.matrix, self.l_lu, self.first, self.symbols, self.d[rows])

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        if x.dtype == torch.complex64:
            lu = None if self.l_lu is None else (self.l_lu[0].float(), self.l_lu[1])
            return self.matrix.float(), lu, self.d.to(torch.complex64)
        return self.matrix, self.l_lu, self.d

    def lu(self) -> tuple[None, None, torch.Tensor]:
        """As :meth:`_DenseGram.lu`: only the mask of the unusable frequencies is used."""
        if self.l_lu is None:
            return None, None, torch.ones(len(self.d), dtype=torch.bool, device=self.d.device)
        return None, None, ~((self.d != 0).all(dim=1) & torch.isfinite(torch.view_as_real(self.d)).flatten(1).all(dim=1))

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        matrix, _, d = self._parts(x)
        if self.first:  # diag(conj d) L^T L diag(d)
            return d.conj() * _rows_times(matrix.T, _rows_times(matrix, d * x))
        return _rows_times(matrix.T, (d.conj() * d) * _rows_times(matrix, x))

    def inverse_gram(self, x: torch.Tensor) -> torch.Tensor:
        _, lu, d = self._parts(x)
        if self.first:  # P^{-1} P^{-H} = diag(1/d) L^{-1} L^{-T} diag(1/conj d)
            return _rows_solve(lu, _rows_solve(lu, x / d.conj(), transpose=True), transpose=False) / d
        return _rows_solve(lu, _rows_solve(lu, x, transpose=True) / (d.conj() * d), transpose=False)


def _scaled_factors(block: Any, device: torch.device) -> tuple[Any, ...] | None:
    """``(L, LU of L or None, first, symbols)`` of the plain branch when it is a depthwise chain with square ``L``."""
    chain = depthwise_chain(block.plain_weights, block.paddings, block.grid)
    if chain is None or chain[2].shape[0] != chain[2].shape[1]:
        return None
    diagonal, padding, matrix, first = chain
    lu, pivots, info = torch.linalg.lu_factor_ex(torch.from_numpy(np.ascontiguousarray(matrix)).to(device))
    usable = int(info) == 0 and bool(torch.isfinite(lu).all())
    matrix = torch.from_numpy(np.ascontiguousarray(matrix)).to(device)

    def symbols(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return kernel_symbols(diagonal, padding, block.grid, u, v)

    return matrix, (lu, pivots) if usable else None, first, symbols


def _chunk_dense_lanczos(block: Any, residual: bool, u: np.ndarray, v: np.ndarray, offset: int,
                         device: torch.device, scaled: tuple[Any, ...] | None = None) -> _ChunkResult:
    """Extremes over one chunk of square frequency matrices, formed once, by Lanczos (see :func:`_dense_lanczos`).

    ``scaled``: the factors of :func:`_scaled_factors` (then no matrix is formed but where a frequency falls back).
    """
    if scaled is None:
        formed = block_matrices(block, residual, u, v, depthwise=True)
        op = _DenseGram(torch.from_numpy(formed).to(device))
        n = formed.shape[1]

        def matrices(index: np.ndarray) -> np.ndarray:
            return formed[index]
    else:  # P(u) = L diag(d(u)) or diag(d(u)) L: nothing formed but for the frequencies that fall back
        op = _ScaledGram(*scaled, torch.from_numpy(scaled[3](u, v)).to(device))
        n = scaled[0].shape[0]

        def matrices(index: np.ndarray) -> np.ndarray:
            return block_matrices(block, residual, u[index], v[index], depthwise=True)
    # largest: Lanczos on P^H P, pruned to the frequencies that may hold the chunk's maximum
    top, fell_back = _chunk_largest(op, _start(len(u), n, offset, device),
                                    lambda rows: extremes_of_matrices(matrices(rows))[0].max())
    top_method = "dense-lanczos+dense" if fell_back else "dense-lanczos"
    # smallest: one LU per frequency, Lanczos on (P^H P)^{-1} = P^{-1} P^{-H}, pruned likewise;
    # frequencies whose LU is unusable never enter it
    bad = op.lu()[2].cpu().numpy()
    good = np.flatnonzero(~bad)
    bottom, bottom_method = math.inf, "dense-lanczos"
    unsure = np.flatnonzero(bad)
    if good.size:
        inverse = op if not bad.any() else op.subset(torch.from_numpy(good).to(device))
        start = _start(len(u), n, offset, device, stream=1)[torch.from_numpy(good).to(device)]
        rows, run = _batch_maximum(inverse.inverse_gram, lambda part: inverse.subset(part).inverse_gram, start)
        rows = rows.cpu().numpy()
        theta = run.value.cpu().numpy()
        ok = run.converged.cpu().numpy() & np.isfinite(theta) & (theta > 0)
        upper = 1.0 / np.sqrt(np.where(ok, theta, 1.0))
        bottom = float(upper[ok].min(initial=math.inf))
        unsure = np.concatenate([unsure, good[rows[~ok]]])
    if unsure.size:  # singular LU or no convergence: those frequencies exactly
        bottom = min(bottom, float(extremes_of_matrices(matrices(np.sort(unsure)))[1].min()))
        bottom_method += "+dense"
    return _ChunkResult(top, top_method, bottom, bottom_method)


def _dense_lanczos_applies(block: Any, residual: bool) -> bool:
    """Square reduced per-frequency matrices of side at least :data:`DENSE_LANCZOS_MIN_SIDE`."""
    factors = block.weights if residual else block.plain_weights
    n = factors[-1].shape[0]
    if residual and block.short_weight is not None and block.short_weight.shape[:2] != (n, factors[0].shape[1]):
        return False
    return n == factors[0].shape[1] and n >= DENSE_LANCZOS_MIN_SIDE


def _dense_lanczos(block: Any, residual: bool, device: torch.device) -> OperatorExtremes:
    """Extremes of an operator without Lanczos structure whose frequency matrices are square and wide.

    Each chunk's matrices are formed once (:func:`.block_algebra.block_matrices`,
    a depthwise chain as one column scaling); then ``sigma_max`` by Lanczos on
    ``P^H P`` with matrix-vector products and ``sigma_min`` by Lanczos on
    ``(P^H P)^{-1}`` with one LU per frequency and two solves per step, both
    pruned to the frequencies that may hold the extreme (:func:`_batch_maximum`)
    and with the Lanczos convergence test; a frequency whose LU is singular, or
    whose run did not converge where the extreme may be, gets its exact
    extremes (:func:`.batched.extremes_of_matrices`). Replaces an
    eigen-decomposition of the Gram matrix per frequency (ConvNeXt-T's last
    stage: 1-2.5 s for each 768 x 768 frequency).
    """
    n = block.weights[-1].shape[0] if residual else block.plain_weights[-1].shape[0]
    workers = 1 if device.type != "cpu" else worker_count()
    u, v, _ = half_plane(*block.grid)
    # per frequency: the matrix, its LU, a single-precision copy of each, the Lanczos basis
    item = 16 * (3 * n * n + 64 * n)
    parts = chunk_slices(len(u), item, workers, budget=_LANCZOS_CHUNK_BYTES)

    scaled = None if residual else _scaled_factors(block, device)

    def one(part: slice) -> _ChunkResult:
        return _chunk_dense_lanczos(block, residual, u[part], v[part], part.start, device, scaled)

    with blas_single_thread(), torch_single_thread() if device.type == "cpu" else nullcontext():
        results = parallel_map(one, parts, workers)
    top, bottom = max(r.top for r in results), min(r.bottom for r in results)
    extra = block.extra_residual if residual else block.extra_plain
    if extra.size:
        top, bottom = max(top, float(extra.max())), min(bottom, float(extra.min()))
    top_method = "/".join(sorted({r.top_method for r in results}))
    bottom_method = "/".join(sorted({r.bottom_method for r in results}))
    method = top_method if top_method == bottom_method else f"max {top_method}; min {bottom_method}"
    return OperatorExtremes(top, bottom, f"{method}; Lanczos stops at residual <= {DEFAULT_TOL:g} theta")


def _reduced_side(block: Any, residual: bool, rank: int) -> int:
    """A bound of the smaller side of the reduced per-frequency matrices (see :func:`.block_algebra.reduce_block`)."""
    n = min(block.weights[-1].shape[0], block.weights[0].shape[1])
    single_tap = len(block.weights) > 1 and all(block.weights[i].shape[2:] == (1, 1) for i in (0, -1))
    if residual and block.identity_size:
        # identity: Q spans range(W_1^T) + range(W_k)
        return min(n, block.weights[0].shape[0] + block.weights[-1].shape[1]) if single_tap else n
    return rank


def _with_compressed_ends(block: Any, *, triangular: bool = False) -> Any:
    """The block with the plain branch's single-tap end factors replaced by their SVD (or QR) cores.

    See :func:`auditor.analysis.block_algebra.compress_ends`: the dense path keeps
    the full spectrum's SVD cores, the Lanczos path takes the cheaper QR cores.
    """
    plain_weights, extra_plain = compress_ends(block.weights, triangular=triangular)
    return dataclasses.replace(block, plain_weights=plain_weights, extra_plain=extra_plain)


@dataclass(frozen=True)
class _Plan:
    """What one operator's factors say before any factorization.

    ``n`` singular values per frequency, ``rank`` the bound of
    :func:`_rank_bound`, and whether the Lanczos path is worth it (the
    shortcut's LU may still rule out Woodbury).
    """

    n: int
    rank: int
    lanczos: bool

    @property
    def structural_zero(self) -> bool:
        return self.rank < self.n


def _plan(block: Any, residual: bool) -> _Plan:
    n = min(block.weights[-1].shape[0], block.weights[0].shape[1])
    rank = _rank_bound(block, residual)
    if rank < n:  # structurally singular: only the largest, Lanczos unless the reduced matrices are small
        return _Plan(n, rank, rank >= LANCZOS_MIN_SIDE)
    wide = _reduced_side(block, residual, rank) >= LANCZOS_MIN_SIDE
    return _Plan(n, rank, wide and _woodbury_applies(block, residual))


def _operator_extremes(block: Any, residual: bool, plan: _Plan, device: torch.device,
                       reduced: Callable[[], Any]) -> OperatorExtremes:
    # 1. structure: fewer dimensions than singular values at every frequency
    n, rank, structural_zero = plan.n, plan.rank, plan.structural_zero
    s_lu = _shortcut_lu(block, device) if residual and not structural_zero else False
    lanczos = plan.lanczos and (structural_zero or s_lu is not False)
    workers = 1 if device.type != "cpu" else worker_count()
    if lanczos:
        if 0 < block.identity_size <= _REDUCE_MAX_CHANNELS:
            # identity blocks: Lanczos in the reduced space (Q^T A Q of width <= 2w,
            # the plain branch compressed to w x w): a quarter to a third fewer flops
            block = reduced()
        elif block.identity_size and not residual:
            # wider identity blocks: the plain branch alone compressed to w x w (its
            # end factors' QR cores; a stride-1 bottleneck has no polyphase structure to lose)
            block = _with_compressed_ends(block, triangular=True)
        kernels = BlockKernels(block, residual, device)
        # memory per frequency: the Lanczos basis (48 vectors) and K(u) (width^2), complex128
        vector = max(max(w.shape[:2]) for w in block.weights)
        width = max(w.shape[0] for w in block.weights[1:-1]) if len(block.weights) > 2 else 0
        item = 16 * (48 * vector + width * width)
        budget = _LANCZOS_CHUNK_BYTES
        u, v, _ = half_plane(*block.grid)

        def one(part: slice) -> _ChunkResult:
            return _chunk_extremes(block, kernels, residual, u[part], v[part], part.start, not structural_zero,
                                   device, s_lu)
    else:
        # 4. dense, on the reduced matrices, exactly as the full spectrum (the
        #    plain branch needs only its end factors compressed)
        block = reduced() if residual else _with_compressed_ends(block)
        weights = block.weights if residual else block.plain_weights  # the factors the chunks multiply
        item = 16 * 4 * (max(w.shape[0] * w.shape[1] for w in weights) + weights[-1].shape[0] * weights[0].shape[1])
        budget = _DENSE_CHUNK_BYTES
        u, v, _ = half_plane(*block.grid)

        def one(part: slice) -> _ChunkResult:
            return _chunk_dense(block, residual, u[part], v[part])

    parts = chunk_slices(len(u), item, workers, budget=budget)
    # numpy's BLAS (symbols of the dense path) and torch on one thread each:
    # the parallelism is over frequency chunks
    with blas_single_thread(), torch_single_thread() if device.type == "cpu" else nullcontext():
        results = parallel_map(one, parts, workers)
    top = max(r.top for r in results)
    bottom = 0.0 if structural_zero else min(r.bottom for r in results)
    extra = block.extra_residual if residual else block.extra_plain
    if extra.size:
        top, bottom = max(top, float(extra.max())), min(bottom, float(extra.min()))
    top_method = "/".join(sorted({r.top_method for r in results}))
    if structural_zero:
        bottom_method = f"structural-zero (rank <= {rank} < {n})"
    else:
        bottom_method = "/".join(sorted({r.bottom_method for r in results}))
    method = top_method if top_method == bottom_method else f"max {top_method}; min {bottom_method}"
    if "lanczos" in method:
        method += f"; Lanczos stops at residual <= {DEFAULT_TOL:g} theta"
    return OperatorExtremes(top, bottom, method)


def block_extremes(convs: Any, shortcut: Any, *, device: torch.device | str = "cpu") -> BlockExtremes:
    """Extreme singular values of a linearized block, plain and residual.

    Parameters
    ----------
    convs : sequence of ConvOperator
        ``W_1 .. W_k``, as for :func:`auditor.analysis.conditioning.block_singular_values`.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
    device : torch.device or str
        Where the batched linear algebra runs.

    Returns
    -------
    BlockExtremes
        The extremes of the full per-frequency spectra: ``sigma_max`` a Lanczos
        Ritz value with relative residual at most 1e-6 (or dense), ``sigma_min``
        zero by structure, from Woodbury and Lanczos, or dense.
    """
    device = torch.device(device)
    block = reduce_block(convs, shortcut, reduce=False)
    cache: list[Any] = []

    def reduced() -> Any:  # the exact reductions (SVDs) only where the dense path needs them
        if not cache:
            cache.append(reduce_block(convs, shortcut, unreduced=block))
        return cache[0]

    plans = {residual: _plan(block, residual) for residual in (False, True)[: 1 + block.has_shortcut]}
    if not any(plan.lanczos for plan in plans.values()) and min(block.weights[-1].shape[0],
                                                                block.weights[0].shape[1]) >= DENSE_LANCZOS_MIN_SIDE:
        # wide blocks without Lanczos structure (ConvNeXt, RegNet, inverted bottlenecks): the operators
        # whose reduced frequency matrices are square and wide by Lanczos on the formed matrices
        wide = {residual: not plan.structural_zero and _dense_lanczos_applies(reduced(), residual)
                for residual, plan in plans.items()}
        if any(wide.values()):
            found = [_dense_lanczos(reduced(), residual, device) if wide[residual]
                     else _operator_extremes(block, residual, plans[residual], device, reduced)
                     for residual in plans]
            return BlockExtremes(found[0], found[1] if block.has_shortcut else None, block.side)
    if not any(plan.lanczos for plan in plans.values()):
        # small blocks (CIFAR networks) and blocks with no Lanczos structure (basic blocks, inverted
        # bottlenecks, ConvNeXt): one pass over the frequencies for both operators, extremes only
        spectra = block_spectra(convs, shortcut, extremes_only=True)
        extremes = [spectra.extremes(residual=False), spectra.extremes(residual=True) if shortcut else None]
        found = [None if e is None else OperatorExtremes(e[0], e[1], "dense") for e in extremes]
        return BlockExtremes(found[0], found[1], spectra.side)
    plain = _operator_extremes(block, False, plans[False], device, reduced)
    residual = _operator_extremes(block, True, plans[True], device, reduced) if block.has_shortcut else None
    return BlockExtremes(plain, residual, block.side)
