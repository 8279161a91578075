"""A linearized block's per-frequency operators in torch, applied factor by factor, never formed.

At a batch of frequencies ``u`` (:mod:`auditor.analysis.conditioning`), a block operator is
``A(u) = P_k(u) ... P_1(u) + S(u)``: each convolution a :class:`Kernel` (one shared matrix
for a single tap at offset zero, else ``sum_t phase_t(u) K_t`` over its nonzero taps), at the
frequencies a :class:`Factor`, the chain a :class:`FrequencyOperator` with ``A``, ``A^H`` and
the Gram products; :class:`Woodbury` applies ``A^{-1}`` of ``S + L M(u) R`` through the
bottleneck width. Batches are (channels, F, m) complex tensors. Used by
:mod:`auditor.analysis.block_extremes`.
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .frequencies import constant_tap, frequency_phases, tap_offsets

__all__ = ["real_matmul", "kron_period", "SharedMatrix", "Kernel", "Factor", "BlockKernels", "FrequencyOperator",
           "Woodbury"]


def real_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for a real (a, b) matrix and a complex (b, F, m) batch: one real GEMM."""
    b, f, m = x.shape
    product = weight @ torch.view_as_real(x.contiguous()).reshape(b, f * m * 2)
    return torch.view_as_complex(product.reshape(weight.shape[0], f, m, 2))


