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
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import UsageError
from .block_algebra import Shortcut, block_spectra
from .block_extremes import block_extremes
from .spectra import (
    ConvOperator,
    IdentityShortcut,
    OptionAShortcut,
    conv_singular_values,
)

__all__ = [
    "LEMMA_RTOL",
    "Shortcut",
    "LayerSigma",
    "BlockConditioning",
    "block_singular_values",
    "condition_block",
    "FoundExtremes",
]

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
    return block_spectra(convs, shortcut).values(residual=shortcut is not None)


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
    extremes: FoundExtremes | None = None,
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
    extremes : FoundExtremes, optional
        The block operators' extremes found elsewhere (the zero-padded
        operators of :mod:`auditor.analysis.zero_block_extremes`); a ``sigma_min``
        of NaN is unknown (its reason in ``unconverged``): its kappa is None and
        Lemma 1's lower check None.

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
    found = extremes or _block_operator_extremes(convs, shortcut if use_shortcut else None, full_spectra)
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
    lower_holds = None if math.isnan(sigma_residual[1]) else bool(sigma_residual[1] >= lower * (1 - LEMMA_RTOL))
    if lower_holds is None:
        reasons["lemma1_lower_holds"] = found.unconverged.get("residual", "sigma_min unknown")
    return BlockConditioning(
        name, stage, kind, sigma, kappa_paper_residual, kappa_paper_plain, kappa_linear_residual, kappa_linear_plain,
        sigma_residual, sigma_plain,
        bool(sigma_residual[0] <= upper * (1 + LEMMA_RTOL)), lower_holds,
        (lower, upper), (s_max, s_min), reasons, found.methods,
    )


class FoundExtremes(NamedTuple):
    """``(sigma_max, sigma_min)`` of the plain and residual operators, and how they were found.

    ``side`` is the larger matrix dimension (the singularity threshold),
    ``methods`` the ``linear_method`` entries, ``unconverged`` the reason of
    each operator (``plain``, ``residual``) whose kappa is not known.
    """

    plain: tuple[float, float]
    residual: tuple[float, float] | None
    side: int
    methods: dict[str, str]
    unconverged: dict[str, str]


def _block_operator_extremes(convs: Sequence[ConvOperator], shortcut: Shortcut, full_spectra: bool) -> FoundExtremes:
    """(sigma_max, sigma_min) of the plain and residual operators: fast extremes, or the full spectra."""
    if full_spectra:
        spectra = block_spectra(convs, shortcut)
        residual = spectra.extremes(residual=True) if shortcut is not None else None
        methods = {"plain": "full-spectrum", **({"residual": "full-spectrum"} if shortcut is not None else {})}
        return FoundExtremes(spectra.extremes(residual=False), residual, spectra.side, methods, {})
    found = block_extremes(convs, shortcut, device=convs[0].weight.device)
    methods, unconverged = {"plain": found.plain.method}, {}
    parts = [("plain", found.plain)] + ([("residual", found.residual)] if found.residual is not None else [])
    for key, part in parts:
        methods[key] = part.method
        if not part.converged:
            unconverged[key] = f"the {key} operator's extreme singular values did not converge ({part.method})"
    residual = None if found.residual is None else (found.residual.sigma_max, found.residual.sigma_min)
    return FoundExtremes((found.plain.sigma_max, found.plain.sigma_min), residual, found.side, methods, unconverged)
