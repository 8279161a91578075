"""Condition numbers of residual blocks, exact and as the paper defines them.

A block with convolutions ``W_1 .. W_k`` (BatchNorm folded into their
``out_scale``) and shortcut ``S`` is linearized by taking ReLU as the identity:
``A = W_k ... W_1 + S``. Under circular boundary conditions every operator is
brought onto the block's coarsest grid by the polyphase rearrangement
(:func:`auditor.analysis.spectra.to_polyphase`), where all of them are
block-diagonal over the same spatial frequencies; so the singular values of
``A`` are exactly the union over frequencies ``f`` of those of the small
matrices ``P_k(f) ... P_1(f) + S(f)``.

References
----------
.. [1] "Understanding ResNet from a Discrete Dynamical System Perspective",
   ICLR 2022 submission: Eq. 2 and Lemma 1.
.. [2] H. Sedghi, V. Gupta, P. M. Long, "The Singular Values of Convolutional
   Layers", ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from ..errors import InputError
from .spectra import ConvOperator, IdentityShortcut, OptionAShortcut, conv_singular_values, to_polyphase

__all__ = ["BlockConditioning", "block_singular_values", "condition_block", "LEMMA_RTOL", "SINGULAR_RTOL"]

Shortcut = Union[IdentityShortcut, OptionAShortcut, ConvOperator, None]

LEMMA_RTOL = 1e-9  # relative slack of the Lemma 1 checks (float64 round-off)
SINGULAR_RTOL = 1e-12  # sigma_min below this times sigma_max: singular, kappa undefined
_FREQ_CHUNK_BYTES = 1 << 27  # complex128 bytes of per-frequency matrices built at once


@dataclass(frozen=True)
class BlockConditioning:
    """Condition numbers of one block (DESIGN.md field names).

    Attributes
    ----------
    name, stage, shortcut : str
    sigma : tuple of (layer, max, min)
        Extreme singular values ``M_i``, ``m_i`` of every convolution as an operator.
    kappa_paper_residual : float or None
        ``(prod M_i + s_max) / (prod m_i + s_min)``: the paper's Eq. 2, with
        ``s = 1`` for identity and option-A shortcuts and the projection's
        extreme singular values for projections. None for plain blocks.
    kappa_paper_plain : float or None
        ``prod M_i / prod m_i``.
    kappa_linear_residual, kappa_linear_plain : float or None
        Exact condition numbers of ``W_k ... W_1 + S`` and ``W_k ... W_1``.
    sigma_linear_residual, sigma_linear_plain : (max, min) or None
    lemma1_upper_holds, lemma1_lower_holds : bool or None
        ``sigma_max(A) <= prod M_i + s_max`` and ``sigma_min(A) >= prod m_i + s_min``
        (relative tolerance :data:`LEMMA_RTOL`); None for plain blocks.
    reasons : dict of str to str
        Why a field is None.
    """

    name: str
    stage: str
    shortcut: str
    sigma: tuple[tuple[str, float, float], ...]
    kappa_paper_residual: float | None
    kappa_paper_plain: float | None
    kappa_linear_residual: float | None
    kappa_linear_plain: float | None
    sigma_linear_residual: tuple[float, float] | None
    sigma_linear_plain: tuple[float, float] | None
    lemma1_upper_holds: bool | None
    lemma1_lower_holds: bool | None
    lemma1_bounds: tuple[float, float] | None
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the contract's field names."""
        out: dict[str, Any] = {
            "name": self.name,
            "stage": self.stage,
            "shortcut": self.shortcut,
            "sigma": [{"layer": layer, "max": hi, "min": lo} for layer, hi, lo in self.sigma],
            "kappa_paper_residual": self.kappa_paper_residual,
            "kappa_paper_plain": self.kappa_paper_plain,
            "kappa_linear_residual": self.kappa_linear_residual,
            "kappa_linear_plain": self.kappa_linear_plain,
            "sigma_linear_residual": list(self.sigma_linear_residual) if self.sigma_linear_residual else None,
            "sigma_linear_plain": list(self.sigma_linear_plain) if self.sigma_linear_plain else None,
            "lemma1_upper_holds": self.lemma1_upper_holds,
            "lemma1_lower_holds": self.lemma1_lower_holds,
            "lemma1_bounds": list(self.lemma1_bounds) if self.lemma1_bounds else None,
        }
        for key, reason in self.reasons.items():
            out[f"{key}_reason"] = reason
        return out


# ---------------------------------------------------------------- per-frequency matrices


