"""Conditioning of a whole network: every layer's spectrum, every block's kappas.

Builds the operator descriptions of :mod:`auditor.analysis.spectra` from the
model's modules (folding eval-mode BatchNorm as a per-channel scale unless
``fold_bn=False``) and hands them to the pure math.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .. import distributed
from ..analysis.batched import blas_single_thread, torch_single_thread, worker_count
from ..analysis.boundary import check_boundary
from ..analysis.conditioning import BlockConditioning, FoundExtremes, condition_block
from ..analysis.pooled_projection import pooled_projection
from ..analysis.spectra import (
    ConvOperator,
    IdentityShortcut,
    OptionAShortcut,
    conv_extreme_singular_values,
    conv_singular_values,
    linear_operator,
)
from ..analysis.zero_block_extremes import (
    DEFAULT_MAX_ITERATIONS,
    ZeroBlockExtremes,
    ZeroOperatorExtremes,
    grid_factorable,
    shares_factorization,
    zero_block_extremes,
    zero_operator_extremes,
)
from ..errors import ArchitectureError, UsageError
from ..models.anatomy import BlockInfo, ConvInfo, LayerInfo
from ..models.block_graph import Factor
from ..report.nonfinite import INFINITE, Measured, aggregate, put
from ..report.sections import linearization_entries
from ..subject import Subject

__all__ = [
    "LayerSpectrum", "ConditionReport", "condition", "block_operators", "save_spectra", "conditioning_entry",
]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LayerSpectrum:
    """Extreme singular values of one conv or linear layer as an operator."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    sigma_max: float | None
    sigma_min: float | None
    kappa: float | None
    method: str
    batchnorm_folded: str | None = None
    converged: bool = True
    kappa_reason: str | None = None
    singular_values: np.ndarray | None = field(default=None, repr=False, compare=False)
    boundary: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe entry of the ``layers`` section."""
        entry = {
            "name": self.name,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "sigma_max": self.sigma_max,
            "sigma_min": self.sigma_min,
            "kappa": self.kappa,
            "method": self.method,
            "batchnorm_folded": self.batchnorm_folded,
            "converged": self.converged,
        }
        if self.kappa_reason:
            entry["kappa_reason"] = self.kappa_reason
        if self.boundary is not None:  # written for the zero boundary (circular reports stay as they were)
            entry["boundary"] = self.boundary
        return entry


@dataclass(frozen=True)
class ConditionReport:
    """Per-layer spectra and per-block condition numbers of a network."""

    boundary: str
    fold_bn: bool
    layers: tuple[LayerSpectrum, ...]
    blocks: tuple[BlockConditioning, ...]
    block_info: tuple[BlockInfo, ...]
    subject: Subject | None = field(default=None, repr=False, compare=False)
    block_extras: tuple[dict[str, Any], ...] = ()

    def to_document(self) -> dict[str, Any]:
        """The ``condition`` report (JSON contract of ``resdyn condition``); needs ``subject``."""
        from ..report.document import report_header

        if self.subject is None:
            raise ValueError("to_document() needs the report's subject (reports from condition() have it)")
        return {
            **report_header("condition", self.subject),
            "config": {"boundary": self.boundary, "fold_bn": self.fold_bn},
            "layers": [layer.to_dict() for layer in self.layers],
            "blocks": self.block_entries(),
            "summary": self.summary(),
        }

    def summary(self) -> dict[str, Any]:
        """Counts of Lemma 1 violations, the singular blocks, and the largest / median kappas.

        Plain blocks have no residual kappa; for a plain network the worst
        block is the one with the largest exact plain kappa. A singular
        block's kappa counts as +inf (:mod:`auditor.report.nonfinite`): a
        maximum over it is null with a reason and ``infinite`` names it, a
        median sorts it last; a kappa that is unknown (extremes that did not
        converge) leaves its maximum and median null with that block's reason.
        """
        entries = [conditioning_entry(b) for b in self.blocks]
        residual = [e for e in entries if e["shortcut"] != "none"]
        own = [(e, "kappa_linear_residual" if e["shortcut"] != "none" else "kappa_linear_plain") for e in entries]
        singular = [e["name"] for e, key in own if key in (e.get(INFINITE) or {})]
        undefined = {e["name"]: e.get(f"{key}_reason") or "no value" for e, key in own
                     if e.get(key) is None and key not in (e.get(INFINITE) or {})}
        out: dict[str, Any] = {
            "blocks": len(self.blocks),
            "residual_blocks": len(residual),
            "lemma1_lower_violations": sum(b.lemma1_lower_holds is False for b in self.blocks),
            "lemma1_upper_violations": sum(b.lemma1_upper_holds is False for b in self.blocks),
            "singular_blocks": len(singular),
            "singular_block_names": singular,
            "undefined_blocks": undefined,
        }
        kappas = {}
        for name, group, key, how in (
            ("max_kappa_linear_residual", residual, "kappa_linear_residual", max),
            ("median_kappa_linear_residual", residual, "kappa_linear_residual", statistics.median),
            ("max_kappa_linear_plain", entries, "kappa_linear_plain", max),
            ("median_kappa_linear_plain", entries, "kappa_linear_plain", statistics.median),
            ("max_kappa_paper_residual", residual, "kappa_paper_residual", max),
            ("median_kappa_paper_residual", residual, "kappa_paper_residual", statistics.median),
        ):
            kappas[name] = aggregate(group, key, how) if group else Measured(None)
            put(out, name, kappas[name])
        worst = _worst(residual, "kappa_linear_residual", kappas["max_kappa_linear_residual"])
        if worst is None and not any(e.get("kappa_linear_residual") is not None for e in residual):
            worst = _worst(entries, "kappa_linear_plain", kappas["max_kappa_linear_plain"])  # a plain network
        out["worst_block"] = worst
        if INFINITE in out:  # after the kappas, as the blocks' entries have it
            out[INFINITE] = out.pop(INFINITE)
        if self.boundary != "circular":
            out["boundary"] = self.boundary
        return out

    def block_entries(self) -> list[dict[str, Any]]:
        """``blocks`` entries: the anatomy's fields plus the conditioning fields."""
        entries = []
        for info, cond in zip(self.block_info, self.blocks):
            entry = {"name": info.name, "stage": info.stage, "shortcut": info.shortcut}
            entry.update({k: v for k, v in conditioning_entry(cond).items() if k not in ("name", "stage")})
            entry["linearization"] = linearization_entries(info)
            if self.block_extras:
                entry.update(self.block_extras[len(entries)])
            entries.append(entry)
        return entries

    def bounds(self) -> dict[str, tuple[float | None, float | None]]:
        """Block name -> (paper kappa, exact linear kappa), for the stability check."""
        out = {}
        for info, cond in zip(self.block_info, self.blocks):
            if info.shortcut == "none":
                out[info.name] = (cond.kappa_paper_plain, cond.kappa_linear_plain)
            else:
                out[info.name] = (cond.kappa_paper_residual, cond.kappa_linear_residual)
        return out


