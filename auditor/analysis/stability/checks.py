"""The arguments of :func:`auditor.analysis.stability.measure_stability`, checked before any work."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ...errors import InputError, UsageError
from ...models.anatomy import Anatomy

__all__ = ["check_images", "check_options", "check_power", "check_bounds", "check_device"]


def check_images(images: Any, anatomy: Anatomy) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"images must be a tensor of shape (N, C, H, W), got {type(images).__name__}"
        )
    expected = tuple(anatomy.input_shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        raise InputError(
            f"images must have shape (N, {', '.join(map(str, expected))}) with N >= 1, "
            f"got {tuple(images.shape)}",
            hint="pass preprocessed images at the input size the anatomy was built for",
        )
    if not images.is_floating_point():
        raise InputError(
            f"images must be preprocessed floating-point tensors, got dtype {images.dtype}",
            hint="scale pixels to [0, 1] and normalize as in training",
        )
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise InputError(f"images contain {bad} non-finite values (NaN or inf)")
    return images


def check_options(eps: Any, directions: Any, seed: Any, power_iterations: Any, dtype: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < float(eps) < 1.0:
        raise InputError(f"eps must be a number in (0, 1), got {eps!r}", hint="the default is 1e-3")
    if (
        isinstance(directions, bool)
        or not isinstance(directions, numbers.Integral)
        or directions < 1
    ):
        raise InputError(f"directions must be an integer >= 1, got {directions!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**62:
        raise InputError(f"seed must be a non-negative integer below 2**62, got {seed!r}")
    if (
        isinstance(power_iterations, bool)
        or not isinstance(power_iterations, numbers.Integral)
        or power_iterations < 0
    ):
        raise InputError(f"power_iterations must be an integer >= 0, got {power_iterations!r}")
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def check_power(tolerance: Any, batch_size: Any) -> None:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, numbers.Real)
        or not 0.0 <= float(tolerance) < 1.0
    ):
        raise InputError(
            f"power_tolerance must be a number in [0, 1), got {tolerance!r}", hint="the default is 1e-2"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise InputError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")


def check_bounds(
    bounds: Mapping[str, tuple[float | None, float | None]] | None, anatomy: Anatomy
) -> dict[str, tuple[float | None, float | None]]:
    if bounds is None:
        return {}
    names = [b.name for b in anatomy.blocks]
    checked: dict[str, tuple[float | None, float | None]] = {}
    for name, pair in bounds.items():
        if name not in names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise InputError(f"bounds name an unknown block {name!r} (blocks: {shown})")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"bounds[{name!r}] must be (kappa_paper, kappa_linear), got {pair!r}")
        values: list[float | None] = []
        for kappa in pair:
            if kappa is None:
                values.append(None)
                continue
            kappa = float(kappa)
            if math.isnan(kappa) or kappa < 1.0 - 1e-9:
                raise InputError(f"bounds[{name!r}] holds {kappa!r}; a condition number is >= 1")
            values.append(max(kappa, 1.0))
        checked[name] = (values[0], values[1])
    return checked


def check_device(device: Any) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}", hint="pass 'cpu' or 'cuda'") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {device!r} requested but CUDA is not available", hint="pass 'cpu'"
        )
    return target
