"""Condition numbers of residual blocks, from the exact circular operators.

A block with convolutions ``W_1 .. W_k`` (eval BatchNorm folded in as
``out_scale``) and shortcut ``S`` is linearized with ReLU taken as the identity:
``A = W_k ... W_1 + S``. Under circular boundary conditions every factor is
block-diagonal in the same Fourier basis once all of them are expressed on the
block's coarsest grid (:func:`auditor.analysis.spectra.to_polyphase`, whose
channel ordering chains from one layer to the next), so ``A`` is exactly the
direct sum over frequencies of small matrix products ``P_k(u) ... P_1(u) + S(u)``.

References
----------
.. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional
   Layers", ICLR 2019.
.. [2] "Understanding ResNet from a Discrete Dynamical System Perspective",
   ICLR 2022 submission (Eq. 2 and Lemma 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from ..errors import InputError, UsageError
from .batched import (
    blas_single_thread,
    chunk_slices,
    parallel_map,
    sigma_of_matrices,
    torch_single_thread,
    worker_count,
)
from .block_extremes import block_extremes
from .frequencies import constant_tap, half_plane, kernel_symbols
from .spectra import (
    ConvOperator,
    IdentityShortcut,
    OptionAShortcut,
    conv_singular_values,
    to_polyphase,
)

__all__ = [
    "LEMMA_RTOL",
    "Shortcut",
    "LayerSigma",
    "BlockConditioning",
    "block_singular_values",
    "condition_block",
]

Shortcut = Union[IdentityShortcut, OptionAShortcut, ConvOperator, None]

# Relative slack of the Lemma 1 checks: both sides are computed in float64 to
# ~1e-12, so a violation smaller than 1e-9 of the bound is rounding, not a finding.
LEMMA_RTOL = 1e-9

_KAPPAS = ("kappa_paper_residual", "kappa_paper_plain", "kappa_linear_residual", "kappa_linear_plain")


class LayerSigma(NamedTuple):
    """Largest and smallest singular value of one convolution of a block."""

    layer: str
    max: float
    min: float


@dataclass(frozen=True)
class BlockConditioning:
    """Condition numbers of one block (DESIGN.md field names).

    Attributes
    ----------
    name, stage : str
    shortcut : str
        ``identity``, ``option_a``, ``projection``, ``none`` or the caller's
        ``shortcut_kind`` (e.g. ``other``).
    sigma : tuple of LayerSigma
        ``(layer, M_i, m_i)`` per convolution, BN folded in when given as ``out_scale``.
    kappa_paper_residual : float or None
        ``(prod M_i + s_max) / (prod m_i + s_min)``: the paper's Eq. 2 with
        ``s = 1`` for identity and option A, the projection's extreme singular
        values otherwise.
    kappa_paper_plain : float or None
        ``prod M_i / prod m_i``.
    kappa_linear_residual, kappa_linear_plain : float or None
        Exact condition numbers of ``A = W_k ... W_1 + S`` and ``W_k ... W_1``.
    sigma_linear_residual, sigma_linear_plain : (max, min) or None
        Their extreme singular values.
    lemma1_upper_holds, lemma1_lower_holds : bool or None
        ``sigma_max(A) <= prod M_i + s_max`` and ``sigma_min(A) >= prod m_i + s_min``
        up to :data:`LEMMA_RTOL`; None without a shortcut operator.
    lemma1_bounds : (lower, upper) or None
        ``(prod m_i + s_min, prod M_i + s_max)``.
    shortcut_norms : (s_max, s_min) or None
    reasons : dict of str to str
        Why a field is None; also as ``kappa_*_reason`` properties.
    methods : dict of str to str
        How ``sigma_linear_plain`` / ``sigma_linear_residual`` were found
        (keys ``plain``, ``residual``; see :mod:`auditor.analysis.block_extremes`).
    """

    name: str
    stage: str
    shortcut: str
    sigma: tuple[LayerSigma, ...]
    kappa_paper_residual: float | None
    kappa_paper_plain: float | None
    kappa_linear_residual: float | None
    kappa_linear_plain: float | None
    sigma_linear_residual: tuple[float, float] | None
    sigma_linear_plain: tuple[float, float]
    lemma1_upper_holds: bool | None
    lemma1_lower_holds: bool | None
    lemma1_bounds: tuple[float, float] | None
    shortcut_norms: tuple[float, float] | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)

    @property
    def kappa_paper_residual_reason(self) -> str | None:
        """Why ``kappa_paper_residual`` is None."""
        return self.reasons.get("kappa_paper_residual")

    @property
    def kappa_paper_plain_reason(self) -> str | None:
        """Why ``kappa_paper_plain`` is None."""
        return self.reasons.get("kappa_paper_plain")

    @property
    def kappa_linear_residual_reason(self) -> str | None:
        """Why ``kappa_linear_residual`` is None."""
        return self.reasons.get("kappa_linear_residual")

    @property
    def kappa_linear_plain_reason(self) -> str | None:
        """Why ``kappa_linear_plain`` is None."""
        return self.reasons.get("kappa_linear_plain")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the contract's field names (non-finite numbers as None)."""
        pair = lambda p: None if p is None else [_finite(p[0]), _finite(p[1])]  # noqa: E731
        out: dict[str, Any] = {
            "name": self.name,
            "stage": self.stage,
            "shortcut": self.shortcut,
            "sigma": [{"layer": s.layer, "max": _finite(s.max), "min": _finite(s.min)} for s in self.sigma],
        }
        out.update({key: _finite(getattr(self, key)) for key in _KAPPAS})
        out.update({
            "sigma_linear_residual": pair(self.sigma_linear_residual),
            "sigma_linear_plain": pair(self.sigma_linear_plain),
            "lemma1_upper_holds": self.lemma1_upper_holds,
            "lemma1_lower_holds": self.lemma1_lower_holds,
            "lemma1_bounds": pair(self.lemma1_bounds),
            "shortcut_norms": pair(self.shortcut_norms),
        })
        for key, reason in self.reasons.items():
            out[f"{key}_reason"] = reason
        if self.methods:
            out["linear_method"] = dict(self.methods)
        return out


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------- block operator


