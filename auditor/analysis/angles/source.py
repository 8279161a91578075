"""The activations to compare: any array-like of rows, checked before a row is read, read in sample order."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ...errors import DataError, InputError, StoreError, UsageError
from ...io.integrity import damage_hint, fails_checksum

__all__ = ["RowSource", "rows_of", "check_dtype", "check_names", "check_labels", "check_options"]

_READ_BYTES = 8 << 20  # bytes per read from a lazy source (8 MiB)
_HOLD = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))  # dtypes kept as read
_FLETCHER32 = 3  # H5Z_FILTER_FLETCHER32: the only filter a chunk may have to be read again raw
_CHECKSUM = 4  # bytes the Fletcher-32 filter appends to a chunk
_ROWS_PER_THREAD = 4  # rows read again raw per thread, at least


class RowSource:
    """Rows ``[a, b)`` of a 2-D or higher array-like, flattened, into float64 buffers or buffers of :attr:`hold`.

    Rows of an HDF5 dataset are read through the library (every filter applied, each chunk's
    Fletcher-32 checksum verified) the first time; rows read again (a wide stage's rows stream
    once per panel, and the exact medians read some once more) come straight from the file
    as raw chunks, about five times faster, when a chunk is one row and its only filter is the
    checksum (the bytes are those the first read verified; :meth:`read_into`).

    Attributes
    ----------
    checked : int
        Rows ``[0, checked)`` have been read through the library at least once.
    """

    def __init__(self, data: Any, shape: tuple[int, ...], dtype: np.dtype | None) -> None:
        self.data = data
        self.shape = shape
        self.n = int(shape[0])
        self.d = int(math.prod(shape[1:]))
        self.dtype = dtype
        chunk = getattr(data, "chunks", None)
        per_chunk = int(chunk[0]) if chunk else 1
        self.per_chunk = per_chunk if chunk else None
        itemsize = dtype.itemsize if dtype is not None else 8
        rows = max(1, _READ_BYTES // max(1, self.d * itemsize))
        self.read_rows = max(per_chunk, rows // per_chunk * per_chunk)
        self._stage: np.ndarray | None = None
        self.checked = 0
        self._raw = _raw_chunk_bytes(data, shape, dtype)  # bytes of a raw chunk when re-reads may take them
        self._spare: np.ndarray | None = None  # a raw chunk that does not fit where its row goes
        self._offsets: np.ndarray | None = None  # every chunk's place in the file (empty: not plain)

    @property
    def hold(self) -> np.dtype:
        """The dtype that holds rows as read without losing a bit: float16, float32 or float64."""
        if self.dtype is not None and self.dtype in _HOLD:
            return self.dtype
        return np.dtype(np.float64)

    def read_into(self, a: int, b: int, out: np.ndarray) -> None:
        """Fill ``out`` (float64 or :attr:`hold`, shape ``(b - a, d)``) with rows ``a:b``."""
        if isinstance(self.data, np.ndarray):
            out[...] = self.data[a:b].reshape(b - a, self.d)
            return
        if out.dtype == self.dtype and hasattr(self.data, "read_direct"):
            if b <= self.checked and self._raw and out.flags.c_contiguous:
                self._guarded(a, b, lambda: self._read_raw(a, b, out))
                return
            # Rows kept as read: straight from the file into the buffer.
            self._guarded(a, b, lambda: self.data.read_direct(out.reshape(b - a, *self.shape[1:]), np.s_[a:b]))
            if a <= self.checked:
                self.checked = max(self.checked, b)
            return
        # Lazy sources: read in sample order, a few MiB at a time.
        for s in range(a, b, self.read_rows):
            e = min(b, s + self.read_rows)
            out[s - a:e - a] = self._read(s, e).reshape(e - s, self.d)

    def _read_raw(self, a: int, b: int, out: np.ndarray) -> None:
        """Rows ``[a, b)``, read before through the library, as raw chunks of one row each into ``out``.

        By :meth:`_pread` where it can; else through ``read_direct_chunk``: a chunk is its row's
        bytes and, with the checksum, 4 more; read in increasing order, each
        spills into the next row's place, which the next read overwrites; the last row's chunk goes
        through a spare buffer. A chunk of another size (some filter skipped for it) or that cannot
        be read raw (never written) is read again through the library, and so are all later ones.
        """
        if self._pread(a, b, out):
            return
        flat = out.reshape(-1).view(np.uint8)
        row = self.d * out.itemsize
        dsid = self.data.id
        zeros = (0,) * (len(self.shape) - 1)
        for r in range(a, b):
            at = (r - a) * row
            dest = flat[at:]
            if dest.size < self._raw:
                if self._spare is None:
                    self._spare = np.empty(self._raw, np.uint8)
                dest = self._spare
            try:
                mask, got = dsid.read_direct_chunk((r, *zeros), out=dest)
            except (OSError, RuntimeError, KeyError, ValueError):  # e.g. a chunk never written (HDF5 fills it)
                mask, got = -1, b""
            if mask or len(got) != self._raw:
                self._raw = 0
                self.data.read_direct(out[r - a:].reshape(b - r, *self.shape[1:]), np.s_[r:b])
                return
            if dest is self._spare:
                flat[at:at + row] = dest[:row]

    def _pread(self, a: int, b: int, out: np.ndarray) -> bool:
        """Rows ``[a, b)`` read raw by ``os.preadv`` on HDF5's own file descriptor, on torch's thread count of
        threads (the GIL is released: about 11 GB/s from the page cache on two, against 5 through
        ``read_direct_chunk``); False, reading nothing, where the file is not a plain one (HDF5's
        ``sec2`` driver) or some chunk is not its row and checksum at a known place."""
        if self._offsets is None:
            self._offsets = self._chunk_offsets()
        at = self._offsets
        if at.size == 0:
            return False
        fd = self.data.file.id.get_vfd_handle()
        flat = out.reshape(-1).view(np.uint8)
        row = self.d * out.itemsize

        def part(lo: int, hi: int) -> None:
            for r in range(lo, hi):
                if os.preadv(fd, [flat[(r - a) * row:(r - a + 1) * row]], int(at[r])) != row:
                    raise OSError(f"row {r}: a short read (the file is shorter than its chunk index says)")

        parts = max(1, min(torch.get_num_threads(), (b - a) // _ROWS_PER_THREAD))
        if parts == 1:
            part(a, b)
            return True
        cuts = np.linspace(a, b, parts + 1).astype(np.int64)
        with ThreadPoolExecutor(parts) as pool:
            for done in [pool.submit(part, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]:
                done.result()
        return True

    def _chunk_offsets(self) -> np.ndarray:
        """Every row's chunk's byte offset in the file; empty when any is not plain (see :meth:`_pread`)."""
        none = np.empty(0, dtype=np.int64)
        if getattr(self.data.file, "driver", None) != "sec2" or not hasattr(os, "preadv"):
            return none
        dsid = self.data.id
        zeros = (0,) * (len(self.shape) - 1)
        at = np.empty(self.n, dtype=np.int64)
        try:
            for r in range(self.n):
                info = dsid.get_chunk_info_by_coord((r, *zeros))
                if info.filter_mask or info.size != self._raw or info.byte_offset is None:
                    return none
                at[r] = info.byte_offset
        except (OSError, RuntimeError, KeyError, ValueError, AttributeError):  # never written; an old h5py
            return none
        return at

    def _read(self, s: int, e: int) -> np.ndarray:
        def read() -> Any:
            if hasattr(self.data, "read_direct") and self.dtype is not None:
                if self._stage is None:
                    self._stage = np.empty((self.read_rows, *self.shape[1:]), self.dtype)
                self.data.read_direct(self._stage, np.s_[s:e], np.s_[0:e - s])
                return self._stage[:e - s]
            return self.data[s:e]

        block = self._guarded(s, e, read)
        if isinstance(block, torch.Tensor):
            block = block.detach().cpu().numpy()
        block = np.asarray(block)
        if block.shape != (e - s, *self.shape[1:]):
            raise InputError(
                f"features[{s}:{e}] has shape {block.shape}, expected {(e - s, *self.shape[1:])}",
                hint="features must support row slicing like a numpy array",
            )
        check_dtype(block.dtype, self.shape)
        return block

    def _guarded(self, s: int, e: int, read: Callable[[], Any]) -> Any:
        """``read()`` of rows ``s:e``; a failure is a :class:`StoreError` naming the file, the key and the rows."""
        try:
            return read()
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            where = getattr(getattr(self.data, "file", None), "filename", None)
            name = getattr(self.data, "name", None) or type(self.data).__name__
            key = str(name).lstrip("/")
            place = f"{where}: {key}" if where else key
            if fails_checksum(self.data, exc):
                c0, c1 = self._damaged_chunk(s, e)
                raise StoreError(
                    f"{place} rows {c0}:{c1}: the store is damaged, the chunk fails its Fletcher-32 checksum",
                    hint=damage_hint(where or "STORE"),
                ) from exc
            raise StoreError(
                f"{place} rows {s}:{e}: cannot be read: {exc}",
                hint="the store may be truncated or being written; re-run the extraction",
            ) from exc

    def _damaged_chunk(self, s: int, e: int) -> tuple[int, int]:
        """The rows of the first chunk in ``[s, e)`` that fails its read (``s, e`` when none alone does).

        Chunk boundaries, as ``resdyn verify`` names them, so that both name the same rows.
        """
        per = self.per_chunk
        if not per:
            return s, e
        for c0 in range(s - s % per, e, per):
            c1 = min(c0 + per, self.n)
            try:
                self.data[c0:c1]
            except (OSError, RuntimeError, KeyError, ValueError):
                return c0, c1
        return s, e


def _raw_chunk_bytes(data: Any, shape: tuple[int, ...], dtype: np.dtype | None) -> int:
    """The bytes of one raw chunk of ``data`` when its rows can be read again raw, else 0.

    An h5py dataset of native floats chunked by one row, whose only filter (if any) is
    Fletcher-32: the raw chunk holds the row's bytes as stored, then the checksum. A
    dataset without filters reads as fast through the library: 0.
    """
    h5py = sys.modules.get("h5py")
    if h5py is None or not isinstance(data, h5py.Dataset) or dtype is None or not dtype.isnative:
        return 0
    if dtype not in _HOLD or data.chunks is None or tuple(data.chunks) != (1, *shape[1:]):
        return 0
    try:
        plist = data.id.get_create_plist()
        filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    except (AttributeError, RuntimeError, ValueError):  # pragma: no cover - an h5py without these calls
        return 0
    if filters != [_FLETCHER32]:
        return 0
    return int(math.prod(shape[1:])) * dtype.itemsize + _CHECKSUM


def rows_of(features: Any) -> RowSource:
    """Wrap ``features`` without reading it; check its shape and dtype."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    if not hasattr(features, "shape") or not hasattr(features, "__getitem__"):
        features = np.asarray(features)
    shape = tuple(int(s) for s in features.shape)
    if len(shape) < 2:
        raise InputError(
            f"features must have shape (n_samples, n_features) or (n_samples, C, H, W), "
            f"got shape {shape}",
            hint="pass one row per sample",
        )
    if shape[0] == 0 or math.prod(shape[1:]) == 0:
        raise DataError(f"features of shape {shape} hold no values", hint="select some samples")
    dtype = getattr(features, "dtype", None)
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        dtype = None
    if dtype is not None:
        check_dtype(dtype, shape)
    return RowSource(features, shape, dtype)


