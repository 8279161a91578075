"""Stored encodings of activations (float32, float16, bfloat16): checked on the way in, decoded on the way out."""

from __future__ import annotations

import math
from typing import Any

import h5py
import numpy as np

from ...errors import Remedy, StoreError
from ..stage_spec import StageSpec
from .layout import STORED_DTYPE

__all__ = ["encode_rows", "BFloat16Stage"]

_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_BFLOAT16_MAX = (2 - 2**-7) * 2.0**127  # torch.finfo(torch.bfloat16).max; torch is imported only to cast


def encode_rows(spec: StageSpec, rows: np.ndarray, dtype: str) -> np.ndarray:
    """Check that ``rows`` are finite and fit ``dtype``; return what to store.

    Raises
    ------
    StoreError
        Non-finite activations, or a value out of the dtype's range.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.size == 0:
        return rows.astype(STORED_DTYPE[dtype])
    low, high = float(rows.min()), float(rows.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int(np.count_nonzero(~np.isfinite(rows)))
        raise StoreError(
            f"stage {spec.name!r} ({spec.location}): {bad} activations are NaN or inf",
            hint="the network overflows on these inputs; check the checkpoint and the "
            "preprocessing (preset, mean, std)",
        )
    largest = max(-low, high)
    if dtype == "float32":
        return rows
    import torch  # float16 / bfloat16 casts only: a float32 writer and every reader need no torch

    tensor = torch.from_numpy(rows)
    if dtype == "float16":
        cast = tensor.to(torch.float16)
        if largest >= _FLOAT16_MAX and torch.isinf(cast).any():
            raise StoreError(
                f"stage {spec.name!r} ({spec.location}): activations reach "
                f"|x| = {largest:.4g}, beyond float16's range ({_FLOAT16_MAX:.0f})",
                hint="use {remedy} (or bfloat16)", remedy=Remedy("dtype", "float32"),
            )
        return cast.numpy()
    cast = tensor.to(torch.bfloat16)
    if largest >= _BFLOAT16_MAX and torch.isinf(cast).any():
        raise StoreError(
            f"stage {spec.name!r} ({spec.location}): activations reach |x| = {largest:.4g}, "
            "beyond bfloat16's range",
            hint="use {remedy}", remedy=Remedy("dtype", "float32"),
        )
    return cast.view(torch.int16).numpy().view(np.uint16)


class BFloat16Stage:
    """A bfloat16 stage: slices of the uint16 dataset, decoded to float32 on read."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self._dataset = dataset
        self.attrs = dataset.attrs
        self.shape = dataset.shape
        self.chunks = dataset.chunks
        self.dtype = np.dtype(np.float32)
        self.name = dataset.name
        self.file = dataset.file
        self.fletcher32 = dataset.fletcher32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        raw = np.asarray(self._dataset[key], dtype=np.uint16)
        return (raw.astype(np.uint32) << 16).view(np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[()]
        return data if dtype is None else data.astype(dtype)