@dataclass(frozen=True)
class _Spectra:
    """Per-frequency singular values of the plain and residual block operators.

    ``plain`` / ``residual``: arrays (n_freq, k) for the half-plane frequencies
    with multiplicities ``mult``; ``extra_*``: values every frequency also has
    (from an exact reduction); ``side``: max(rows, cols) of one frequency matrix.
    """

    plain: np.ndarray
    residual: np.ndarray | None
    mult: np.ndarray
    extra_plain: np.ndarray
    extra_residual: np.ndarray
    side: int

    def values(self, residual: bool) -> np.ndarray:
        per_freq = self.residual if residual else self.plain
        extra = self.extra_residual if residual else self.extra_plain
        rows = np.concatenate([per_freq, np.broadcast_to(extra, (len(per_freq), extra.size))], axis=1)
        return np.sort(np.repeat(rows, self.mult, axis=0).ravel())[::-1]

    def extremes(self, residual: bool) -> tuple[float, float]:
        per_freq = self.residual if residual else self.plain
        extra = self.extra_residual if residual else self.extra_plain
        top = max(per_freq.max(initial=0.0), extra.max(initial=0.0))
        bottom = min(per_freq.min(initial=math.inf), extra.min(initial=math.inf))
        return float(top), float(bottom)


def _circular_output(op: ConvOperator) -> tuple[int, int, int]:
    c, h, w = op.input_shape
    (sh, sw) = op.stride
    if h % sh or w % sw:
        raise InputError(
            f"layer {op.name!r}: input {op.input_shape} is not divisible by the stride {op.stride}, "
            "so the block's circular model does not apply"
        )
    return op.out_channels, h // sh, w // sw


def _check_chain(convs: Sequence[ConvOperator], shortcut: Shortcut) -> tuple[int, int]:
    """Validate shapes; return the block's total stride per axis."""
    if not convs or not all(isinstance(c, ConvOperator) for c in convs):
        raise UsageError("a block needs at least one ConvOperator")
    total = [1, 1]
    shape = convs[0].input_shape
    for op in convs:
        if op.input_shape != shape:
            raise InputError(
                f"block: layer {op.name!r} expects input {op.input_shape} but the previous layer gives "
                f"{shape} under the circular model (it keeps H / stride positions)",
                hint="the circular model needs 'same' padding (2 p = k - s)",
            )
        shape = _circular_output(op)
        total = [total[0] * op.stride[0], total[1] * op.stride[1]]
    if shortcut is not None:
        if not isinstance(shortcut, (IdentityShortcut, OptionAShortcut, ConvOperator)):
            raise UsageError(f"unsupported shortcut {type(shortcut).__name__}")
        out = _circular_output(shortcut) if isinstance(shortcut, ConvOperator) else shortcut.output_shape
        if shortcut.input_shape != convs[0].input_shape or out != shape:
            raise InputError(
                f"block: shortcut maps {shortcut.input_shape} -> {out} but the residual branch maps "
                f"{convs[0].input_shape} -> {shape}"
            )
        if isinstance(shortcut, OptionAShortcut) and (shortcut.stride, shortcut.stride) != tuple(total):
            raise InputError(f"block: option A stride {shortcut.stride} differs from the branch's {tuple(total)}")
    c, h, w = convs[0].input_shape
    if h % total[0] or w % total[1]:
        raise InputError(f"block: input {convs[0].input_shape} is not divisible by the total stride {tuple(total)}")
    return total[0], total[1]