# ---------------------------------------------------------------- singular kappas

_KAPPA_KEYS = ("kappa_paper_residual", "kappa_paper_plain", "kappa_linear_residual", "kappa_linear_plain")
# The reasons of auditor.analysis.conditioning for a kappa left None because its operator
# is singular ("... is singular (smallest singular value is zero ...)", "... is zero",
# "prod m_i + ||S||_min is zero: ...", a ratio that overflows): a condition number of +inf.
# Not: extremes that did not converge, values that are not finite, no shortcut.
_SINGULAR_REASON = re.compile(r"\bis (singular|zero)\b|: ratio not finite")


def conditioning_entry(cond: BlockConditioning) -> dict[str, Any]:
    """``cond.to_dict()`` with the ``infinite`` map naming the kappas that are +inf (a singular operator)."""
    entry = cond.to_dict()
    infinite = {key: "inf" for key in _KAPPA_KEYS
                if entry.get(key) is None and _SINGULAR_REASON.search(entry.get(f"{key}_reason") or "")}
    if infinite:
        entry[INFINITE] = infinite
    return entry


def _worst(entries: list[dict[str, Any]], key: str, largest: Measured) -> str | None:
    """The block holding the largest ``key``: the first singular one when it is +inf; None when unknown."""
    if largest.value is None:
        return None
    for entry in entries:
        if largest.infinite and key in (entry.get(INFINITE) or {}):
            return str(entry["name"])
        if entry.get(key) is not None and entry[key] == largest.value:
            return str(entry["name"])
    return None


