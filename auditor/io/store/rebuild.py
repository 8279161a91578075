"""Fresh files for the writer: a new store's ``.partial`` and the copy a resume continues in.

HDF5 is not crash-consistent: a process killed in the middle of a metadata
write leaves a file that can often still be read, but whose free-space and
heap bookkeeping is no longer safe to write into ("bad heap index"). So the
writer never writes into a file that another process had open for writing:

- a new store is laid out in ``<name>.partial.new`` (created exclusively,
  without following a symbolic link) and renamed to ``<name>.partial`` once
  its layout is flushed, so a ``.partial`` always had a complete layout;
- a resume opens the ``.partial`` read-only, copies its verified rows into
  a fresh ``<name>.partial.new`` and renames that over the ``.partial``; the
  killed file is only ever read.

A kill during the copy leaves the old ``.partial`` untouched (the next run
removes the unfinished copy and copies again). The cost is one read and one
write of the rows kept, once per resume, and room for the copy beside the
old file until the rename.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .layout import LIBVER

__all__ = ["NEW_SUFFIX", "new_file", "copy_rows", "sync_file"]

NEW_SUFFIX = ".new"  # <name>.partial.new: a file being laid out or copied, renamed when ready
_COPY_BYTES = 16 * 1024 * 1024  # rows copied at once: whole chunks, about this many bytes


def new_file(path: Path) -> h5py.File:
    """An empty HDF5 file at ``path``, created exclusively (a leftover of a killed run is removed first).

    Mode ``x`` creates with ``O_CREAT | O_EXCL``, which neither follows a
    symbolic link planted at ``path`` nor opens a file that is already there.

    Raises
    ------
    OSError
        The file cannot be created.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # unlink removes a link, never what it points to
    return h5py.File(path, "x", libver=LIBVER, track_order=True)


def _rows_at_once(dataset: Any) -> int:
    per_chunk = int(dataset.chunks[0]) if dataset.chunks else 1
    row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
    return max(1, _COPY_BYTES // max(1, row_bytes * per_chunk)) * per_chunk


def copy_rows(source: h5py.File, target: h5py.File, keys: Sequence[str], rows: int) -> None:
    """Copy rows ``[0, rows)`` of the datasets ``keys`` from ``source`` into ``target`` (same layout).

    Values are copied as stored (bfloat16 stages as their ``uint16`` bits), so
    the copy is bit for bit the rows an uninterrupted run wrote.

    Raises
    ------
    OSError, RuntimeError
        A read or a write failed.
    """
    for key in keys:
        old, new = source[key], target[key]
        new.resize(rows, axis=0)
        if rows == 0:
            continue
        if old.dtype.kind == "O":  # variable-length strings: decoded and encoded again
            new[0:rows] = np.array(old.asstr()[0:rows], dtype=object)
            continue
        step = _rows_at_once(old)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            new[start:stop] = old[start:stop]


def sync_file(file: h5py.File) -> None:
    """Flush ``file`` and fsync its descriptor (a file system that cannot fsync is let through).

    Raises
    ------
    OSError, RuntimeError
        The flush failed.
    """
    file.flush()
    with contextlib.suppress(OSError, ValueError):
        os.fsync(file.id.get_vfd_handle())