def check_dtype(dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if dtype.kind not in "fiu":
        raise InputError(
            f"features of shape {shape} have dtype {dtype}; expected real numbers",
            hint="pass float or integer activations",
        )


def check_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str):
        raise InputError("class_names must be a sequence of names, not one string")
    names = [str(n) for n in class_names]
    if not names:
        raise InputError("class_names is empty", hint="pass one name per label")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"class_names repeat {dup}", hint="class names must be unique")
    bad = [n for n in names if "|" in n]
    if bad:
        raise InputError(
            f"class names {bad} contain '|', which separates class pairs in the output",
            hint="rename those classes",
        )
    return names


def check_labels(labels: Any, n_classes: int, source: RowSource) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels
    lab = np.asarray(lab)
    if lab.ndim != 1 or lab.shape[0] != source.n:
        raise InputError(
            f"labels of shape {lab.shape} do not match features of shape {source.shape}",
            hint=f"pass one label per sample: shape ({source.n},)",
        )
    if lab.dtype.kind not in "iu":
        if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            pass  # integral floats (e.g. from a CSV) are accepted
        else:
            raise InputError(
                f"labels of shape {lab.shape} have dtype {lab.dtype}; expected integers",
                hint="labels index class_names",
            )
    lab = lab.astype(np.int64)
    out = (lab < 0) | (lab >= n_classes)
    if out.any():
        raise InputError(
            f"{int(out.sum())} of {lab.size} labels are outside [0, {n_classes}) "
            f"(min {int(lab.min())}, max {int(lab.max())}) for {n_classes} class names",
            hint="labels index class_names",
        )
    return lab


def check_options(
    *, max_pairs: int | None, block_rows: int, subspace_k: int | None, seed: int
) -> None:
    for name, value, allow_none in (
        ("max_pairs", max_pairs, True),
        ("block_rows", block_rows, False),
        ("subspace_k", subspace_k, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