def _dense_weight(op: ConvOperator) -> np.ndarray:
    """The (C_out, C_in, kh, kw) kernel with out_scale folded and groups as diagonal blocks."""
    weight = op.scaled_weight().detach().to("cpu", torch.float64).numpy()
    if op.groups == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    full = np.zeros((c_out, c_in_g * op.groups, *weight.shape[2:]))
    step = c_out // op.groups
    for g in range(op.groups):
        full[g * step:(g + 1) * step, g * c_in_g:(g + 1) * c_in_g] = weight[g * step:(g + 1) * step]
    return full


def _option_a_matrix(shortcut: OptionAShortcut) -> np.ndarray:
    """Option A on the coarse grid: channel ``c s^2`` (phase (0, 0)) to ``pad_before + c``."""
    c_in = shortcut.input_shape[0]
    s2 = shortcut.stride**2
    matrix = np.zeros((shortcut.out_channels, c_in * s2))
    matrix[shortcut.pad_before + np.arange(c_in), np.arange(c_in) * s2] = 1.0
    return matrix


@dataclass(frozen=True)
class _ReducedBlock:
    """A block's per-frequency factors after the exact reductions of :func:`_reduce_block`.

    ``A(u) = P_k(u) ... P_1(u) + S(u)`` on the coarse ``grid``, with ``P_i`` the
    symbols of ``weights[i]`` (kernels (rows, cols, kh, kw) at ``paddings[i]``)
    and ``S`` the identity of size ``identity_size`` or the symbol of
    ``short_weight``; ``plain_weights`` give ``W_k ... W_1`` (same paddings).
    ``extra_plain`` / ``extra_residual`` are singular values every frequency
    also has; ``side`` is max(rows, cols) of one unreduced frequency matrix.
    """

    weights: list[np.ndarray]
    paddings: list[tuple[int, int]]
    plain_weights: list[np.ndarray]
    extra_plain: np.ndarray
    short_weight: np.ndarray | None
    short_padding: tuple[int, int]
    identity_size: int
    extra_residual: np.ndarray
    grid: tuple[int, int]
    side: int
    has_shortcut: bool
    # the folded chain of each factor list, keyed by the list's id and kept with it (a list
    # that replaces another, as dataclasses.replace does, never hits a stale entry)
    folded: dict = field(default_factory=dict, repr=False, compare=False)


def _channel_diagonal(weight: np.ndarray) -> np.ndarray | None:
    """The (channels, taps) diagonals of a kernel that is diagonal in channels at every tap (depthwise), else None."""
    rows, cols = weight.shape[:2]
    if rows != cols or rows < 2:
        return None
    taps = weight.reshape(rows, cols, -1)
    diagonal = taps[np.arange(rows), np.arange(rows)]
    return diagonal if np.count_nonzero(taps) == np.count_nonzero(diagonal) else None