# ---------------------------------------------------------------- operators


def _batchnorm_pairs(model: nn.Module) -> dict[str, str]:
    """Conv module path -> the BatchNorm applied directly to its output (torch.fx)."""
    try:
        graph_module = fx.symbolic_trace(model)
    except Exception:
        return {}
    modules = dict(graph_module.named_modules())
    pairs = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d):
            for user in node.users:
                if user.op == "call_module" and isinstance(modules.get(user.target), nn.BatchNorm2d):
                    pairs[str(node.target)] = str(user.target)
    return pairs


def _bn_scale(bn: nn.Module) -> torch.Tensor:
    """Eval-mode BatchNorm as a per-channel factor gamma / sqrt(var + eps)."""
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    return gamma / torch.sqrt(bn.running_var.detach().double() + bn.eps)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _tensor_at(modules: dict[str, nn.Module], path: str) -> torch.Tensor:
    owner, _, attribute = path.rpartition(".")
    value = getattr(modules[owner], attribute)
    return value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _factor_scale(modules: dict[str, nn.Module], factor: Factor, channels: int) -> torch.Tensor:
    """The per-channel diagonal (``channels`` float64 entries) a factor of the linearization stands for."""
    if factor.kind == "batchnorm":
        scale = _bn_scale(modules[factor.path])
    elif factor.kind in ("layernorm", "groupnorm"):
        norm = modules[factor.path]
        # the normalization as identity, its affine part gamma kept (beta shifts, it does not scale)
        scale = norm.weight.detach().double() if norm.weight is not None else torch.ones(channels, dtype=torch.float64)
    else:
        scale = _tensor_at(modules, factor.path).double().reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(channels)
    if scale.numel() != channels:
        raise UsageError(
            f"{factor.path}: a {factor.kind} factor of {scale.numel()} entries on {channels} channels is not a "
            "per-channel diagonal, so the block has no exact linear operator"
        )
    return scale


def _product(modules: dict[str, nn.Module], factors: tuple[Factor, ...], channels: int,
             fold_bn: bool) -> torch.Tensor | None:
    kept = [f for f in factors if fold_bn or f.kind != "batchnorm"]
    if not kept:
        return None
    out = torch.ones(channels, dtype=torch.float64)
    for factor in kept:
        out = out * _factor_scale(modules, factor, channels)
    return out


