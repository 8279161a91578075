"""The size of an activation store, estimated before the first image, and the room for it on disk.

A ResNet-50 at 224 px stores 6.8 MB of float32 activations per image (its five
stages and the penultimate features): 13.7 GB for 2,000 images. An extraction
that fills the disk fails hours in; :func:`check_store_space` refuses it before
the first image, in one line, when the folder has less room than the estimate.

The estimate (:func:`store_bytes`) counts what HDF5 allocates: whole chunks of
every stage (the last one padded, as HDF5 stores it), a 4-byte Fletcher-32
checksum per chunk, the chunk index, the labels, the paths and a fixed part
for the file's metadata. With compression it is the uncompressed size (a bound
from above: the compressed store is smaller by what the filter wins).
"""

from __future__ import annotations

import errno
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError, Remedy
from ..io.store import StoreHeader
from ..io.store.layout import STORED_DTYPE, samples_per_chunk
from .bounds import size_text

__all__ = ["store_bytes", "free_bytes", "check_store_space", "say_estimate"]

_FIXED_BYTES = 24 * 1024  # superblock, groups, attributes, the classes (measured: 20-23 KiB)
_CHUNK_BYTES = 4 + 64  # a chunk's checksum and its share of the chunk index
_SAMPLE_BYTES = 8 + 32  # a label, and a path's global-heap record beyond its characters


def store_bytes(header: StoreHeader) -> int:
    """Bytes of the finished store of ``header`` (every selected sample written), estimated.

    Parameters
    ----------
    header : StoreHeader

    Returns
    -------
    int
        Within a few percent of the written file for an uncompressed store (tested
        within 10 %); an upper bound with compression.
    """
    n = len(header.samples)
    itemsize = np.dtype(STORED_DTYPE[header.dtype]).itemsize
    total = _FIXED_BYTES + n * _SAMPLE_BYTES + sum(len(rel.encode()) for rel, _ in header.samples)
    for spec in header.stages:
        shape = tuple(int(s) for s in spec.shape)
        per = samples_per_chunk(shape, STORED_DTYPE[header.dtype])
        chunks = math.ceil(n / per)
        total += chunks * (per * math.prod(shape) * itemsize + _CHUNK_BYTES)
    return total


def free_bytes(folder: Path) -> int:
    """Bytes free for this user in ``folder`` (``shutil.disk_usage``)."""
    return shutil.disk_usage(folder).free


def check_store_space(path: str | Path, header: StoreHeader, *, hint: str | None = None,
                      remedy: Remedy | None = None) -> int:
    """Refuse to start a store at ``path`` when its folder has less room than the store needs.

    A resumed store is copied before it goes on (``io/store/rebuild.py``), so the
    whole estimate is needed whether or not a partial file exists.

    Parameters
    ----------
    path : str or Path
        The store to write; its folder is checked.
    header : StoreHeader
    hint, remedy : optional
        What to do, for the error (default: free space or write elsewhere).

    Returns
    -------
    int
        The estimate, in bytes.

    Raises
    ------
    OutputError
        The folder has less free space than the estimate (errno ``ENOSPC``).
    """
    need = store_bytes(header)
    folder = Path(path).parent
    try:
        free = free_bytes(folder)
    except OSError:
        return need  # no answer (a missing folder is refused by the writer, in its words)
    if free < need:
        cause = OSError(errno.ENOSPC, f"no room for the activation store: about {size_text(need)} for "
                                      f"{len(header.samples)} images, {size_text(free)} free in {folder}")
        error = OutputError(path, cause, hint=hint or "free some space, or write the store to a folder with room")
        error.remedy = remedy
        raise error
    return need


def say_estimate(progress: Callable[..., Any] | None, estimate: int) -> None:
    """Tell a progress callback with a ``note(text)`` method the store's estimated size ("store about 13.7 GB")."""
    note = getattr(progress, "note", None)
    if callable(note):
        note(f"store about {size_text(estimate)}")
