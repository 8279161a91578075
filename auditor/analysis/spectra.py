"""Exact singular values of convolutions seen as linear operators.

A convolution acting on its real input ``(C_in, H, W)`` is a linear map; this
module computes its singular values exactly, not those of its kernel slices.

Circular model (``boundary="circular"``)
    For output positions ``0 <= i < H / s_h``, ``0 <= j < W / s_w``::

        y[o, i, j] = out_scale[o] * sum_{c, a, b} K[o, c, a, b]
                     * x[c, (s_h i + a - p_h) mod H, (s_w j + b - p_w) mod W]

    (``c`` restricted to the group of ``o``). It keeps all ``H / s`` output
    positions: it equals torch's output size when ``2 p = k - s`` ("same"
    padding, the ResNet case) and is the periodic extension of the padded
    convolution otherwise. It needs ``H`` and ``W`` divisible by the stride.
    Its singular values are exactly the union over the spatial frequencies of
    the singular values of small per-frequency matrices (Sedghi et al. 2019).

Zero-padded model (``boundary="zero"``)
    The operator torch's ``conv2d`` applies; only its extreme singular values
    are computed, iteratively (Lanczos on the Gram operator).

Polyphase convention (used by :func:`to_polyphase` and the block analysis in
:mod:`auditor.analysis.conditioning`): on a grid coarser by ``(f_h, f_w)``,
channel ``c * f_h * f_w + r * f_w + q`` holds ``x[c, f_h I + r, f_w J + q]``:
the ordering of :func:`torch.nn.functional.pixel_unshuffle`. It keeps the
channels of a group contiguous, so a grouped convolution stays grouped.

References
----------
.. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional
   Layers", ICLR 2019.
.. [2] "Understanding ResNet from a Discrete Dynamical System Perspective",
   ICLR 2022 submission.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, Remedy, UsageError
from .batched import (
    blas_single_thread,
    chunk_slices,
    parallel_map,
    sigma_from_gram,
    sigma_of_matrices,
    torch_single_thread,
    worker_count,
)
from .frequencies import frequency_phases, half_plane, kernel_symbols
from .boundary import check_boundary
from .operators import (
    ConvOperator,
    Extremes,
    IdentityShortcut,
    OptionAShortcut,
    linear_operator,
    pair_of_ints,
)

__all__ = [
    "ConvOperator",
    "OptionAShortcut",
    "IdentityShortcut",
    "Extremes",
    "linear_operator",
    "to_polyphase",
    "conv_singular_values",
    "conv_extreme_singular_values",
    "extremes",
]

# ---------------------------------------------------------------- polyphase


def _factor_pair(factor: int | tuple[int, int]) -> tuple[int, int]:
    pair = pair_of_ints(factor, "factor")
    if min(pair) < 1:
        raise InputError(f"polyphase factor must be positive, got {factor}")
    return pair


def _taps_1d(stride: int, padding: int, kernel: int, factor: int) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """Index map of one axis: (output phase, kernel index) -> (input phase, coarse offset).

    Returns the list ``(ro, a, r, d - d_min)``, the coarse kernel size and the
    coarse padding ``-d_min``.
    """
    out_factor = factor // stride
    entries = []
    for ro in range(out_factor):
        for a in range(kernel):
            t = stride * ro + a - padding  # fine-grid offset of this tap
            entries.append((ro, a, t % factor, t // factor))
    d_min = min(e[3] for e in entries)
    d_max = max(e[3] for e in entries)
    return [(ro, a, r, d - d_min) for ro, a, r, d in entries], d_max - d_min + 1, -d_min


def to_polyphase(op: ConvOperator, factor: int | tuple[int, int]) -> ConvOperator:
    """Re-express a convolution as a stride-1 convolution on a coarser grid.

    The input ``(C_in, H, W)`` is rearranged space-to-depth by ``factor``
    (ordering of :func:`torch.nn.functional.pixel_unshuffle`), the output by
    ``factor / stride``. The result acts on ``(C_in f_h f_w, H / f_h, W / f_w)``
    and is exactly the same circular operator up to these two permutations.

    Parameters
    ----------
    op : ConvOperator
        Any stride ``s``; ``factor`` must be a multiple of ``s`` per axis and
        divide ``H`` and ``W``.
    factor : int or (int, int)

    Returns
    -------
    ConvOperator
        Weight of shape ``(C_out g_h g_w, (C_in / groups) f_h f_w, kh', kw')``
        with ``g = f / s``, stride 1, padding ``-min(offset)``, the same groups,
        ``out_scale`` repeated ``g_h g_w`` times per channel.

    Notes
    -----
    Output channel ``o g_h g_w + ro g_w + qo`` holds ``y[o, g_h I + ro, g_w J + qo]``
    and input channel ``c f_h f_w + r f_w + q`` holds ``x[c, f_h I + r, f_w J + q]``:
    the output ordering of one layer is the input ordering of the next, so
    chains of polyphase operators compose exactly.

    References
    ----------
    .. [1] H. Sedghi, V. Gupta, P. M. Long, ICLR 2019.
    """
    (fh, fw), (sh, sw) = _factor_pair(factor), op.stride
    c_in, h, w = op.input_shape
    if fh % sh or fw % sw:
        raise InputError(f"polyphase factor {(fh, fw)} is not a multiple of the stride {op.stride}")
    if h % fh or w % fw:
        raise InputError(
            f"layer {op.name!r}: input {op.input_shape} is not divisible by {(fh, fw)}, "
            "so the circular model does not apply",
            hint="use {remedy}", remedy=Remedy("boundary", "zero"),
        )
    if (fh, fw) == (1, 1):
        return op
    (gh, gw), (kh, kw) = (fh // sh, fw // sw), op.kernel_size
    taps_h, kh2, ph2 = _taps_1d(sh, op.padding[0], kh, fh)
    taps_w, kw2, pw2 = _taps_1d(sw, op.padding[1], kw, fw)
    c_out, c_in_g = op.weight.shape[:2]
    # 1. scatter every (output phase, tap) of the fine kernel into the coarse one
    coarse = op.weight.new_zeros(c_out, gh, gw, c_in_g, fh, fw, kh2, kw2)
    for ro, a, r, dh in taps_h:
        for qo, b, q, dw in taps_w:
            coarse[:, ro, qo, :, r, q, dh, dw] += op.weight[:, :, a, b]
    # 2. flatten (C_out, g_h, g_w) and (C_in/groups, f_h, f_w): pixel_unshuffle order
    weight = coarse.reshape(c_out * gh * gw, c_in_g * fh * fw, kh2, kw2)
    scale = None if op.out_scale is None else op.out_scale.repeat_interleave(gh * gw)
    return ConvOperator(
        weight, (c_in * fh * fw, h // fh, w // fw), (1, 1), (ph2, pw2), op.groups, scale, op.name
    )


# ---------------------------------------------------------------- frequencies


def _circular_grid(op: ConvOperator) -> tuple[int, int]:
    """The output grid ``(H / s_h, W / s_w)`` of the circular model, or InputError."""
    _, h, w = op.input_shape
    if h % op.stride[0] or w % op.stride[1]:
        raise InputError(
            f"layer {op.name!r}: input {op.input_shape} is not divisible by the stride "
            f"{op.stride}, so the circular model does not apply",
            hint="use {remedy}", remedy=Remedy("boundary", "zero"),
        )
    return h // op.stride[0], w // op.stride[1]


def _half_offsets(kh: int, kw: int) -> list[tuple[int, int]]:
    """Offset differences ``d = a - b`` of a kh x kw kernel with ``d >= 0`` lexicographically."""
    return [(dh, dw) for dh in range(kh) for dw in range(-kw + 1, kw) if dh > 0 or dw >= 0]


def _autocorrelation_pairs(kh: int, kw: int) -> int:
    """Number of (m x n) @ (n x m) tap products the autocorrelation needs."""
    return sum((kh - dh) * (kw - abs(dw)) for dh, dw in _half_offsets(kh, kw))


def _autocorrelation(weight: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's autocorrelation ``R_d = sum_{a - b = d} K_a K_b^T``, split by symmetry.

    ``weight`` has shape (groups, m, n, kh, kw). Only offsets ``d >= 0`` are
    multiplied out (one BLAS-3 product each), because ``R_{-d} = R_d^T``. With
    ``theta_d = 2 pi (u d_h / H + v d_w / W)`` the Gram matrix of a frequency is

        P P^H = sum_d R_d e^{-i theta_d}
              = R_0 + sum_{d > 0} (R_d + R_d^T) cos theta_d - i (R_d - R_d^T) sin theta_d,

    a real symmetric part and a real antisymmetric one, each one real product
    over the half offsets (a quarter of the work of one complex product over
    all of them). Returns ``(sym, anti, dh, dw)``: ``sym`` of shape
    (n_half, groups * m * m) holds ``R_0`` then ``R_d + R_d^T``, ``anti`` of
    shape (n_half - 1, groups * m * m) holds ``R_d - R_d^T``, for the offsets
    ``(dh, dw)`` (``d = 0`` first).
    """
    groups, m, _, kh, kw = weight.shape
    offsets = _half_offsets(kh, kw)

    def one(offset: tuple[int, int]) -> np.ndarray:
        dh, dw = offset
        # R_d = [K_(b+d)]_b [K_b]_b^T over the taps b where both exist
        lo, hi = max(0, -dw), kw - max(0, dw)
        left = weight[..., dh:, lo + dw:hi + dw].reshape(groups, m, -1)
        right = weight[..., : kh - dh, lo:hi].reshape(groups, m, -1)
        return left @ right.transpose(0, 2, 1)

    sym = np.empty((len(offsets), groups * m * m))
    anti = np.empty((len(offsets) - 1, groups * m * m))
    for index, product in enumerate(parallel_map(one, offsets, workers)):
        if index == 0:  # d = 0 comes first and is symmetric
            sym[0] = product.reshape(-1)
            continue
        transposed = product.transpose(0, 2, 1)
        sym[index] = (product + transposed).reshape(-1)
        anti[index - 1] = (product - transposed).reshape(-1)
    dh, dw = np.array(offsets).T
    return sym, anti, dh, dw