def _dilated(weight: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    """A dilated kernel as the plain kernel it equals: taps ``d`` apart, zeros between."""
    if dilation == (1, 1):
        return weight
    c_out, c_in, kh, kw = weight.shape
    full = weight.new_zeros(c_out, c_in, dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    full[:, :, :: dilation[0], :: dilation[1]] = weight
    return full


def _input_scaled(weight: torch.Tensor, scale: torch.Tensor, groups: int) -> torch.Tensor:
    """``W diag(scale)``: each input channel's taps times its factor (groups: channel ``g c_g + j``)."""
    c_out, c_in_g = weight.shape[:2]
    per_group = scale.reshape(groups, c_in_g).repeat_interleave(c_out // groups, dim=0)  # (c_out, c_in_g)
    return weight * per_group.to(weight)[:, :, None, None]


def _layer_operator(modules: dict[str, nn.Module], conv: ConvInfo, fold_bn: bool, device: torch.device) -> ConvOperator:
    """A block's convolution (or per-position Linear) with its factors of the linearization folded in."""
    module = modules[conv.name]
    weight = module.weight.detach().to(torch.float64)
    if conv.linear:
        weight = weight[:, :, None, None]
    pre = _product(modules, conv.pre, conv.in_channels, fold_bn)
    if pre is not None:
        weight = _input_scaled(weight, pre, conv.groups)
    post = _product(modules, conv.post, conv.out_channels, fold_bn)
    return ConvOperator(
        weight=_dilated(weight, conv.dilation).to(device),
        input_shape=tuple(int(s) for s in conv.input_shape),
        stride=conv.stride,
        padding=conv.padding,
        groups=conv.groups,
        out_scale=None if post is None else post.to(device),
        name=conv.name,
    )


def _folded(conv: ConvInfo, fold_bn: bool) -> str | None:
    """The report's ``batchnorm_folded``: the BatchNorms folded into a block's layer."""
    names = [f.path for f in (*conv.pre, *conv.post) if f.kind == "batchnorm"] if fold_bn else []
    return ", ".join(names) or None


def _conv_operator(
    modules: dict[str, nn.Module], layer: LayerInfo, bn: str | None, fold_bn: bool, device: torch.device
) -> ConvOperator:
    """A convolution outside the blocks, with the BatchNorm after it folded in when asked."""
    scale = _bn_scale(modules[bn]).to(device) if (bn and fold_bn) else None
    return ConvOperator(
        weight=_dilated(modules[layer.name].weight.detach().to(dtype=torch.float64), layer.dilation).to(device),
        input_shape=tuple(int(s) for s in layer.input_shape),
        stride=layer.stride,
        padding=layer.padding,
        groups=layer.groups,
        out_scale=scale,
        name=layer.name,
    )


def _shortcut_operator(
    modules: dict[str, nn.Module], block: BlockInfo, fold_bn: bool, device: torch.device
) -> Any:
    if block.shortcut == "identity":
        return IdentityShortcut(block.input_shape)
    if block.shortcut == "option_a" and block.option_a is not None:
        return OptionAShortcut(block.input_shape, block.option_a.out_channels, block.option_a.stride, block.option_a.pad_before)
    if block.shortcut == "projection" and len(block.shortcut_convs) == 1:
        conv = block.shortcut_convs[0]
        if tuple(conv.input_shape) != tuple(block.input_shape):
            return _pooled_shortcut(modules, block, fold_bn, device)
        return _layer_operator(modules, conv, fold_bn, device)
    return None  # "none" (plain) or a shortcut we cannot express as an operator


def _pooled_shortcut(modules: dict[str, nn.Module], block: BlockInfo, fold_bn: bool, device: torch.device) -> Any:
    """``Sequential(AvgPool2d(s, s), Conv2d 1x1, BN)`` (timm ResNet-D) as one exact s x s stride-s convolution."""
    conv = block.shortcut_convs[0]
    parent, _, index = conv.name.rpartition(".")
    container = modules.get(parent)
    before = list(container)[: int(index)] if isinstance(container, nn.Sequential) and index.isdigit() else []
    pools = [m for m in before if not isinstance(m, nn.Identity)]
    pool = pools[0] if len(pools) == 1 and isinstance(pools[0], nn.AvgPool2d) else None
    size = _pair(pool.kernel_size) if pool is not None else (0, 0)
    if (pool is None or size[0] != size[1] or _pair(pool.stride or pool.kernel_size) != size
            or _pair(pool.padding) != (0, 0) or conv.kernel != (1, 1) or conv.stride != (1, 1) or conv.groups != 1):
        raise UsageError(
            f"block {block.name}: its shortcut projection {conv.name} sees {conv.input_shape}, the block "
            f"{block.input_shape}, and what lies between is not one average pool: no exact operator",
            hint="resdyn conditions identity, option A, 1x1 projection and average-pool + 1x1 shortcuts",
        )
    projection = _layer_operator(modules, conv, fold_bn, device)
    return pooled_projection(projection.weight, size[0], block.input_shape, out_scale=projection.out_scale,
                             name=parent)


def _zero_layer(op: ConvOperator, max_iterations: int) -> tuple[float, float | None, str, bool]:
    """``(sigma_max, sigma_min, method, converged)`` of a zero-padded convolution.

    A stride-1 convolution that keeps its grid takes the blocks' route (a one-factor "block": Lanczos for
    ``sigma_max``, the torus solver or a nested-dissection LU and inverse Lanczos for ``sigma_min``; ``W`` is
    factored, not its Gram matrix; the torus reaches 224 px and 64 channels at 32 px too); others (strided,
    channel-changing, or beyond both factorizations' memory budgets) take :func:`conv_extreme_singular_values`.
    """
    if grid_factorable(op):
        found = zero_operator_extremes([op], None, max_iterations=max_iterations)
        return found.sigma_max, found.sigma_min, f"zero: {found.method}", (
            found.max_converged and found.sigma_min is not None)
    extremes = conv_extreme_singular_values(op, boundary="zero")
    return extremes.sigma_max, extremes.sigma_min, extremes.method, extremes.converged


def _layer_spectrum(
    op: ConvOperator | None, layer: LayerInfo, boundary: str, bn: str | None, keep: bool,
    max_iterations: int = DEFAULT_MAX_ITERATIONS, found: ZeroOperatorExtremes | None = None,
) -> LayerSpectrum:
    """A layer's entry; ``found``: its zero-padded extremes computed with its block (``op`` unused)."""
    values = None
    if found is not None:
        sigma_max, sigma_min, method = found.sigma_max, found.sigma_min, f"zero: {found.method}"
        converged = found.max_converged and found.sigma_min is not None
    elif boundary == "circular" or layer.kind == "linear":
        values = conv_singular_values(op)
        sigma_max, sigma_min = float(values[0]), float(values[-1])
        method = "fft-circular" if layer.kind == "conv" else "svd"
        converged = True
    else:
        sigma_max, sigma_min, method, converged = _zero_layer(op, max_iterations)
    kappa, reason = None, None
    if sigma_min is None or sigma_max is None:
        reason = "did not converge"
    elif sigma_min <= sigma_max * 1e-12 or sigma_min == 0:
        reason = "singular operator (smallest singular value is zero to working precision)"
    else:
        kappa = sigma_max / sigma_min
    if kappa is not None and not math.isfinite(kappa):
        kappa, reason = None, "not finite"
    return LayerSpectrum(
        layer.name, layer.kind, layer.input_shape, sigma_max, sigma_min, kappa, method, bn,
        converged, reason, values if keep else None, None if boundary == "circular" else boundary,
    )


# ---------------------------------------------------------------- zero-padded blocks


def _zero_part(part: ZeroOperatorExtremes) -> tuple[tuple[float, float], str | None]:
    """``(sigma_max, sigma_min)`` (NaN where only an interval is known) and why a kappa is unknown."""
    if part.sigma_min is None:
        return (part.sigma_max, math.nan), part.reason or "sigma_min not certified"
    if not part.max_converged and part.sigma_min > 0:  # sigma_min = 0 is singular whatever sigma_max is
        return (part.sigma_max, part.sigma_min), part.reason or "sigma_max did not converge"
    return (part.sigma_max, part.sigma_min), None


def zero_found(found: ZeroBlockExtremes) -> FoundExtremes:
    """The zero-padded extremes as :func:`auditor.analysis.conditioning.condition_block` takes them.

    Parameters
    ----------
    found : ZeroBlockExtremes
        From :func:`auditor.analysis.zero_block_extremes.zero_block_extremes`.

    Returns
    -------
    FoundExtremes
        An interval's ``sigma_min`` is NaN and its operator's reason is in ``unconverged``.
    """
    parts = [("plain", found.plain)] + ([("residual", found.residual)] if found.residual is not None else [])
    values, methods, unconverged = {}, {}, {}
    for key, part in parts:
        values[key], why = _zero_part(part)
        methods[key] = f"zero: {part.method}"
        if why:
            unconverged[key] = why
    return FoundExtremes(values["plain"], values.get("residual"), found.side, methods, unconverged)


def _zero_extras(found: ZeroBlockExtremes, cond: BlockConditioning) -> tuple[dict[str, Any], bool | None]:
    """A block entry's zero-boundary fields: the boundary, and each interval with its kappa interval.

    Returns the fields and Lemma 1's lower check decided by the interval where it can be
    (``lower >= prod m_i + s_min``: holds; ``upper <`` it: violated; else None).
    """
    extras: dict[str, Any] = {"boundary": "zero"}
    holds = cond.lemma1_lower_holds
    for key, part in (("plain", found.plain), ("residual", found.residual)):
        if part is None or part.sigma_min is not None:
            continue
        low, high = part.sigma_min_interval
        extras[f"sigma_min_interval_{key}"] = [low, high]
        extras[f"kappa_linear_{key}_interval"] = [
            part.sigma_max / high if high > 0 else None, part.sigma_max / low if low > 0 else None,
        ]
        if key == "residual" and cond.lemma1_bounds is not None:
            bound = cond.lemma1_bounds[0] * (1 - 1e-9)
            holds = True if low >= bound else (False if high < bound else None)
    return extras, holds


def block_operators(
    modules: dict[str, nn.Module], block: BlockInfo, *, fold_bn: bool = True, device: str | torch.device = "cpu"
) -> tuple[list[ConvOperator], Any]:
    """The linearized block as :func:`condition` conditions it: its factors and its shortcut.

    Parameters
    ----------
    modules : dict of str to nn.Module
        ``dict(model.named_modules())`` of the network ``block`` was found in.
    block : BlockInfo
        From :func:`auditor.models.anatomy.analyze_anatomy`.
    fold_bn : bool
        Fold the BatchNorms of the linearization (the other factors always are).
    device : str or torch.device

    Returns
    -------
    convs : list of ConvOperator
        ``W_1 .. W_k``, every factor of the linearization folded in.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None

    Raises
    ------
    ArchitectureError
        The block holds a part no rule of the linearization covers.
    """
    _refuse_uncovered((block,))
    target = torch.device(device)
    convs = [_layer_operator(modules, c, fold_bn, target) for c in block.convs]
    return convs, _shortcut_operator(modules, block, fold_bn, target)


def _refuse_uncovered(blocks: tuple[BlockInfo, ...]) -> None:
    """One line naming the first part of a block that no rule of the linearization covers."""
    for block in blocks:
        if block.uncovered:
            raise ArchitectureError(
                f"block {block.name}: {block.uncovered[0]} is not covered by resdyn's linearization, "
                "so the block has no exact linear operator to condition",
                hint="'resdyn stability' and 'resdyn angles' still run on this network; "
                "see the README's supported architectures",
            )


def _cost(modules: dict[str, nn.Module], name: str, input_shape: tuple[int, ...]) -> float:
    """Estimated cost of a layer's spectrum (for splitting work across ranks): frequencies x SVD size."""
    weight = getattr(modules.get(name), "weight", None)
    if weight is None or weight.dim() < 2:
        return 1.0
    rows, cols = int(weight.shape[0]), int(weight[0].numel())
    frequencies = math.prod(int(s) for s in input_shape[1:]) if weight.dim() == 4 else 1
    return float(frequencies * rows * cols * min(rows, cols))


def _zero_block_cost(block: BlockInfo) -> float:
    """Estimated cost of a block's zero-padded extremes (the largest start first on the worker threads): its
    input's size, four times for a down-sampling block (a Gram matrix's nested dissection; ResNet-56: 3 s against
    0.6-1.1 s on one core)."""
    strided = any(max(c.stride) > 1 for c in block.convs)
    return float(math.prod(block.convs[0].input_shape)) * (4.0 if strided else 1.0)


def _shifted(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """``progress`` of a phase that starts after ``offset`` of ``total`` steps."""
    if progress is None:
        return None
    return lambda done, _: progress(offset + done, total)


def condition(
    subject: Subject,
    *,
    fold_bn: bool = True,
    boundary: str = "circular",
    device: str = "cpu",
    keep_spectra: bool = False,
    progress: Progress | None = None,
    full_spectra: bool = False,
    skip_uncovered: bool = False,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> ConditionReport:
    """Spectra of every conv / linear layer and condition numbers of every block.

    Parameters
    ----------
    subject : Subject
        The loaded network (see :func:`auditor.subject.open_subject`).
    fold_bn : bool
        Fold eval-mode BatchNorm into the preceding convolution.
    boundary : {"circular", "zero"}
        ``circular``: all singular values, exact, by FFT (Sedghi et al. 2019);
        ``zero``: exact extremes of the zero-padded operators (iterative), of
        the layers and of the blocks (:mod:`auditor.analysis.zero_block_extremes`:
        a block's ``sigma_min`` that cannot be certified is an interval, its
        kappa None with the reason, ``*_interval`` fields beside it).
    device : str
        ``cpu`` or ``cuda``.
    keep_spectra : bool
        Keep every layer's full list of singular values (for ``--save-spectra``).
    progress : callable, optional
        ``progress(done, total)``.
    full_spectra : bool
        Take every block's extremes from its full per-frequency spectra (the
        slow reference) instead of the fast extremes; same numbers.
    skip_uncovered : bool
        Leave out the blocks with a part no rule of the linearization covers
        (for the stability bounds) instead of refusing the network.
    max_iterations : int
        Zero boundary: Lanczos steps of each block operator's run before its
        extreme is reported uncertified (an interval).

    Raises
    ------
    ArchitectureError
        A block holds a part the linearization does not cover (unless ``skip_uncovered``).
    """
    check_boundary(boundary)
    target = torch.device(device)
    model = subject.loaded.model
    modules = dict(model.named_modules())
    layers = subject.anatomy.layers
    blocks_info = subject.anatomy.blocks
    if skip_uncovered:
        blocks_info = tuple(b for b in blocks_info if not b.uncovered)
    _refuse_uncovered(blocks_info)
    pairs = _batchnorm_pairs(model)
    # every layer of a block is conditioned with the factors its block's linearization folds into it
    block_layers = {c.name: c for b in blocks_info for c in (*b.convs, *b.shortcut_convs)}
    total = len(layers) + len(blocks_info)

    branch_convs = {c.name for b in blocks_info for c in b.convs}

    def layer_spectrum(index: int) -> LayerSpectrum | None:
        layer = layers[index]
        conv = block_layers.get(layer.name)
        if conv is not None:
            op, bn = _layer_operator(modules, conv, fold_bn, target), _folded(conv, fold_bn)
            if boundary == "zero" and layer.name in branch_convs and shares_factorization(op):
                return None  # computed with its block, from the LU its plain branch takes
        elif layer.kind == "conv":
            bn = pairs.get(layer.name) if fold_bn else None
            op = _conv_operator(modules, layer, bn, fold_bn, target)
        else:
            bn = None
            op = linear_operator(modules[layer.name].weight.detach().to(target, torch.float64), name=layer.name)
        return _layer_spectrum(op, layer, boundary, bn, keep_spectra, max_iterations)

    # Layers, then blocks, each split across the ranks under torchrun (one rank: a loop). The zero boundary's
    # operators run on worker threads, one BLAS and torch thread each (their LAPACK and torch calls release
    # the GIL; one LU per core beats one multi-threaded LU on these fronts).
    threads = worker_count() if boundary == "zero" and target.type == "cpu" else 1
    with _one_thread_each() if threads > 1 else contextlib.nullcontext():
        return _condition_units(subject, modules, layers, blocks_info, block_layers, layer_spectrum, boundary,
                                fold_bn, full_spectra, max_iterations, target, progress, total, threads)


def _one_thread_each() -> contextlib.ExitStack:
    """One BLAS thread and one torch thread for the calls inside (the worker threads share the cores)."""
    import scipy.linalg  # noqa: F401  (loaded before the BLAS limit: it acts on the libraries loaded so far)
    import scipy.sparse.linalg  # noqa: F401

    stack = contextlib.ExitStack()
    stack.enter_context(blas_single_thread())
    stack.enter_context(torch_single_thread())
    return stack


def _condition_units(subject: Subject, modules: dict[str, nn.Module], layers: Any, blocks_info: Any,
                     block_layers: dict[str, ConvInfo],
                     layer_spectrum: Callable[[int], LayerSpectrum | None], boundary: str, fold_bn: bool,
                     full_spectra: bool, max_iterations: int, target: torch.device, progress: Progress | None,
                     total: int, threads: int) -> ConditionReport:
    """:func:`condition`'s layers, then blocks, on ``threads`` worker threads per rank."""
    spectra = distributed.compute(
        len(layers), layer_spectrum, costs=[_cost(modules, layer.name, layer.input_shape) for layer in layers],
        progress=_shifted(progress, 0, total), threads=threads,
    )
    # circular (M_i, m_i) of the blocks' layers (the same operators the blocks build):
    # the blocks reuse them instead of computing every spectrum a second time
    circular_extremes: dict[str, tuple[float, float]] = {}
    for layer, spectrum in zip(layers, spectra):
        if spectrum is not None and layer.name in block_layers and spectrum.method in ("fft-circular", "svd"):
            circular_extremes[layer.name] = (spectrum.sigma_max, spectrum.sigma_min)

    zero_extremes = {layer.name: (s.sigma_max, s.sigma_min) for layer, s in zip(layers, spectra)
                     if boundary == "zero" and s is not None and s.sigma_max is not None and s.sigma_min is not None}

    def block_conditioning(index: int) -> tuple[BlockConditioning, dict[str, Any] | None, dict[str, Any]]:
        block = blocks_info[index]
        convs, shortcut = block_operators(modules, block, fold_bn=fold_bn, device=target)
        if boundary == "zero":
            # the zero-padded block operators, and the layers' zero-padded extremes in the paper's kappa (those
            # of the branch's convolutions from the LUs the plain branch takes: ``factors``)
            use = shortcut if block.shortcut != "other" else None
            found = zero_block_extremes(convs, use, max_iterations=max_iterations, factor_extremes=True)
            layer_parts = {c.name: part for c, part in zip(block.convs, found.factors) if part is not None}
            known = [zero_extremes.get(c.name) for c in block.convs]
            for i, c in enumerate(block.convs):
                part = layer_parts.get(c.name)
                if part is not None and part.sigma_min is not None:
                    known[i] = (part.sigma_max, part.sigma_min)
            cond = condition_block(
                convs, shortcut, name=block.name, stage=block.stage, shortcut_kind=block.shortcut,
                layer_extremes=None if None in known else known, extremes=zero_found(found),
            )
            extras, holds = _zero_extras(found, cond)
            if holds is not None and holds != cond.lemma1_lower_holds:
                reasons = {k: v for k, v in cond.reasons.items() if k != "lemma1_lower_holds"}
                cond = dataclasses.replace(cond, lemma1_lower_holds=holds, reasons=reasons)
            return cond, extras, layer_parts
        known = [circular_extremes.get(c.name) for c in block.convs]
        return condition_block(
            convs, shortcut, name=block.name, stage=block.stage, shortcut_kind=block.shortcut,
            layer_extremes=None if None in known else known, full_spectra=full_spectra,
        ), None, {}

    found = distributed.compute(
        len(blocks_info), block_conditioning,
        costs=[_zero_block_cost(b) if boundary == "zero" else
               sum(_cost(modules, c.name, c.input_shape) for c in (*b.convs, *b.shortcut_convs)) for b in blocks_info],
        progress=_shifted(progress, len(layers), total), threads=threads,
    )
    blocks = tuple(cond for cond, _, _ in found)
    extras = tuple(extra for _, extra, _ in found) if boundary == "zero" else ()
    with_block = {name: part for _, _, parts in found for name, part in parts.items()}
    spectra = [s if s is not None else _layer_spectrum(
        None, layer, boundary, _folded(block_layers[layer.name], fold_bn), False, found=with_block[layer.name])
        for layer, s in zip(layers, spectra)]
    return ConditionReport(boundary, fold_bn, tuple(spectra), blocks, blocks_info, subject, extras)


def save_spectra(path: str | Path, report: ConditionReport) -> None:
    """Write every layer's full singular values to HDF5 (atomically: a temporary sibling, then a rename).

    Parameters
    ----------
    path : str or Path
    report : ConditionReport
        From :func:`condition` with ``keep_spectra=True`` and the circular boundary.

    Raises
    ------
    OutputError
        Any I/O failure, naming ``path``; nothing is left behind.

    Notes
    -----
    Under ``torchrun`` only rank 0 writes; the call does nothing on the others.
    """
    from ..distributed import world

    if not world().is_main:
        return
    import h5py

    from ..report.document import atomic_output

    subject = report.subject
    if subject is None:
        raise ValueError("save_spectra needs the report's subject (reports from condition() have it)")
    with atomic_output(path) as temporary:
        with h5py.File(temporary, "w") as h5:
            h5.attrs["format"] = "resdyn-spectra"
            h5.attrs["format_version"] = "1.0"
            h5.attrs["checkpoint_sha256"] = subject.checkpoint.sha256
            h5.attrs["arch"] = subject.loaded.arch
            h5.attrs["boundary"] = report.boundary
            h5.attrs["fold_bn"] = report.fold_bn
            group = h5.create_group("layers")
            for layer in report.layers:
                if layer.singular_values is None:
                    continue
                data = group.create_dataset(layer.name, data=layer.singular_values, compression="gzip",
                                            fletcher32=True)  # every chunk checksummed, as in the stores
                data.attrs["input_shape"] = list(layer.input_shape)
                data.attrs["method"] = layer.method