def kron_period(matrix: np.ndarray) -> int:
    """``p`` with ``matrix == kron(small, I_p)`` (a 1x1 convolution brought to a coarser grid), else 1."""
    rows, cols = matrix.shape
    for p in (16, 9, 4):
        if rows % p or cols % p:
            continue
        blocks = matrix.reshape(rows // p, p, cols // p, p)
        if blocks[:, 0, :, 1].any():  # quick rejection of most matrices: an off-diagonal phase pair
            continue
        diagonal = blocks[:, np.arange(p), :, np.arange(p)]  # (p, rows/p, cols/p)
        if not (diagonal == diagonal[0]).all():
            continue
        if np.count_nonzero(blocks) == np.count_nonzero(diagonal):  # nothing off the phase diagonal
            return p
    return 1


class SharedMatrix:
    """A frequency-independent (rows, cols) matrix, applied in its most compact form.

    A 1x1 convolution on a grid coarser by ``f`` is ``kron(W, I_{f^2})`` in
    the polyphase channel order (:func:`auditor.analysis.spectra.to_polyphase`):
    applied as ``W`` on each phase. Otherwise all-zero rows and columns (the
    phases a stride skips) are dropped.
    """

    def __init__(self, matrix: np.ndarray, device: torch.device) -> None:
        self.rows, self.cols = matrix.shape
        self._dense = matrix  # kept as numpy: the full matrix only where Woodbury needs it
        self.device = device
        self.period = kron_period(matrix)
        self.row_index = self.col_index = None
        if self.period > 1:
            self.small = torch.from_numpy(np.ascontiguousarray(matrix[:: self.period, :: self.period])).to(device)
            return
        nonzero = matrix != 0
        rows, cols = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
        small = matrix if rows.size == self.rows and cols.size == self.cols else matrix[np.ix_(rows, cols)]
        self.small = torch.from_numpy(np.ascontiguousarray(small)).to(device)
        if rows.size < self.rows:
            self.row_index = torch.from_numpy(rows).to(device)
        if cols.size < self.cols:
            self.col_index = torch.from_numpy(cols).to(device)

    @cached_property
    def _small_single(self) -> torch.Tensor:
        """``small`` in float32, for the single-precision warm start (see :func:`_warm_start`)."""
        return self.small.float()

    def _product(self, transpose: bool, x: torch.Tensor, out_rows: int,
                 take: torch.Tensor | None, put: torch.Tensor | None) -> torch.Tensor:
        _, f, m = x.shape
        small = self._small_single if x.dtype == torch.complex64 else self.small
        small = small.T if transpose else small
        if self.period > 1:
            p = self.period
            y = real_matmul(small, x.reshape(x.shape[0] // p, p * f, m))
            return y.reshape(out_rows, f, m)
        y = real_matmul(small, x if take is None else x[take])
        if put is None:
            return y
        out = y.new_zeros(out_rows, f, m)
        out[put] = y
        return out

    @property
    def matrix(self) -> torch.Tensor:
        """The whole (rows, cols) matrix on the device."""
        return torch.from_numpy(np.ascontiguousarray(self._dense)).to(self.device)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(False, x, self.rows, self.col_index, self.row_index)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._product(True, y, self.cols, self.row_index, self.col_index)


class Kernel:
    """The frequency-independent part of one convolution of the block (built once per operator).

    A single tap at offset zero is the same matrix at every frequency
    (:class:`SharedMatrix`); any other kernel is ``sum_t phase_t(u) K_t`` over its
    nonzero taps, each tap a :class:`SharedMatrix` (a polyphase tap touches only
    some input phases).
    """

    def __init__(self, weight: np.ndarray, padding: tuple[int, int], grid: tuple[int, int],
                 device: torch.device) -> None:
        rows, cols, kh, kw = weight.shape
        dh, dw = tap_offsets(kh, kw, padding)
        self.rows, self.cols, self.grid = rows, cols, grid
        taps = weight.reshape(rows, cols, kh * kw).transpose(2, 0, 1)
        self.shared: SharedMatrix | None = None
        tap = constant_tap(weight, padding, grid)
        if tap is not None:
            self.shared = SharedMatrix(taps[tap], device)
            return
        keep = np.flatnonzero(taps.reshape(kh * kw, -1).any(axis=1))
        self.taps = [SharedMatrix(taps[t], device) for t in keep]
        self.offsets = (dh[keep], dw[keep])
        self.device = device


class Factor:
    """A :class:`Kernel` at a batch of frequencies, on (channels, F, m) batches."""

    def __init__(self, kernel: Kernel, u: np.ndarray, v: np.ndarray) -> None:
        self.kernel, self.shared = kernel, kernel.shared
        self.rows, self.cols = kernel.rows, kernel.cols
        if self.shared is None:
            device = kernel.device
            self.phases = torch.from_numpy(frequency_phases(u, v, kernel.grid, *kernel.offsets)).to(device)  # (F, T)

    @cached_property
    def _phases_single(self) -> torch.Tensor:
        return self.phases.to(torch.complex64)

    def subset(self, rows: torch.Tensor) -> Factor:
        """The factor at the frequencies ``rows`` of its batch only."""
        part = copy.copy(self)
        if self.shared is None:
            part.__dict__.pop("_phases_single", None)
            part.phases = self.phases[rows]
        return part

    def _phases(self, x: torch.Tensor) -> torch.Tensor:
        """The (F, T) phases in ``x``'s precision."""
        return self._phases_single if x.dtype == torch.complex64 else self.phases

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(cols, F, m) -> (rows, F, m)."""
        if self.shared is not None:
            return self.shared.apply(x)
        out = None
        phases = self._phases(x)
        for t, tap in enumerate(self.kernel.taps):
            term = tap.apply(x) * phases[None, :, t, None]
            out = term if out is None else out + term
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, F, m) -> (cols, F, m)."""
        if self.shared is not None:
            return self.shared.adjoint(y)
        out = None
        phases = self._phases(y)
        for t, tap in enumerate(self.kernel.taps):
            term = tap.adjoint(y * phases[None, :, t, None].conj())
            out = term if out is None else out + term
        return out

    def apply_to_shared(self, z: torch.Tensor, n_freq: int) -> torch.Tensor:
        """The factor times one real (cols, m) matrix at every frequency: (F, rows, m) complex."""
        if self.shared is not None:
            return (self.shared.matrix @ z).to(torch.complex128).expand(n_freq, -1, -1)
        y = torch.stack([tap.matrix @ z for tap in self.kernel.taps]).to(torch.complex128)
        return torch.einsum("ft,trm->frm", self.phases, y)


class BlockKernels:
    """The kernels of one block operator, plain or residual (built once, used by every chunk)."""

    def __init__(self, block: Any, residual: bool, device: torch.device) -> None:
        weights = block.weights if residual else block.plain_weights
        self.chain = [Kernel(w, p, block.grid, device) for w, p in zip(weights, block.paddings)]
        self.identity = residual and block.identity_size > 0
        self.short = None
        if residual and not self.identity:
            self.short = Kernel(block.short_weight, block.short_padding, block.grid, device)


class FrequencyOperator:
    """``A(u)`` (residual) or ``W_k(u) ... W_1(u)`` (plain) for a batch of frequencies."""

    def __init__(self, kernels: BlockKernels, u: np.ndarray, v: np.ndarray) -> None:
        self.factors = [Factor(k, u, v) for k in kernels.chain]
        self.identity = kernels.identity
        self.short = None if kernels.short is None else Factor(kernels.short, u, v)
        self.rows, self.cols = self.factors[-1].rows, self.factors[0].cols
        self.n_freq = len(u)

    def subset(self, rows: torch.Tensor) -> FrequencyOperator:
        """The operator at the frequencies ``rows`` of its batch only."""
        part = copy.copy(self)
        part.factors = [factor.subset(rows) for factor in self.factors]
        part.short = None if self.short is None else self.short.subset(rows)
        part.n_freq = len(rows)
        return part

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for factor in self.factors:
            y = factor.apply(y)
        if self.identity:
            return y + x
        return y if self.short is None else y + self.short.apply(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        x = y
        for factor in reversed(self.factors):
            x = factor.adjoint(x)
        if self.identity:
            return x + y
        return x if self.short is None else x + self.short.adjoint(y)

    def gram(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of (F, n) through ``A^H A`` (or ``A A^H`` when A is wide): the smaller side."""
        column = x.T.unsqueeze(-1)
        if self.cols <= self.rows:
            out = self.adjoint(self.apply(column))
        else:
            out = self.apply(self.adjoint(column))
        return out.squeeze(-1).T


class Woodbury:
    """``A^{-1}`` for ``A = S + L M(u) R`` by the Woodbury identity (square A, S invertible).

    ``K(u) = I + M(u) R S^{-1} L`` has the size of ``M``'s rows (the
    bottleneck width); one LU per frequency, then every product with
    ``A^{-1}`` or ``A^{-H}`` costs ``O(n w)``.
    """

    def __init__(self, op: FrequencyOperator, s_lu: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.op = op
        self.first, self.middle, self.last = op.factors[0], op.factors[1:-1], op.factors[-1]
        self.s_lu = s_lu
        z = self.first.shared.matrix @ self._s_solve_real(self.last.shared.matrix, adjoint=False)  # R S^{-1} L
        m = self.middle[0].apply_to_shared(z, op.n_freq).permute(1, 0, 2)  # (rows, F, p)
        for factor in self.middle[1:]:
            m = factor.apply(m)
        k = m.permute(1, 0, 2) + torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        self.k_lu, self.k_pivots, info = torch.linalg.lu_factor_ex(k)
        self.singular = info > 0  # (F,): K(u) singular, so is A(u)

    def subset(self, rows: torch.Tensor) -> Woodbury:
        """The inverse at the frequencies ``rows`` of its batch only (the LU factors are sliced, not redone)."""
        part = copy.copy(self)
        part.op = self.op.subset(rows)
        part.first, part.middle, part.last = part.op.factors[0], part.op.factors[1:-1], part.op.factors[-1]
        part.k_lu, part.k_pivots, part.singular = self.k_lu[rows], self.k_pivots[rows], self.singular[rows]
        if "_single" in self.__dict__:
            part._single = (self._single[0], self._single[1][rows])
        return part

    @cached_property
    def _single(self) -> tuple[Any, Any]:
        """The LU factors of ``S`` and ``K(u)`` rounded to single precision (warm start only)."""
        s_lu = None if self.s_lu is None else (self.s_lu[0].float(), self.s_lu[1])
        return s_lu, self.k_lu.to(torch.complex64)

    def _s_solve_real(self, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if self.s_lu is None:
            return x
        s_lu = self._single[0] if x.dtype == torch.float32 else self.s_lu
        return torch.linalg.lu_solve(*s_lu, x, adjoint=adjoint)

    def _s_solve(self, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """``S^{-1}`` (or ``S^{-H}``) on a complex (n, F, m) batch, S real."""
        if self.s_lu is None:
            return x
        n, f, m = x.shape
        solved = self._s_solve_real(torch.view_as_real(x.contiguous()).reshape(n, f * m * 2), adjoint)
        return torch.view_as_complex(solved.reshape(n, f, m, 2).contiguous())

    def _k_solve(self, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """``K(u)^{-1}`` (or ``^{-H}``) per frequency on (p, F, m)."""
        k_lu = self._single[1] if x.dtype == torch.complex64 else self.k_lu
        solved = torch.linalg.lu_solve(k_lu, self.k_pivots, x.permute(1, 0, 2), adjoint=adjoint)
        return solved.permute(1, 0, 2)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        s = self._s_solve(x, adjoint=False)
        t = self.first.apply(s)
        for factor in self.middle:
            t = factor.apply(t)
        return s - self._s_solve(self.last.apply(self._k_solve(t, adjoint=False)), adjoint=False)

    def inverse_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        s = self._s_solve(y, adjoint=True)
        t = self._k_solve(self.last.adjoint(s), adjoint=True)
        for factor in reversed(self.middle):
            t = factor.adjoint(t)
        return s - self._s_solve(self.first.adjoint(t), adjoint=True)

    def inverse_gram(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of (F, n) through ``A^{-H} A^{-1}``: top eigenvalue ``1 / sigma_min(A)^2``."""
        column = x.T.unsqueeze(-1)
        return self.inverse_adjoint(self.inverse(column)).squeeze(-1).T
