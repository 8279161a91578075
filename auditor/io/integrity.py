"""Per-chunk integrity of HDF5 datasets: Fletcher-32 checksums, read back chunk by chunk.

HDF5's Fletcher-32 filter (``fletcher32=True`` on a chunked dataset) stores a
32-bit checksum beside every chunk and checks it on every read: a damaged
chunk makes the read fail instead of returning wrong numbers. This module
reads a dataset's chunks in order and reports the ones that fail, so that a
resumed store can be cut back to its last verified chunk and
``resdyn verify`` can name every damaged one.

Two limits, handled here:

- Fletcher-32 of all-zero bytes is zero, so a chunk whose stored bytes
  (data and checksum) are all zero passes the check. A chunk that was
  allocated but never reached the disk looks exactly like that; a chunk of
  floating-point values stored as all-zero bytes is reported as
  ``unverified`` (:attr:`ChunkProblem.kind`): a resume computes it again
  (one batch) and ``verify`` reports it. Integer chunks (labels) are left
  to the callers' comparison with the sample list.
- Variable-length strings (``samples/path``) cannot carry filters; callers
  compare them with what they should be.

HDF5 reports a failed check only as "filter returned failure during read";
on a dataset whose only checking filter is Fletcher-32 (compression filters
run after it on read) that is the checksum.
"""

from __future__ import annotations

import errno as errno_codes
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ChunkProblem",
    "attribute_value",
    "has_checksums",
    "fails_checksum",
    "damage_hint",
    "chunk_problems",
    "first_problem",
    "io_cause",
    "detach_file",
]

# Rows read at once while scanning (whole chunks, about this many bytes).
_SCAN_BYTES = 8 * 1024 * 1024
_ERRNO = re.compile(r"errno = (\d+)")


@dataclass(frozen=True)
class ChunkProblem:
    """One chunk of rows that cannot be trusted.

    Attributes
    ----------
    key : str
        The dataset (``stages/layer1``).
    start, stop : int
        Its rows, ``[start, stop)``.
    kind : str
        ``checksum`` (the chunk fails its Fletcher-32 check), ``unreadable``
        (another read failure), ``nonfinite`` (NaN or inf values) or
        ``unverified`` (all-zero bytes, which the checksum cannot tell from a
        chunk that was never written).
    detail : str
        One line for the user.
    """

    key: str
    start: int
    stop: int
    kind: str
    detail: str

    def line(self) -> str:
        """``stages/x rows a:b: detail``."""
        return f"{self.key} rows {self.start}:{self.stop}: {self.detail}"