def _left(matrix: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``matrix`` times every tap of ``weight`` (rows, cols, kh, kw): one BLAS product (einsum would not use BLAS).

    A depthwise kernel scales the matrix's columns instead (no product).
    """
    diagonal = _channel_diagonal(weight)
    if diagonal is not None:
        return (matrix[:, :, None] * diagonal[None]).reshape(matrix.shape[0], *weight.shape[1:])
    return (matrix @ weight.reshape(weight.shape[0], -1)).reshape(matrix.shape[0], *weight.shape[1:])


def _right(weight: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Every tap of ``weight`` (rows, cols, kh, kw) times ``matrix``: one BLAS product (depthwise: a row scaling)."""
    diagonal = _channel_diagonal(weight)
    if diagonal is not None:
        return (diagonal[:, None, :] * matrix[:, :, None]).reshape(weight.shape[0], matrix.shape[1], *weight.shape[2:])
    return np.ascontiguousarray((weight.transpose(0, 2, 3, 1) @ matrix).transpose(0, 3, 1, 2))


def _reduce_block(convs: Sequence[ConvOperator], shortcut: Shortcut, *, reduce: bool = True) -> _ReducedBlock:
    """Steps 1 and 3-4 of :func:`block_singular_values`: coarse-grid factors, exact reductions.

    ``reduce=False`` stops after step 1 (no SVDs): the factors as they are,
    for methods that only apply them.
    """
    total = _check_chain(convs, shortcut)
    # 1. every factor as a stride-1 operator on the coarsest grid
    coarse, before = [], (1, 1)
    for op in convs:
        coarse.append(to_polyphase(op, (total[0] // before[0], total[1] // before[1])))
        before = (before[0] * op.stride[0], before[1] * op.stride[1])
    _, h, w = coarse[0].input_shape
    weights = [_dense_weight(op) for op in coarse]
    paddings = [op.padding for op in coarse]
    n_out, n_in = weights[-1].shape[0], weights[0].shape[1]
    plain_weights, extra_plain = _compress_ends(weights) if reduce else (weights, np.zeros(0))
    # the shortcut as one more kernel on the coarse grid (identity handled apart)
    short_weight, short_padding = None, (0, 0)
    if isinstance(shortcut, OptionAShortcut):
        short_weight = _option_a_matrix(shortcut)[:, :, None, None]
    elif isinstance(shortcut, ConvOperator):
        projection = to_polyphase(shortcut, total)
        short_weight, short_padding = _dense_weight(projection), projection.padding
    # 2. exact reductions when the first and last layers are 1x1 (single tap):
    extra_residual = np.zeros(0)
    identity_size = n_in if isinstance(shortcut, IdentityShortcut) else 0
    single_tap = reduce and len(weights) > 1 and all(weights[i].shape[2:] == (1, 1) for i in (0, -1))
    first, last = weights[0][:, :, 0, 0], weights[-1][:, :, 0, 0]
    if single_tap and identity_size:
        # 2a. identity: A is the identity on the complement of
        #     V = range(W_1^T) + range(W_k) and maps V to itself: keep Q^T A Q
        q = _basis(np.concatenate([first.T, last], axis=1))
        if q.shape[1] < identity_size:
            weights = [_right(weights[0], q), *weights[1:-1], _left(q.T, weights[-1])]
            extra_residual = np.ones(identity_size - q.shape[1])
            identity_size = q.shape[1]
    elif single_tap and short_weight is not None and short_weight.shape[2:] == (1, 1):
        # 2b. constant shortcut S: range(A) lies in range([W_k, S]) and its row
        #     space in range([W_1^T, S^T]); the rest are structural zeros
        short = short_weight[:, :, 0, 0]
        q_out = _basis(np.concatenate([last, short], axis=1))
        q_in = _basis(np.concatenate([first.T, short.T], axis=1))
        if q_out.shape[1] < n_out or q_in.shape[1] < n_in:
            weights = [_right(weights[0], q_in), *weights[1:-1], _left(q_out.T, weights[-1])]
            short_weight = (q_out.T @ short @ q_in)[:, :, None, None]
            extra_residual = np.zeros(min(n_out, n_in) - min(q_out.shape[1], q_in.shape[1]))
    return _ReducedBlock(weights, paddings, plain_weights, extra_plain, short_weight, short_padding,
                         identity_size, extra_residual, (h, w), max(n_out, n_in), shortcut is not None)


def _fold_chain(factors: Sequence[np.ndarray], paddings: Sequence[tuple[int, int]],
                grid: tuple[int, int]) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """The chain ``W_k ... W_1`` with its factors multiplied together once, as kernels, where that is cheaper.

    With one multi-tap kernel ``K`` between constant matrices ``L`` and ``R``
    (a bottleneck's 1x1 convolutions), ``L K(u) R`` is the symbol of the kernel
    with taps ``L K_t R``: one (rows x cols) matrix per frequency instead of a
    product of three. Chains with several multi-tap kernels keep them apart
    (composing a basic block's two 3x3 kernels into one 5x5 kernel measured
    10 % faster on ResNet-18's 56 x 56 blocks and up to 70 % slower on its
    7 x 7 ones, where 81 tap products cost more than 25 frequencies).
    """
    chain: list[tuple[np.ndarray, tuple[int, int]]] = []
    pending: np.ndarray | None = None  # constant factors not yet folded, multiplied together first

    def flush() -> None:  # fold the pending constants into the kernel before them
        last, last_padding = chain[-1]
        chain[-1] = (_left(pending, last), last_padding)

    for weight, padding in zip(factors, paddings):
        tap = constant_tap(weight, padding, grid)
        if tap is not None:
            matrix = weight.reshape(*weight.shape[:2], -1)[:, :, tap]
            pending = matrix if pending is None else matrix @ pending
            continue
        if pending is not None:
            if chain:
                flush()
            else:
                weight = _right(weight, pending)
            pending = None
        chain.append((weight, padding))
    if pending is not None:
        if chain:
            flush()
        else:
            chain.append((pending[:, :, None, None], (0, 0)))
    return chain


def _block_matrices(block: _ReducedBlock, residual: bool, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The per-frequency matrices (n_freq, rows, cols) of the plain or the residual operator."""
    factors = block.weights if residual else block.plain_weights
    cached = block.folded.get(id(factors))
    if cached is None or cached[0] is not factors:
        cached = block.folded[id(factors)] = (factors, _fold_chain(factors, block.paddings, block.grid))
    chain = cached[1]
    product = kernel_symbols(chain[0][0], chain[0][1], block.grid, u, v)
    for weight, padding in chain[1:]:
        product = kernel_symbols(weight, padding, block.grid, u, v) @ product
    if residual:
        if block.identity_size:
            product[:, np.arange(block.identity_size), np.arange(block.identity_size)] += 1.0
        else:
            product += kernel_symbols(block.short_weight, block.short_padding, block.grid, u, v)
    return product


def _block_spectra(convs: Sequence[ConvOperator], shortcut: Shortcut) -> _Spectra:
    """Per-frequency singular values of ``W_k .. W_1`` and of ``W_k .. W_1 + S``.

    See :func:`block_singular_values` for the steps; both operators come from
    the same per-frequency factors.
    """
    block = _reduce_block(convs, shortcut)
    u, v, mult = half_plane(*block.grid)

    # 3. per frequency chunk: chain products, shortcut, singular values
    def chunk(part: slice) -> tuple[np.ndarray, np.ndarray | None]:
        plain = sigma_of_matrices(_block_matrices(block, False, u[part], v[part]))
        if shortcut is None:
            return plain, None
        return plain, sigma_of_matrices(_block_matrices(block, True, u[part], v[part]))

    workers = worker_count()
    weights = block.weights
    largest = max(wt.shape[0] * wt.shape[1] for wt in weights) + weights[-1].shape[0] * weights[0].shape[1]
    with blas_single_thread(), torch_single_thread():
        results = parallel_map(chunk, chunk_slices(len(u), 16 * 4 * largest, workers), workers)
    residual = None if shortcut is None else np.concatenate([r[1] for r in results])
    return _Spectra(np.concatenate([r[0] for r in results]), residual, mult, block.extra_plain,
                    block.extra_residual, block.side)


def _basis(matrix: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column space (rank tolerance of ``matrix_rank``).

    A Householder QR gives it when no ``|R_ii|`` is small against the
    largest column norm, at a third of the cost of an SVD on these
    2048 x 1024 matrices; otherwise the SVD decides the rank. The reductions
    that use the basis stay exact with any orthonormal ``Q`` whose span
    contains the column space (a direction too many only moves a singular
    value 1, or 0, from the extra values into the reduced matrix), so the QR
    needs no rank guarantee. Both run in torch (MKL on CPU, several times
    faster than numpy's LAPACK here).
    """
    tensor = torch.from_numpy(matrix)
    tolerance = max(matrix.shape) * np.finfo(float).eps
    if matrix.shape[1] <= matrix.shape[0] and matrix.size:
        q, r = torch.linalg.qr(tensor)
        diagonal = r.diagonal().abs()
        # min |R_ii| bounds sigma_min from above only, so Q may keep a nearly dependent
        # direction (harmless, see above); a small R_ii sends the decision to the SVD
        if float(diagonal.min()) > 1e4 * tolerance * float(torch.linalg.vector_norm(tensor, dim=0).max()):
            return q.numpy()
    u_, s_, _ = (t.numpy() for t in torch.linalg.svd(tensor, full_matrices=False))
    if not s_.size or s_[0] == 0:
        return u_[:, :0]
    return u_[:, : int(np.sum(s_ > tolerance * s_[0]))]


def _compress_ends(weights: list[np.ndarray], *, triangular: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """The plain chain with single-tap end factors replaced by their SVD cores.

    A frequency-independent first factor ``W_1 = U S V^T`` (up to a unit
    phase) gives ``sigma(X W_1) = sigma(X U S)``, and a last one
    ``W_k = U S V^T`` gives ``sigma(W_k Y) = sigma(S V^T Y)``: the same
    nonzero singular values from matrices no larger than the bottleneck. The
    zeros this drops (``min(rows, cols)`` minus the compressed count) are
    returned to be added back at every frequency.

    ``triangular=True`` takes QR cores instead: ``W_1 = R^T Q^T`` (QR of
    ``W_1^T``, ``Q`` with orthonormal columns) gives ``sigma(X W_1) =
    sigma(X R^T)`` and ``W_k = Q R`` gives ``sigma(W_k Y) = sigma(R Y)``. The
    same singular values from a Householder QR without vectors (backward
    stable): on ResNet-50's layer4 plain branch (2048 x 512 factors) 0.04 s
    instead of 0.38 s. The full spectrum keeps the SVD cores (its numbers to
    the bit); the Lanczos extremes take these.
    """
    rows, cols = weights[-1].shape[0], weights[0].shape[1]
    factors = list(weights)
    first = factors[0]
    if first.shape[2:] == (1, 1) and first.shape[0] < first.shape[1]:
        matrix = torch.from_numpy(first[:, :, 0, 0])
        if triangular:
            core = torch.linalg.qr(matrix.T.contiguous(), mode="r").R.T.numpy()
        else:
            u_, s_, _ = (t.numpy() for t in torch.linalg.svd(matrix, full_matrices=False))
            core = u_ * s_
        factors[0] = core[:, :, None, None]
    last = factors[-1]
    if len(factors) > 1 and last.shape[2:] == (1, 1) and last.shape[0] > last.shape[1]:
        matrix = torch.from_numpy(last[:, :, 0, 0])
        if triangular:
            core = torch.linalg.qr(matrix.contiguous(), mode="r").R.numpy()
        else:
            _, s_, vh = (t.numpy() for t in torch.linalg.svd(matrix, full_matrices=False))
            core = s_[:, None] * vh
        factors[-1] = core[:, :, None, None]
    kept = min(factors[-1].shape[0], factors[0].shape[1])
    return factors, np.zeros(min(rows, cols) - kept)


def block_singular_values(
    convs: Sequence[ConvOperator], shortcut: Shortcut, *, dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """All singular values of a linearized block under circular boundary conditions.

    Parameters
    ----------
    convs : sequence of ConvOperator
        ``W_1 .. W_k`` in order; each one's ``input_shape`` must be the
        previous one's circular output ``(C_out, H / s_h, W / s_w)``.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
        ``S``; ``None`` gives the plain block ``W_k ... W_1``.
    dtype : torch.dtype
        Only ``torch.float64`` (see :func:`auditor.analysis.spectra.conv_singular_values`).

    Returns
    -------
    ndarray of shape (min(rows, cols),)
        Descending; ``rows = C_out H W / F^2`` and ``cols = C_in H W`` with
        ``F`` the block's total stride (e.g. 16x32x32 -> 32x16x16 is
        8192 x 16384: 8192 values).

    Notes
    -----
    Exact, not a bound: ReLU is taken as the identity and BatchNorm enters
    through ``out_scale``.

    1. Every operator is brought onto the block's coarsest grid by
       :func:`to_polyphase` (input factor ``F / (strides before it)``); the
       channel ordering of one layer's output is the next one's input, and
       the shortcut is brought to the same grid (option A keeps channel
       ``c F^2``, i.e. phase (0, 0), and moves it to ``pad_before + c``).
    2. Per frequency of one half-plane (real operators: conjugate frequencies
       have the same singular values) the matrices are multiplied,
       ``P_k(u) ... P_1(u) (+ S(u))``, and their singular values taken from
       the Gram matrix of the smaller side (SVD where that is ill-conditioned).
    3. Identity shortcut with 1x1 first and last convolutions (bottlenecks):
       ``A = I + W_k M(u) W_1`` is the identity on the complement of
       ``V = range(W_1^T) + range(W_k)`` and maps ``V`` to itself, so its
       singular values are those of ``Q^T A Q`` (``Q`` a basis of ``V``, at
       most twice the bottleneck width) and ``dim V^perp`` ones.
    4. The plain product with a frequency-independent (single-tap) first or
       last factor ``W = U S V^T`` keeps its nonzero singular values when that
       factor is replaced by ``U S`` (first) or ``S V^T`` (last): per
       frequency it is no larger than the bottleneck; the zeros are added back.

    References
    ----------
    .. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of
       Convolutional Layers", ICLR 2019.
    .. [2] "Understanding ResNet from a Discrete Dynamical System Perspective",
       ICLR 2022 submission.
    """
    if dtype != torch.float64:
        raise UsageError(f"dtype must be torch.float64, got {dtype}")
    return _block_spectra(convs, shortcut).values(residual=shortcut is not None)


# ---------------------------------------------------------------- conditioning


def _kappa(top: float, bottom: float, scale: float, side: int, what: str) -> tuple[float | None, str | None]:
    """``top / bottom``, or None and why.

    ``bottom`` is zero to working precision when ``bottom <= side * eps * scale``:
    the rank tolerance of :func:`numpy.linalg.matrix_rank` for one frequency
    matrix of size ``side``, with ``scale`` the norm bound of the computed
    factors (a product's rounding is relative to the factors, not to the result).
    """
    if not (math.isfinite(top) and math.isfinite(bottom)):
        return None, f"{what}: singular values not finite"
    if top <= 0:
        return None, f"{what} is zero"
    if bottom <= side * np.finfo(float).eps * max(scale, top):
        return None, f"{what} is singular (smallest singular value is zero to working precision)"
    value = top / bottom
    return (value, None) if math.isfinite(value) else (None, f"{what}: ratio not finite")


def _layer_side(op: ConvOperator) -> int:
    return max(op.out_channels, op.in_channels * op.stride[0] * op.stride[1])


def _shortcut_norms(shortcut: Shortcut) -> tuple[float, float, int]:
    """The norms entering the paper's formulas, and the shortcut's matrix side."""
    if isinstance(shortcut, ConvOperator):
        values = conv_singular_values(shortcut)
        return float(values[0]), float(values[-1]), _layer_side(shortcut)
    return 1.0, 1.0, 1


def _kind(shortcut: Shortcut) -> str:
    if shortcut is None:
        return "none"
    if isinstance(shortcut, IdentityShortcut):
        return "identity"
    return "option_a" if isinstance(shortcut, OptionAShortcut) else "projection"


def condition_block(
    convs: Sequence[ConvOperator],
    shortcut: Shortcut,
    *,
    name: str = "",
    stage: str = "",
    shortcut_kind: str | None = None,
    layer_extremes: Sequence[tuple[float, float]] | None = None,
    full_spectra: bool = False,
) -> BlockConditioning:
    """Paper and exact condition numbers of one block, and Lemma 1 checked.

    Parameters
    ----------
    convs : sequence of ConvOperator
        ``W_1 .. W_k`` (BN folded into ``out_scale`` unless the caller wants raw weights).
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
        None for a plain block, or (with ``shortcut_kind="other"``) a shortcut
        that is not expressible as an operator: the residual fields are then None.
    name, stage : str
        Carried into the result.
    shortcut_kind : str, optional
        Reported kind; derived from ``shortcut`` when omitted.
    layer_extremes : sequence of (sigma_max, sigma_min), optional
        ``(M_i, m_i)`` already computed (circular); computed here otherwise.
    full_spectra : bool
        Take the block's extremes from its full per-frequency spectra (the
        reference, :func:`block_singular_values`) instead of computing only the
        extremes (:func:`auditor.analysis.block_extremes.block_extremes`: the
        same values, far less work on wide blocks).

    Returns
    -------
    BlockConditioning
        With ``M = prod M_i``, ``m = prod m_i`` and shortcut norms
        ``s_max, s_min`` (1 and 1 for identity and option A):

        - ``kappa_paper_residual = (M + s_max) / (m + s_min)``: the paper's
          Eq. 2, ``(M + 1) / (m + 1)``, generalised to a projection shortcut
          (whose norm is not 1) by its largest and smallest singular values;
        - ``kappa_paper_plain = M / m``;
        - ``kappa_linear_residual = sigma_max(A) / sigma_min(A)``, ``A = W_k ... W_1 + S``;
        - ``kappa_linear_plain``: the same for ``W_k ... W_1``;
        - ``lemma1_upper_holds``: ``sigma_max(A) <= (M + s_max)(1 + 1e-9)``;
        - ``lemma1_lower_holds``: ``sigma_min(A) >= (m + s_min)(1 - 1e-9)``.

        Smallest singular values are over ``min(rows, cols)`` values (a
        stride-2 block 16x32x32 -> 32x16x16 is 8192 x 16384: 8192 values). A
        singular operator (``sigma_min <= side * eps * scale``, ``side`` the
        larger dimension of one frequency matrix, ``scale`` the norm bound of
        its factors) gives the kappa None and a reason, never inf or NaN.

    Notes
    -----
    ``kappa_linear_plain`` and ``kappa_paper_plain`` are invariant to scaling
    a weight (ratios of homogeneous quantities); the residual kappas are not,
    because ``S`` does not scale. The tolerance 1e-9 of the Lemma 1 checks
    absorbs rounding (both sides are accurate to ~1e-12 relative), nothing more.

    References
    ----------
    .. [1] "Understanding ResNet from a Discrete Dynamical System Perspective",
       ICLR 2022 submission, Eq. 2 and Lemma 1.
    .. [2] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of
       Convolutional Layers", ICLR 2019.
    """
    kind = shortcut_kind or _kind(shortcut)
    reasons: dict[str, str] = {}
    # 1. per-layer extremes M_i, m_i
    if layer_extremes is None:
        layer_extremes = []
        for op in convs:
            values = conv_singular_values(op)
            layer_extremes.append((float(values[0]), float(values[-1])))
    if len(layer_extremes) != len(convs):
        raise UsageError(f"layer_extremes has {len(layer_extremes)} entries for {len(convs)} convolutions")
    sigma = tuple(
        LayerSigma(op.name or f"conv{i + 1}", float(top), float(bottom))
        for i, (op, (top, bottom)) in enumerate(zip(convs, layer_extremes))
    )
    big_m = math.prod(s.max for s in sigma)
    small_m = math.prod(s.min for s in sigma)
    singular_layer = next(
        (why for s, op in zip(sigma, convs)
         if (why := _kappa(s.max, s.min, s.max, _layer_side(op), f"layer {s.layer!r}")[1])),
        None,
    )
    kappa_paper_plain = None if singular_layer else big_m / small_m
    if singular_layer:
        reasons["kappa_paper_plain"] = singular_layer
    # 2. the block operator, exact per frequency
    use_shortcut = shortcut is not None and kind != "other"
    found = _block_operator_extremes(convs, shortcut if use_shortcut else None, full_spectra)
    sigma_plain = found.plain
    kappa_linear_plain, why = _kappa(*sigma_plain, big_m, found.side, "the plain branch")
    if found.unconverged.get("plain"):
        kappa_linear_plain, why = None, found.unconverged["plain"]
    if why:
        reasons["kappa_linear_plain"] = why
    if not use_shortcut:
        why = "plain block: no shortcut" if kind == "none" else "shortcut is not a linear operator resdyn can express"
        for key in ("kappa_paper_residual", "kappa_linear_residual", "lemma1_upper_holds", "lemma1_lower_holds"):
            reasons[key] = why
        return BlockConditioning(
            name, stage, kind, sigma, None, kappa_paper_plain, None, kappa_linear_plain, None, sigma_plain,
            None, None, None, None, reasons, found.methods,
        )
    # 3. the paper's formula, the shortcut's norms in place of its "+1"
    s_max, s_min, s_side = _shortcut_norms(shortcut)
    if s_min <= s_side * np.finfo(float).eps * s_max:
        s_min = 0.0  # a singular projection (e.g. one that discards input)
    upper, lower = big_m + s_max, (0.0 if singular_layer else small_m) + s_min
    kappa_paper_residual = upper / lower if lower > 0 else None
    if kappa_paper_residual is None:
        reasons["kappa_paper_residual"] = "prod m_i + ||S||_min is zero: a convolution and the projection are singular"
    sigma_residual = found.residual
    kappa_linear_residual, why = _kappa(*sigma_residual, upper, found.side, "the residual block")
    if found.unconverged.get("residual"):
        kappa_linear_residual, why = None, found.unconverged["residual"]
    if why:
        reasons["kappa_linear_residual"] = why
    return BlockConditioning(
        name, stage, kind, sigma, kappa_paper_residual, kappa_paper_plain, kappa_linear_residual, kappa_linear_plain,
        sigma_residual, sigma_plain,
        bool(sigma_residual[0] <= upper * (1 + LEMMA_RTOL)), bool(sigma_residual[1] >= lower * (1 - LEMMA_RTOL)),
        (lower, upper), (s_max, s_min), reasons, found.methods,
    )


class _FoundExtremes(NamedTuple):
    plain: tuple[float, float]
    residual: tuple[float, float] | None
    side: int
    methods: dict[str, str]
    unconverged: dict[str, str]


def _block_operator_extremes(convs: Sequence[ConvOperator], shortcut: Shortcut, full_spectra: bool) -> _FoundExtremes:
    """(sigma_max, sigma_min) of the plain and residual operators: fast extremes, or the full spectra."""
    if full_spectra:
        spectra = _block_spectra(convs, shortcut)
        residual = spectra.extremes(residual=True) if shortcut is not None else None
        methods = {"plain": "full-spectrum", **({"residual": "full-spectrum"} if shortcut is not None else {})}
        return _FoundExtremes(spectra.extremes(residual=False), residual, spectra.side, methods, {})
    found = block_extremes(convs, shortcut, device=convs[0].weight.device)
    methods, unconverged = {"plain": found.plain.method}, {}
    parts = [("plain", found.plain)] + ([("residual", found.residual)] if found.residual is not None else [])
    for key, part in parts:
        methods[key] = part.method
        if not part.converged:
            unconverged[key] = f"the {key} operator's extreme singular values did not converge ({part.method})"
    residual = None if found.residual is None else (found.residual.sigma_max, found.residual.sigma_min)
    return _FoundExtremes((found.plain.sigma_max, found.plain.sigma_min), residual, found.side, methods, unconverged)
