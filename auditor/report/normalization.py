"""Whether a report's images were normalized otherwise than the checkpoint says it was trained.

A checkpoint may carry its own preprocessing (``preprocessing`` in its metadata:
size, mean, std). A ``--preset`` or a data source's ``preset`` takes precedence over
it; when its mean or std differ, every number of the report describes inputs the
network never saw (the bundled example: the penultimate separation goes from 26.31
to 0.63 degrees under ``preset = "none"``). Read from the report's ``checkpoint`` and
``data`` sections, so every command that opens images can say so in one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dropped_normalization"]


def _own(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    value = (checkpoint.get("metadata") or {}).get("preprocessing")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, Mapping) and "mean" in value and "std" in value else None


def _same(a: Any, b: Any) -> bool:
    if not isinstance(a, Sequence) or not isinstance(b, Sequence) or len(a) != len(b):
        return False
    return all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def _numbers(values: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def dropped_normalization(document: Mapping[str, Any]) -> str | None:
    """One line naming the preset (and data source) that replaced the checkpoint's own mean and std, or None."""
    own = _own(document.get("checkpoint") or {})
    data = document.get("data") or {}
    used = data.get("preprocessing") or {}
    if own is None or not used or (_same(own["mean"], used.get("mean")) and _same(own["std"], used.get("std"))):
        return None
    origin = (data.get("preprocessing_source") or {})
    source = origin.get("mean") or origin.get("std") or f"preset {data.get('preset')}"
    if "preset" not in source and "data source" not in source:
        return None  # a --mean/--std the caller typed is a choice, not an accident
    path = (document.get("checkpoint") or {}).get("path", "the checkpoint")
    mean, std = used.get("mean"), used.get("std")
    instead = ("no normalization (pixels in [0, 1])" if mean is None and std is None
               else f"mean {_numbers(mean or [0, 0, 0])}, std {_numbers(std or [1, 1, 1])}")
    return (f"{source} replaces the normalization {path} was trained with (mean {_numbers(own['mean'])}, "
            f"std {_numbers(own['std'])}, from its metadata) by {instead}: every number describes inputs scaled "
            "otherwise than in training; leave the preset out to use the checkpoint's")