def attribute_value(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return [attribute_value(v) for v in value.tolist()] if value.dtype.kind in "OS" else value.tolist()
    return value


def has_checksums(dataset: Any) -> bool:
    """Whether ``dataset`` (an h5py dataset) carries Fletcher-32 checksums."""
    return bool(getattr(dataset, "fletcher32", False))


def fails_checksum(dataset: Any, exc: BaseException) -> bool:
    """Whether a failed read of ``dataset`` is a chunk failing its Fletcher-32 check.

    HDF5 says only "filter returned failure during read"; on a dataset whose one
    checking filter is Fletcher-32 that is the checksum (module docstring).
    """
    return has_checksums(dataset) and "filter returned failure" in str(exc)


def damage_hint(path: Any) -> str:
    """What to do about a store that fails its checks."""
    return f"'resdyn verify {path}' lists the damage; extract the activations again"


def _key(dataset: Any) -> str:
    return str(dataset.name).lstrip("/")


def _nonfinite(block: np.ndarray, encoding: str | None) -> int:
    """How many values of ``block`` are NaN or inf (bfloat16 stored as its uint16 bits)."""
    if encoding == "bfloat16" and block.dtype == np.uint16:
        return int(np.count_nonzero((block & 0x7F80) == 0x7F80))  # exponent all ones
    if block.dtype.kind != "f":
        return 0
    return int(block.size - np.count_nonzero(np.isfinite(block)))


def _raw_chunk_is_zero(dataset: Any, start: int) -> bool:
    """Whether the stored bytes of the chunk holding row ``start`` are all zero."""
    offset = (start,) + (0,) * (len(dataset.shape) - 1)
    try:
        _, raw = dataset.id.read_direct_chunk(offset)
    except (OSError, RuntimeError, ValueError, KeyError):
        return False  # an unallocated chunk reads as the fill value: nothing was stored to check
    return not np.frombuffer(raw, dtype=np.uint8).any()


def _read(dataset: Any, start: int, stop: int, buffer: np.ndarray | None) -> np.ndarray:
    if buffer is None:
        return np.asarray(dataset[start:stop])
    view = buffer[: stop - start]
    dataset.read_direct(view, np.s_[start:stop], np.s_[0:stop - start])
    return view


def _check_chunk(dataset: Any, start: int, stop: int, buffer: np.ndarray | None, finite: bool,
                 encoding: str | None, *, zero_check: bool = True) -> ChunkProblem | None:
    key = _key(dataset)
    try:
        block = _read(dataset, start, stop, buffer)
    except (OSError, RuntimeError) as exc:
        if fails_checksum(dataset, exc):
            return ChunkProblem(key, start, stop, "checksum", "the chunk fails its Fletcher-32 checksum")
        return ChunkProblem(key, start, stop, "unreadable", f"cannot be read ({' '.join(str(exc).split())})")
    if finite:
        bad = _nonfinite(block, encoding)
        if bad:
            return ChunkProblem(key, start, stop, "nonfinite", f"{bad} values are NaN or inf")
    # Integer datasets (labels) are left out: a chunk of label 0 is all zero and legitimate; the
    # callers compare labels with the sample list or rows_sha256.
    if (zero_check and has_checksums(dataset) and (block.dtype.kind == "f" or encoding == "bfloat16")
            and not block.any() and _raw_chunk_is_zero(dataset, start)):
        return ChunkProblem(key, start, stop, "unverified",
                            "all bytes zero, checksum included: cannot be told from a chunk never written")
    return None


def chunk_problems(dataset: Any, rows: int | None = None, *, finite: bool = True) -> Iterator[ChunkProblem]:
    """Read ``dataset`` chunk by chunk up to row ``rows`` and yield the chunks that fail.

    Parameters
    ----------
    dataset : h5py.Dataset
        Chunked along its first axis (a contiguous dataset is read as one
        chunk).
    rows : int, optional
        Rows to check (default: all).
    finite : bool
        Also report NaN and inf values (float datasets, and ``uint16``
        datasets whose ``encoding`` attribute is ``bfloat16``).

    Yields
    ------
    ChunkProblem
        In row order. Every chunk is read once; HDF5 checks its checksum
        during the read.
    """
    total = dataset.shape[0] if rows is None else min(int(rows), dataset.shape[0])
    if total <= 0:
        return
    per_chunk = int(dataset.chunks[0]) if dataset.chunks else total
    encoding = dataset.attrs.get("encoding")
    encoding = encoding.decode() if isinstance(encoding, bytes) else encoding
    buffer = None
    if dataset.dtype.kind in "fiu":
        row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
        group = max(1, _SCAN_BYTES // max(1, row_bytes * per_chunk)) * per_chunk
        buffer = np.empty((min(group, total), *dataset.shape[1:]), dtype=dataset.dtype)
    else:
        group = per_chunk
    for first in range(0, total, group):
        last = min(total, first + group)
        starts = range(first, last, per_chunk)
        if group > per_chunk:  # read several chunks at once; look chunk by chunk only where it fails
            if _check_chunk(dataset, first, last, buffer, finite, encoding, zero_check=False) is None:
                if not has_checksums(dataset) or not (dataset.dtype.kind == "f" or encoding == "bfloat16"):
                    continue
                # only chunks whose values are all zero can hide an all-zero (unchecked) chunk
                starts = [s for s in starts if not buffer[s - first:min(last, s + per_chunk) - first].any()]
        for start in starts:
            problem = _check_chunk(dataset, start, min(last, start + per_chunk), buffer, finite, encoding)
            if problem is not None:
                yield problem


def first_problem(dataset: Any, rows: int | None = None, *, finite: bool = True) -> ChunkProblem | None:
    """The first chunk of ``dataset`` (up to row ``rows``) that fails, or None."""
    return next(chunk_problems(dataset, rows, finite=finite), None)


def io_cause(exc: BaseException) -> OSError:
    """An ``OSError`` with errno and strerror for an h5py write failure.

    h5py raises some write failures as ``RuntimeError`` ("Unable to flush raw
    data (file write failed: ... errno = 28 ...)"); the errno is in the text.
    """
    if isinstance(exc, OSError) and exc.errno:
        return exc
    found = _ERRNO.search(str(exc))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(exc, OSError):
        return exc
    return OSError(errno_codes.EIO, " ".join(str(exc).split()) or type(exc).__name__)


def detach_file(file: Any) -> None:
    """Close an h5py file whose writes failed, without writing to it again.

    After a failed write HDF5 still holds dirty metadata; closing the file
    normally writes it again, fails again, and the library later crashes
    (``Slist already enabled?``, a segmentation fault at exit). Pointing the
    file's descriptor at ``/dev/null`` first lets the close succeed while
    the file on disk keeps what it held at the failure, for a resume to
    verify.
    """
    try:
        handle = file.id.get_vfd_handle()
    except Exception:  # noqa: BLE001  not a sec2 file, or already closed
        handle = None
    if isinstance(handle, int) and handle >= 0:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, handle)
        finally:
            os.close(null)
    try:
        file.close()
    except Exception:  # noqa: BLE001  nothing more can be done for this handle
        pass