def _gram_from_autocorrelation(sym: np.ndarray, anti: np.ndarray, phases: np.ndarray, m: int) -> np.ndarray:
    """Gram matrices ``P P^H`` (n_freq, m, m) at the frequencies of ``phases``.

    ``phases`` (n_freq, n_half) are ``e^{-i theta_d}`` for the offsets of
    :func:`_autocorrelation`: real part ``cos``, imaginary part ``-sin``.
    """
    gram = np.empty((len(phases), sym.shape[1]), dtype=np.complex128)
    gram.real = np.ascontiguousarray(phases.real) @ sym
    gram.imag = np.ascontiguousarray(phases.imag[:, 1:]) @ anti
    return gram.reshape(-1, m, m)


# ---------------------------------------------------------------- spectra of matrix batches


def _matrix_singular_values(matrix: np.ndarray) -> np.ndarray:
    """Singular values, descending, of one real (r, c) matrix: min(r, c) of them."""
    with blas_single_thread():
        return sigma_of_matrices(matrix[None])[0]


def _repeated_spectrum(blocks: np.ndarray, per_block: int, repeats: int) -> np.ndarray:
    """Spectrum of an operator whose matrix is the same at every frequency.

    ``blocks`` (groups, r, c) are its diagonal blocks at one frequency, each
    contributing ``per_block`` values (its zero singular values included);
    the whole set is repeated ``repeats`` times. Descending.
    """
    per_freq = np.zeros(len(blocks) * per_block)
    values = np.concatenate([_matrix_singular_values(block) for block in blocks])
    per_freq[: values.size] = values
    return np.repeat(np.sort(per_freq)[::-1], repeats)  # repeating keeps the order