def _dense_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped kernel (C_out, C_in/g, kh, kw) -> block-diagonal dense (C_out, C_in, kh, kw)."""
    if groups == 1:
        return weight
    c_out, c_in_g = weight.shape[:2]
    dense = weight.new_zeros(c_out, c_in_g * groups, *weight.shape[2:])
    per = c_out // groups
    for g in range(groups):
        dense[g * per : (g + 1) * per, g * c_in_g : (g + 1) * c_in_g] = weight[g * per : (g + 1) * per]
    return dense


class _Symbol:
    """Per-frequency matrices of a stride-1 convolution on an (h, w) grid."""

    def __init__(self, op: ConvOperator, grid: tuple[int, int]) -> None:
        kernel = _dense_groups(op.scaled_weight().to(torch.float64), op.groups)
        self.kernel = kernel.to(torch.complex128)
        kh, kw = op.kernel_size
        ph, pw = op.padding
        # Tap (a, b) reads x[i + a - p]: phase exp(2 pi i (u (a - p) / h + v (b - p) / w)).
        self.offsets_h = torch.arange(kh, dtype=torch.float64) - ph
        self.offsets_w = torch.arange(kw, dtype=torch.float64) - pw
        self.grid = grid
        self.shape = (kernel.shape[0], kernel.shape[1])

    def at(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Matrices of shape (len(u), C_out, C_in) at frequencies (u, v)."""
        h, w = self.grid
        phase_h = torch.exp(2j * math.pi * u[:, None].double() * self.offsets_h[None] / h)  # (F, kh)
        phase_w = torch.exp(2j * math.pi * v[:, None].double() * self.offsets_w[None] / w)  # (F, kw)
        return torch.einsum("fa,fb,oiab->foi", phase_h, phase_w, self.kernel)


