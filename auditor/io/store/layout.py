"""The store's format: its name and version, the provenance that identifies it, and the layout of a new file.

See the package docstring (:mod:`auditor.io.store`) for the whole layout.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..._version import __version__
from ..stage_spec import StageSpec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DTYPES",
    "COMPRESSIONS",
    "PROVENANCE_KEYS",
    "STORED_DTYPE",
    "LIBVER",
    "StoreHeader",
    "rows_digest",
    "samples_per_chunk",
    "dataset_keys",
    "create_layout",
]

FORMAT = "resdyn-activations"
FORMAT_VERSION = "1.1"  # 1.1: Fletcher-32 checksums on every chunk, rows_sha256
DTYPES = ("float32", "float16", "bfloat16")
COMPRESSIONS = ("none", "lzf", "gzip")

# How each encoding is stored: HDF5 has no bfloat16, those stages hold the raw bits as uint16.
STORED_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
# Attributes that must match for a partial file to be resumed.
PROVENANCE_KEYS = (
    "format_version", "tool_version", "checkpoint_sha256", "arch", "data_root", "preset",
    "preprocessing", "seed", "per_class", "shard", "dtype", "compression", "samples_sha256",
    "num_selected", "stages",
)
# Whole samples per chunk: as many as fit in this many bytes (at least one,
# at most _MAX_SAMPLES_PER_CHUNK). HDF5 pays per chunk on every write and
# flush; a 64 KiB CIFAR stage stored one sample per chunk spends more time
# on chunk bookkeeping than on the bytes, a ResNet-50 stage is still one sample.
_CHUNK_BYTES = 256 * 1024
_MAX_SAMPLES_PER_CHUNK = 64
_CHECKSUMS = True  # Fletcher-32 on every chunk (False only for bench/bench_checksums.py's comparison)
LIBVER = ("v108", "v110")  # 1.8 format: attributes above 64 KiB (a long skipped list) fit


def samples_per_chunk(shape: tuple[int, ...], dtype: Any) -> int:
    """Samples per chunk of a stage dataset: whole samples, about ``_CHUNK_BYTES``."""
    sample_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(min(_MAX_SAMPLES_PER_CHUNK, max(1, _CHUNK_BYTES // max(1, sample_bytes))))


@dataclass(frozen=True)
class StoreHeader:
    """What a store is made of: provenance, samples and stages.

    Attributes
    ----------
    checkpoint_sha256, arch : str
        The checkpoint's digest and architecture name.
    data_root : str
        Absolute path of the image folder.
    preset : str
        Preset name the preprocessing came from.
    preprocessing : str
        JSON (:meth:`Preprocessing.to_json`).
    seed : int
    per_class : int or None
    shard : (int, int)
    classes : tuple of str
    samples : tuple of (str, int)
        Every selected sample (relative path, label), in processing order.
    stages : tuple of StageSpec
    dtype : str
        ``float32``, ``float16`` or ``bfloat16``.
    compression : str
        ``none``, ``lzf`` or ``gzip``.
    """

    checkpoint_sha256: str
    arch: str
    data_root: str
    preset: str
    preprocessing: str
    seed: int
    per_class: int | None
    shard: tuple[int, int]
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]
    stages: tuple[StageSpec, ...]
    dtype: str = "float32"
    compression: str = "none"

    def samples_sha256(self) -> str:
        """sha256 of the sample list (paths and labels)."""
        digest = hashlib.sha256()
        for rel, label in self.samples:
            digest.update(f"{label}\t{rel}\n".encode())
        return digest.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """The root attributes that identify the store's content."""
        return {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "checkpoint_sha256": self.checkpoint_sha256,
            "arch": self.arch,
            "data_root": self.data_root,
            "preset": self.preset,
            "preprocessing": self.preprocessing,
            "seed": int(self.seed),
            "per_class": -1 if self.per_class is None else int(self.per_class),
            "shard": json.dumps(list(self.shard)),
            "dtype": self.dtype,
            "compression": self.compression,
            "samples_sha256": self.samples_sha256(),
            "num_selected": len(self.samples),
            "stages": json.dumps(
                [[s.name, s.location, list(s.shape)] for s in self.stages]
            ),
        }


def rows_digest(labels: Sequence[int], paths: Sequence[str]) -> str:
    """sha256 of stored rows (label, path), in order: the ``rows_sha256`` attribute."""
    digest = hashlib.sha256()
    for label, rel in zip(labels, paths):
        digest.update(f"{int(label)}\t{rel}\n".encode())
    return digest.hexdigest()


def dataset_keys(header: StoreHeader) -> list[str]:
    """The datasets that grow by one row per stored sample: paths, labels, then every stage."""
    return ["samples/path", "samples/label", *(f"stages/{s.name}" for s in header.stages)]


def create_layout(f: h5py.File, header: StoreHeader) -> None:
    """Write the root attributes and the empty datasets of a new store for ``header`` into ``f``.

    Raises
    ------
    OSError, RuntimeError
        A write failed (the caller turns it into an :class:`~auditor.errors.OutputError`).
    """
    h = header
    attrs = f.attrs
    attrs["format"] = FORMAT
    for key, value in h.provenance().items():
        attrs[key] = value
    attrs["written"] = 0
    attrs["skipped"] = "[]"
    attrs["complete"] = False
    attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = h5py.string_dtype("utf-8")
    f.create_dataset("classes", data=np.array(h.classes, dtype=object), dtype=text)
    samples = f.create_group("samples")
    chunk = (max(1, min(4096, len(h.samples))),)
    samples.create_dataset("path", shape=(0,), maxshape=(None,), chunks=chunk, dtype=text)
    samples.create_dataset("label", shape=(0,), maxshape=(None,), chunks=chunk, dtype=np.int64,
                           fletcher32=_CHECKSUMS)
    stages = f.create_group("stages", track_order=True)
    kwargs: dict[str, Any] = {"fletcher32": _CHECKSUMS}
    if h.compression != "none":
        kwargs["compression"] = h.compression
    for spec in h.stages:
        shape = tuple(int(s) for s in spec.shape)
        ds = stages.create_dataset(
            spec.name, shape=(0, *shape), maxshape=(None, *shape),
            chunks=(samples_per_chunk(shape, STORED_DTYPE[h.dtype]), *shape),
            dtype=STORED_DTYPE[h.dtype], **kwargs,
        )
        ds.attrs["module_path"] = spec.location
        ds.attrs["shape"] = np.array(shape, dtype=np.int64)
        ds.attrs["encoding"] = h.dtype
    f.flush()