def _drop_zero_lines(matrices: np.ndarray) -> np.ndarray:
    """Remove the rows and columns that are zero in every matrix of a (batch, r, c) stack."""
    nonzero = matrices != 0
    rows, cols = nonzero.any(axis=(0, 2)), nonzero.any(axis=(0, 1))
    return matrices[:, rows][:, :, cols]


# ---------------------------------------------------------------- circular spectra


def conv_singular_values(
    op: ConvOperator, *, boundary: str = "circular", dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """All singular values of a convolution under circular boundary conditions.

    Parameters
    ----------
    op : ConvOperator
        Input ``(C_in, H, W)``; ``H`` and ``W`` must be divisible by the stride.
    boundary : {"circular"}
        Only the circular model has an exact full spectrum; for ``"zero"`` use
        :func:`conv_extreme_singular_values`.
    dtype : torch.dtype
        Working precision; only ``torch.float64`` is accepted. It is kept in
        the signature for callers that pass it: float32 Gram eigenvalues are
        off by ~3e-6 sigma_max^2, which on real layers (kappa ~ 1e4) makes the
        smallest values meaningless, and float32 LAPACK is not faster here.

    Returns
    -------
    ndarray of shape (min(rows, cols),)
        Descending, with ``rows = C_out (H / s_h) (W / s_w)`` and
        ``cols = C_in H W``: a wide operator's extra zero singular values are
        not listed (a strided operator that discards input still lists the
        zeros it has among these ``min(rows, cols)``).

    Raises
    ------
    InputError
        ``H`` or ``W`` not divisible by the stride (use ``boundary="zero"``).

    Notes
    -----
    Algorithm (float64 throughout, BLAS on one thread, frequency chunks on
    ``torch.get_num_threads()`` worker threads):

    1. a 1x1 convolution, strided or not, has the same matrix at every
       frequency up to a unit phase (``K``, plus zero columns for the input
       phases a stride skips): one SVD, repeated ``H W / s^2`` times;
    2. polyphase: a stride-s convolution is a stride-1 one on the
       ``(H/s) x (W/s)`` grid with ``s^2 C_in`` input channels
       (:func:`to_polyphase`); groups are independent diagonal blocks;
    3. a kernel with a single tap after that step: as in 1;
    4. otherwise, only one frequency of each conjugate pair is needed (a real
       kernel gives ``P(-u, -v) = conj P(u, v)``, same singular values); per
       frequency, the eigenvalues of the Gram matrix of the smaller side
       ``P P^H``, from the kernel's autocorrelation when that is cheaper than
       forming ``P``; frequencies whose Gram eigenvalues span more than 1e8
       (where squaring would cost accuracy on the smallest values) are
       recomputed by an SVD of ``P(u, v)``. Every value is then accurate to
       about 1e-8 relative or better.

    References
    ----------
    .. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of
       Convolutional Layers", ICLR 2019.
    .. [2] "Understanding ResNet from a Discrete Dynamical System Perspective",
       ICLR 2022 submission.
    """
    check_boundary(boundary)
    if boundary != "circular":
        raise UsageError(
            "the full spectrum is only exact under the circular boundary",
            hint="use conv_extreme_singular_values(op, boundary='zero') for the extremes",
        )
    if dtype != torch.float64:
        raise UsageError(f"dtype must be torch.float64, got {dtype}")
    workers = worker_count()
    h, w = _circular_grid(op)
    phases = op.stride[0] * op.stride[1]
    # 1. one matrix for every frequency: a 1x1 kernel, strided or not, is K at
    #    every frequency (up to a unit phase) acting on one of the s^2 input
    #    phases; the other phases are zero columns (no polyphase matrix needed)
    if op.kernel_size == (1, 1):
        weight = op.scaled_weight().detach().to("cpu", torch.float64).numpy()[..., 0, 0]
        c_out, c_in_g = weight.shape
        blocks = weight.reshape(op.groups, c_out // op.groups, c_in_g)
        return _repeated_spectrum(blocks, min(c_out // op.groups, c_in_g * phases), h * w)
    frequencies = _FrequencyGrams(op, workers)
    if frequencies.blocks_at_every_frequency is not None:
        # 3. a single tap after polyphase (e.g. 2x2 stride 2): one matrix as well
        return _repeated_spectrum(frequencies.blocks_at_every_frequency, frequencies.m, h * w)
    # 4. half-plane frequencies; Gram matrices of the smaller side; eigenvalues
    with blas_single_thread(), torch_single_thread():
        frequencies.prepare()

        def chunk(part: slice) -> np.ndarray:
            return sigma_from_gram(frequencies.gram(part), lambda index: frequencies.matrices(part, index))

        sigma = np.concatenate(parallel_map(chunk, frequencies.parts(), workers))
    sigma = sigma.reshape(len(frequencies.u), frequencies.groups * frequencies.m)
    return np.sort(np.repeat(sigma, frequencies.mult, axis=0).ravel())[::-1]


class _FrequencyGrams:
    """Per-frequency Gram matrices ``P P^H`` of a convolution with several taps (steps 2-4 above).

    The stride-1 polyphase form on the output grid, groups as a batch of
    blocks, the smaller side first (``m <= n``); frequencies of the half plane.
    ``blocks_at_every_frequency`` is set instead when a single tap remains (the
    same matrices at every frequency).
    """

    def __init__(self, op: ConvOperator, workers: int) -> None:
        self.workers = workers
        self.grid = _circular_grid(op)
        coarse = to_polyphase(op, op.stride)
        self.padding = coarse.padding
        weight = coarse.scaled_weight().detach().to("cpu", torch.float64).numpy()
        c_out, c_in_g, kh, kw = weight.shape
        blocks = weight.reshape(coarse.groups, c_out // coarse.groups, c_in_g, kh, kw)
        if blocks.shape[1] > blocks.shape[2]:
            blocks = blocks.transpose(0, 2, 1, 3, 4)
        self.groups, self.m, self.n = blocks.shape[:3]
        self.blocks_at_every_frequency: np.ndarray | None = None
        if kh * kw == 1:
            self.blocks_at_every_frequency = _drop_zero_lines(np.ascontiguousarray(blocks[..., 0, 0]))
            return
        self.blocks = np.ascontiguousarray(blocks)
        self.u, self.v, self.mult = half_plane(*self.grid)
        self.use_auto = _autocorrelation_pairs(kh, kw) < 4 * len(self.u)  # vs 4 real products per frequency

    def prepare(self) -> None:
        """The kernel's autocorrelation, when the Gram matrices are built from it (inside the BLAS limits)."""
        if self.use_auto:
            self.sym, self.anti, self.dh, self.dw = _autocorrelation(self.blocks, self.workers)

    def parts(self) -> list[slice]:
        """Frequency chunks for the worker threads, within the memory budget."""
        return chunk_slices(len(self.u), self.groups * self.m * max(self.m, self.n) * 16 * 3, self.workers)

    def matrices(self, part: slice, index: np.ndarray) -> np.ndarray:
        """``P`` of the rows ``index`` (frequency-major, then group) of a chunk: (len(index), m, n)."""
        groups = self.groups
        p = kernel_symbols(self.blocks, self.padding, self.grid, self.u[part][index // groups], self.v[part][index // groups])
        return p[np.arange(len(index)), index % groups]

    def gram(self, part: slice) -> np.ndarray:
        """Gram matrices of a chunk, (frequencies * groups, m, m), frequency-major."""
        u, v = self.u[part], self.v[part]
        if not self.use_auto:
            p = kernel_symbols(self.blocks, self.padding, self.grid, u, v).reshape(-1, self.m, self.n)
            return p @ p.conj().transpose(0, 2, 1)
        return _gram_from_autocorrelation(self.sym, self.anti, frequency_phases(u, v, self.grid, self.dh, self.dw), self.m)


# ---------------------------------------------------------------- zero padding

# Above this many unknowns (smaller Gram side) the Gram matrix is not formed densely.
_DENSE_LIMIT = 2048
# Banded Cholesky is used while n * bandwidth^2 (its flop count) stays below this.
_BANDED_FLOPS = 4e10


def _zero_padded_gram(op: ConvOperator) -> tuple[Callable[[torch.Tensor], torch.Tensor], tuple[int, int, int], tuple[int, int]]:
    """The Gram operator of the smaller side of the zero-padded operator.

    Returns ``(gram, shape, radius)``: ``gram`` maps a batch (N, C, H, W) on
    the Gram side (input side ``A^T A`` for a tall operator, output side
    ``A A^T`` for a wide one) to the same shape; ``radius`` is how far apart
    (in pixels, per axis) two coupled unknowns can be.
    """
    weight = op.scaled_weight().detach().to("cpu", torch.float64)
    c_in, h, w = op.input_shape
    c_out, ho, wo = op.output_shape
    (kh, kw), (sh, sw), (ph, pw) = op.kernel_size, op.stride, op.padding
    # output_padding recovers the exact input size in the adjoint
    extra = (h - ((ho - 1) * sh - 2 * ph + kh), w - ((wo - 1) * sw - 2 * pw + kw))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, stride=op.stride, padding=op.padding, groups=op.groups)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(y, weight, stride=op.stride, padding=op.padding,
                                  output_padding=extra, groups=op.groups)

    if c_out * ho * wo >= c_in * h * w:  # tall: inputs share an output window
        return (lambda x: adjoint(forward(x))), op.input_shape, (kh - 1, kw - 1)
    return (lambda y: forward(adjoint(y))), op.output_shape, ((kh - 1) // sh, (kw - 1) // sw)


def _banded_gram(gram: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int, int],
                 radius: tuple[int, int]) -> np.ndarray:
    """Lower band storage ``ab[i - j, j] = G[i, j]`` of a Gram operator, pixel-major order.

    With unknowns numbered ``(y W + x) C + c``, coupled unknowns are at most
    ``(r_h W + r_w) C + C - 1`` apart. The band is read off by probing: the
    sum of the unit vectors of one channel at the pixels of one residue class
    modulo ``(2 r_h + 1, 2 r_w + 1)`` has columns with disjoint supports, so
    ``(2 r_h + 1)(2 r_w + 1) C`` applications of ``G`` (one batch) give every entry.
    """
    c, h, w = shape
    (rh, rw), (ph, pw) = radius, (2 * radius[0] + 1, 2 * radius[1] + 1)
    # 1. one probe per (row residue, column residue, channel)
    ys, xs = np.arange(h), np.arange(w)
    probes = torch.zeros(ph, pw, c, c, h, w, dtype=torch.float64)
    for ry in range(min(ph, h)):
        for rx in range(min(pw, w)):
            mask = torch.from_numpy(np.outer(ys % ph == ry, xs % pw == rx).astype(np.float64))
            probes[ry, rx, torch.arange(c), torch.arange(c)] = mask
    result = gram(probes.reshape(-1, c, h, w)).reshape(ph, pw, c, c, h, w).numpy()
    # 2. scatter the lower half of every pixel neighbourhood into band storage
    band = (rh * w + rw) * c + c - 1
    ab = np.zeros((band + 1, c * h * w))
    cc = np.arange(c)
    for dy in range(0, rh + 1):
        for dx in range(-rw, rw + 1):
            if dy == 0 and dx < 0:
                continue
            y, x = np.meshgrid(np.arange(max(0, -dy), min(h, h - dy)),
                               np.arange(max(0, -dx), min(w, w - dx)), indexing="ij")
            y, x = y.ravel(), x.ravel()
            # values[pixel, c, c2] = G[(y+dy, x+dx, c2), (y, x, c)]
            values = result[(y % ph)[:, None], (x % pw)[:, None], cc[None, :], :, (y + dy)[:, None], (x + dx)[:, None]]
            offset = (dy * w + dx) * c + cc[None, :] - cc[:, None]  # (c, c2): i - j
            column = ((y * w + x) * c)[:, None, None] + cc[None, :, None]
            keep = np.broadcast_to(offset >= 0, values.shape)
            ab[np.broadcast_to(offset, values.shape)[keep], np.broadcast_to(column, values.shape)[keep]] = values[keep]
    return ab


def _shift_invert_min(ab: np.ndarray, lam_max: float, tol: float) -> tuple[float, bool]:
    """Smallest eigenvalue of a banded PSD matrix: Lanczos on ``(G + mu I)^{-1}``."""
    from scipy.linalg import LinAlgError, cho_solve_banded, cholesky_banded
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    n = ab.shape[1]
    for mu in (1e-14 * lam_max, 1e-11 * lam_max, 1e-8 * lam_max):  # a singular G needs a shift
        shifted = ab.copy()
        shifted[0] += mu
        try:
            factor = cholesky_banded(shifted, lower=True, check_finite=False)
        except LinAlgError:
            continue
        inverse = LinearOperator((n, n), matvec=lambda x: cho_solve_banded((factor, True), x, check_finite=False),
                                 dtype=np.float64)
        try:
            top = eigsh(inverse, k=1, which="LA", tol=tol, v0=np.ones(n), return_eigenvectors=False)[0]
            return max(1.0 / top - mu, 0.0), True
        except ArpackNoConvergence as err:
            return (max(1.0 / np.max(err.eigenvalues) - mu, 0.0) if len(err.eigenvalues) else 0.0), False
    return 0.0, False


def _zero_padded_extremes(op: ConvOperator, tol: float, maxiter: int | None) -> Extremes:
    # imported before blas_single_thread(): that limits the BLAS libraries loaded so far
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    gram, shape, radius = _zero_padded_gram(op)
    c, h, w = shape
    n = c * h * w

    def apply(x: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(x.reshape(n, -1).T)).reshape(-1, c, h, w)
        return gram(batch).reshape(batch.shape[0], n).numpy().T

    with blas_single_thread(), torch_single_thread():
        # 1. small: the dense Gram matrix, all eigenvalues
        if n <= _DENSE_LIMIT:
            dense = apply(np.eye(n))
            lam = np.linalg.eigvalsh((dense + dense.T) / 2)
            return Extremes(math.sqrt(max(lam[-1], 0.0)), math.sqrt(max(lam[0], 0.0)), True, "dense-zero")
        # 2. largest: Lanczos converges fast at the top of the spectrum
        operator = LinearOperator((n, n), matvec=lambda x: apply(x).ravel(), matmat=apply, dtype=np.float64)
        start = np.random.default_rng(0).standard_normal(n)
        converged = True
        try:
            lam_max = float(eigsh(operator, k=1, which="LA", tol=tol, maxiter=maxiter, v0=start,
                                  return_eigenvectors=False)[0])
        except ArpackNoConvergence as err:
            converged = False
            lam_max = float(np.max(err.eigenvalues)) if len(err.eigenvalues) else 0.0
        # 3. smallest: exact shift-invert on the banded Gram matrix when affordable
        band = (radius[0] * w + radius[1]) * c + c - 1
        if n * band**2 <= _BANDED_FLOPS:
            lam_min, ok = _shift_invert_min(_banded_gram(gram, shape, radius), lam_max, tol)
            method = "banded-shift-invert-zero"
        else:  # plain Lanczos: slow at the dense bottom of the spectrum, may not converge
            method = "lanczos-zero"
            try:
                lam_min = float(eigsh(operator, k=1, which="SA", tol=tol, v0=start, ncv=min(n - 1, 64),
                                      maxiter=maxiter if maxiter is not None else 50,
                                      return_eigenvectors=False)[0])
                ok = True
            except ArpackNoConvergence as err:
                lam_min = float(np.min(err.eigenvalues)) if len(err.eigenvalues) else lam_max
                ok = False
    return Extremes(math.sqrt(max(lam_max, 0.0)), math.sqrt(max(lam_min, 0.0)), converged and ok, method)


def conv_extreme_singular_values(
    op: ConvOperator,
    *,
    boundary: str = "zero",
    tol: float = 1e-6,
    maxiter: int | None = None,
) -> Extremes:
    """Largest and smallest singular value of a convolution.

    Parameters
    ----------
    op : ConvOperator
    boundary : {"zero", "circular"}
        ``zero``: the real zero-padded operator of torch's ``conv2d`` (any
        stride and input size); ``circular``: max and min of
        :func:`conv_singular_values`.
    tol : float
        Relative tolerance of the Lanczos eigenvalues (zero boundary).
    maxiter : int, optional
        Maximum ARPACK restarts (zero boundary; None: ARPACK's default for the
        largest value, 50 for the unpreconditioned smallest).

    Returns
    -------
    Extremes
        ``converged`` is False when an iteration stopped before ``tol``; the
        values are then its last estimates. ``method`` says which path ran.

    Notes
    -----
    Zero boundary: the forward map is ``torch.nn.functional.conv2d``, the
    adjoint ``conv_transpose2d`` (with the output padding that restores the
    input size), in float64. Singular values are over ``min(rows, cols)``: the
    Gram operator ``G`` of the smaller side is used; ``sigma^2`` are its
    eigenvalues. With ``n`` unknowns on that side:

    1. ``n <= 2048``: ``G`` formed densely, all eigenvalues (``"dense-zero"``);
    2. otherwise ``sigma_max`` by Lanczos on ``G`` (fast at the top), and
       ``sigma_min`` by Lanczos on ``(G + mu I)^{-1}`` with a banded Cholesky
       factor (unknowns in pixel-major order make ``G`` banded; ``mu`` is
       ``1e-14 sigma_max^2``, raised only if ``G`` is numerically singular)
       while ``n * bandwidth^2 <= 4e10`` (CIFAR layers: about a second;
       ``"banded-shift-invert-zero"``);
    3. beyond that, plain Lanczos for the smallest eigenvalue, which the dense
       bottom of the spectrum makes slow: ``converged`` is often False there
       (``"lanczos-zero"``).

    References
    ----------
    .. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of
       Convolutional Layers", ICLR 2019.
    .. [2] "Understanding ResNet from a Discrete Dynamical System Perspective",
       ICLR 2022 submission.
    """
    check_boundary(boundary)
    if boundary == "circular":
        values = conv_singular_values(op)
        return Extremes(float(values[0]), float(values[-1]), True, "fft-circular")
    return _zero_padded_extremes(op, tol, maxiter)


def extremes(
    op: ConvOperator, *, boundary: str = "circular", tol: float = 1e-6, maxiter: int | None = None
) -> Extremes:
    """Extreme singular values under either boundary; circular by default.

    Same as :func:`conv_extreme_singular_values` with ``boundary`` defaulting
    to ``"circular"`` (exact, from :func:`conv_singular_values`).

    References
    ----------
    .. [1] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of
       Convolutional Layers", ICLR 2019.
    """
    return conv_extreme_singular_values(op, boundary=boundary, tol=tol, maxiter=maxiter)