def _half_plane(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frequency of each conjugate pair, and its multiplicity (1 or 2).

    Real operators give P(-f) = conj(P(f)): the same singular values.
    """
    u = torch.arange(h).repeat_interleave(w)
    v = torch.arange(w).repeat(h)
    partner_u, partner_v = (-u) % h, (-v) % w
    keep = (u * w + v) <= (partner_u * w + partner_v)
    multiplicity = torch.where((partner_u == u) & (partner_v == v), 1, 2)
    return u[keep], v[keep], multiplicity[keep]


def _shortcut_symbol(shortcut: Shortcut, grid: tuple[int, int], out_channels: int) -> Any:
    """Shortcut on the coarse grid: a _Symbol, or a constant matrix (identity, option A)."""
    if shortcut is None:
        return None
    if isinstance(shortcut, IdentityShortcut):
        return torch.eye(shortcut.input_shape[0], dtype=torch.complex128)
    if isinstance(shortcut, OptionAShortcut):
        c_in, h, w = shortcut.input_shape
        f = h // grid[0]
        if f != shortcut.stride or h % f or w // grid[1] != f:
            raise InputError(f"option-A shortcut with stride {shortcut.stride} does not map {h}x{w} onto {grid}")
        # Polyphase channel c * f^2 + 0 holds x[c, f I, f J]: exactly the subsampled input.
        matrix = torch.zeros(shortcut.out_channels, c_in * f * f, dtype=torch.complex128)
        for c in range(c_in):
            matrix[shortcut.pad_before + c, c * f * f] = 1.0
        return matrix
    factor = shortcut.input_shape[1] // grid[0]
    return _Symbol(to_polyphase(shortcut, factor), grid)


def _chain(convs: Sequence[ConvOperator]) -> tuple[list[_Symbol], tuple[int, int]]:
    """Every convolution as a stride-1 operator on the block's coarsest grid."""
    out_shape = convs[-1].output_shape
    grid = (out_shape[1], out_shape[2])
    symbols = []
    for op in convs:
        _, h, w = op.input_shape
        if h % grid[0] or w % grid[1]:
            raise InputError(
                f"layer {op.name!r}: input {h}x{w} is not a multiple of the block output grid {grid}, "
                "so the circular model does not apply",
                hint="use an input size divisible by the network's total stride",
            )
        symbols.append(_Symbol(to_polyphase(op, (h // grid[0], w // grid[1])), grid))
    for first, second in zip(symbols, symbols[1:]):
        if first.shape[0] != second.shape[1]:
            raise InputError(f"block operators do not chain: {first.shape} then {second.shape}")
    return symbols, grid


def block_singular_values(
    convs: Sequence[ConvOperator], shortcut: Shortcut, *, dtype: torch.dtype = torch.float64
) -> np.ndarray:
    """All singular values of the linearized block ``W_k ... W_1 + S`` (circular boundary).

    Parameters
    ----------
    convs : sequence of ConvOperator
        The residual branch in order; each one's ``input_shape`` is the real input size.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
        None gives the plain block ``W_k ... W_1``.
    dtype : torch.dtype
        Accepted for symmetry with :func:`conv_singular_values`; the products
        are always formed in complex128.

    Returns
    -------
    ndarray of shape (n_frequencies * min(rows, cols),)
        Descending. A wide per-frequency matrix (stride 2 doubles channels and
        quarters positions) contributes ``min(rows, cols)`` values.

    Raises
    ------
    InputError
        Sizes that do not divide the strides, or operators that do not chain.
    """
    if not convs:
        raise InputError("a block needs at least one convolution")
    symbols, grid = _chain(convs)
    short = _shortcut_symbol(shortcut, grid, symbols[-1].shape[0])
    u, v, multiplicity = _half_plane(*grid)
    widest = max(max(s.shape) for s in symbols) ** 2 * 16 * (len(symbols) + 2)
    chunk = max(1, _FREQ_CHUNK_BYTES // widest)
    values = []
    for start in range(0, len(u), chunk):
        uu, vv, mm = u[start : start + chunk], v[start : start + chunk], multiplicity[start : start + chunk]
        product = symbols[0].at(uu, vv)
        for symbol in symbols[1:]:
            product = symbol.at(uu, vv) @ product
        if isinstance(short, _Symbol):
            product = product + short.at(uu, vv)
        elif short is not None:
            if short.shape != product.shape[1:]:
                raise InputError(f"shortcut {tuple(short.shape)} does not match the branch {tuple(product.shape[1:])}")
            product = product + short
        sv = torch.linalg.svdvals(product).numpy()  # (F, min(rows, cols))
        values.append(np.repeat(sv, mm.numpy(), axis=0).ravel())
    return np.sort(np.concatenate(values))[::-1]


# ---------------------------------------------------------------- condition numbers


def _kappa(hi: float, lo: float) -> tuple[float | None, str | None]:
    if not (math.isfinite(hi) and math.isfinite(lo)):
        return None, "non-finite singular values"
    if hi == 0:
        return None, "zero operator"
    if lo <= SINGULAR_RTOL * hi:
        return None, "singular operator (smallest singular value is zero to working precision)"
    return hi / lo, None


def _shortcut_norms(shortcut: Shortcut) -> tuple[float, float]:
    if isinstance(shortcut, ConvOperator):
        values = conv_singular_values(shortcut)
        return float(values[0]), float(values[-1])
    return 1.0, 1.0


def condition_block(
    convs: Sequence[ConvOperator],
    shortcut: Shortcut,
    *,
    name: str = "",
    stage: str = "",
    shortcut_kind: str | None = None,
) -> BlockConditioning:
    """Paper and exact condition numbers of one block, with the Lemma 1 checks.

    Parameters
    ----------
    convs : sequence of ConvOperator
        Residual branch, BatchNorm folded into ``out_scale`` where wanted.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None
        None: a plain block (or, with ``shortcut_kind="other"``, a shortcut that
        is not a linear operator resdyn can express: residual fields are None).
    name, stage : str
    shortcut_kind : str, optional
        Reported kind; derived from ``shortcut`` when omitted.

    Returns
    -------
    BlockConditioning

    Notes
    -----
    For a projection shortcut the paper's ``+1`` becomes ``+ s_max`` in the
    numerator and ``+ s_min`` in the denominator, the projection's extreme
    singular values (``||S|| = 1`` for identity and option A).
    """
    kind = shortcut_kind or (
        "none" if shortcut is None else "identity" if isinstance(shortcut, IdentityShortcut)
        else "option_a" if isinstance(shortcut, OptionAShortcut) else "projection"
    )
    reasons: dict[str, str] = {}
    sigma = []
    for op in convs:
        values = conv_singular_values(op)
        sigma.append((op.name, float(values[0]), float(values[-1])))
    big_m = math.prod(s[1] for s in sigma)
    small_m = math.prod(s[2] for s in sigma)
    plain_values = block_singular_values(convs, None)
    sigma_plain = (float(plain_values[0]), float(plain_values[-1]))
    kappa_linear_plain, why = _kappa(*sigma_plain)
    if why:
        reasons["kappa_linear_plain"] = why
    # The paper's ratio of products is a formula, not an operator: only a zero product is undefined.
    kappa_paper_plain = big_m / small_m if small_m > 0 and math.isfinite(big_m / small_m) else None
    if kappa_paper_plain is None:
        reasons["kappa_paper_plain"] = "a convolution has smallest singular value 0"
    residual = shortcut is not None and kind != "other"
    kappa_paper_residual = kappa_linear_residual = None
    sigma_residual = bounds = None
    upper = lower = None
    if residual:
        s_max, s_min = _shortcut_norms(shortcut)
        kappa_paper_residual = (big_m + s_max) / (small_m + s_min)
        values = block_singular_values(convs, shortcut)
        sigma_residual = (float(values[0]), float(values[-1]))
        kappa_linear_residual, why = _kappa(*sigma_residual)
        if why:
            reasons["kappa_linear_residual"] = why
        bounds = (small_m + s_min, big_m + s_max)
        upper = sigma_residual[0] <= bounds[1] * (1 + LEMMA_RTOL)
        lower = sigma_residual[1] >= bounds[0] * (1 - LEMMA_RTOL)
    else:
        why = "plain block: no shortcut" if kind == "none" else "shortcut is not a linear operator resdyn can express"
        for key in ("kappa_paper_residual", "kappa_linear_residual", "lemma1_upper_holds", "lemma1_lower_holds"):
            reasons[key] = why
    return BlockConditioning(
        name, stage, kind, tuple(sigma), kappa_paper_residual, kappa_paper_plain, kappa_linear_residual,
        kappa_linear_plain, sigma_residual, sigma_plain, upper, lower, bounds, reasons,
    )
