"""The HDF5 activation store (DESIGN.md, "HDF5 activation store (contract)").

Layout of a store::

    /                    attrs: format, format_version, tool_version, checkpoint_sha256,
                                arch, data_root, preset, preprocessing (JSON), seed,
                                per_class (-1: every image), shard (JSON [rank, world]),
                                dtype, compression, samples_sha256, num_selected,
                                stages (JSON list of names, in order), written,
                                skipped (JSON list of {path, reason}), complete, created
    /classes             utf-8 strings, by label
    /samples/path        utf-8 strings (N,), relative to data_root
    /samples/label       int64 (N,)
    /stages/<name>       (N, *shape), chunks of whole samples (k, *shape), k * sample
                         <= 256 KiB or k = 1, k <= 64; attrs module_path
                         ("module:input" or "module:output"), shape, encoding

Since format 1.1 every chunk of ``samples/label`` and ``stages/*`` carries a
Fletcher-32 checksum (HDF5's filter, checked on every read), and a finished
store has ``rows_sha256``: the sha256 of its stored rows' labels and paths
(variable-length strings cannot carry a filter). Stores of format 1.0 have
neither; they are read with a warning that damage cannot be detected.

``encoding`` is ``float32``, ``float16`` or ``bfloat16``. HDF5 has no
bfloat16 type: those stages hold the raw bits as ``uint16`` and the reader
decodes them to float32 (exactly: a bfloat16 is the top half of a float32).

Writing (:class:`StoreWriter`) goes to ``<name>.partial`` beside the final
path, under an exclusive lock on ``<name>.lock``. After every batch the rows,
the ``written`` counter and the ``skipped`` list are flushed together, so a
killed run leaves a prefix that the next run with the same provenance resumes
from. The rows are flushed before the counter that covers them, so the
counter never runs ahead of the data. A resume first reads back every chunk
below the counter (checksums, finite values, paths and labels against the
sample list) and cuts the file back to the last verified chunk when one
fails (:mod:`auditor.io.integrity`). Only a finished store is renamed
(atomically) to the final name. Everything but the ``created`` attribute is
identical whether or not a run was interrupted.

A write that fails (no space, I/O error) raises :class:`OutputError` naming
the file and the cause; the unfinished file is kept when a resume can use it
and removed otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._version import __version__
from ..errors import OutputError, Remedy, StoreError
from .integrity import (
    ChunkProblem,
    attribute_value,
    damage_hint,
    detach_file,
    fails_checksum,
    first_problem,
    has_checksums,
    io_cause,
)
from .stage_spec import StageSpec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DTYPES",
    "COMPRESSIONS",
    "PROVENANCE_KEYS",
    "StoreHeader",
    "StoreWriter",
    "StoreBusyError",
    "StoreExistsError",
    "ActivationStore",
    "UnverifiedStoreWarning",
    "open_store",
    "rows_digest",
    "wait_for_writer",
]

FORMAT = "resdyn-activations"
FORMAT_VERSION = "1.1"  # 1.1: Fletcher-32 checksums on every chunk, rows_sha256
DTYPES = ("float32", "float16", "bfloat16")
COMPRESSIONS = ("none", "lzf", "gzip")

_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_BFLOAT16_MAX = float(torch.finfo(torch.bfloat16).max)
_STORED_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
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
# The writer fsyncs after every this many bytes (the final fsync then has
# little left to wait for).
_SYNC_BYTES = 128 * 1024 * 1024
_CHECKSUMS = True  # Fletcher-32 on every chunk (False only for bench/bench_checksums.py's comparison)
_LIBVER = ("v108", "v110")  # 1.8 format: attributes above 64 KiB (a long skipped list) fit


def _samples_per_chunk(shape: tuple[int, ...], dtype: Any) -> int:
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


# --------------------------------------------------------------------------- helpers


def _same(a: Any, b: Any) -> bool:
    return attribute_value(a) == attribute_value(b)


def _fsync(path: Path) -> None:
    """fsync ``path``; a file system that cannot (EINVAL) is let through, a failure is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def rows_digest(labels: Sequence[int], paths: Sequence[str]) -> str:
    """sha256 of stored rows (label, path), in order: the ``rows_sha256`` attribute."""
    digest = hashlib.sha256()
    for label, rel in zip(labels, paths):
        digest.update(f"{int(label)}\t{rel}\n".encode())
    return digest.hexdigest()


# Fault injection for the test suite only (tests/test_faults.py), read in this one place:
# RESDYN_TEST_FAULT="kill:ROWS:PHASE" SIGKILLs the process the first time a batch reaches ROWS stored
# rows, at PHASE of StoreWriter.append; "delay:SECONDS" sleeps after every batch (a slow writer).
_FAULT_ENV = "RESDYN_TEST_FAULT"
FAULT_PHASES = ("written", "data-flushed", "counted", "flushed")


def _test_fault() -> tuple[str, float, str] | None:
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "delay":
        return "delay", float(rest), "flushed"
    rows, _, phase = rest.partition(":")
    if kind != "kill" or phase not in FAULT_PHASES:
        raise ValueError(f"{_FAULT_ENV}={spec!r}: expected kill:ROWS:PHASE (PHASE one of "
                         f"{', '.join(FAULT_PHASES)}) or delay:SECONDS")
    return "kill", int(rows), phase


class StoreBusyError(StoreError):
    """Another process holds the store's lock (it is writing the same file)."""


class StoreExistsError(StoreError):
    """The finished store exists and ``overwrite`` was not asked for."""


class _Lock:
    """An exclusive ``flock`` on ``<name>.lock``, removed on release.

    Non-blocking by default (a second writer is refused); ``wait=True``
    blocks until the holder ends.
    """

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise OutputError(self.path, exc, hint="choose a writable folder for the store") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreBusyError(
                        f"another resdyn process is writing {self.target}",
                        hint="wait for it to finish (the lock is released as soon as that process ends, "
                        "even if it is killed)",
                    ) from None
                raise StoreError(f"{self.path}: cannot lock ({exc.strerror})") from None
            # The holder before us may have removed the file after we opened it.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)
        raise StoreError(f"{self.path}: cannot take the lock (it keeps being replaced)")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def wait_for_writer(path: str | Path) -> None:
    """Return once no process is writing the store ``path`` (blocks while one is).

    For stores shared between processes, such as an ``--cache`` folder used by
    two audits at once: the second waits for the first, then reuses its store.
    """
    path = Path(path)
    lock = _Lock(path.with_name(path.name + ".lock"), path)
    if not lock.path.exists():
        return
    try:
        lock.acquire(wait=True)
    except OutputError:  # a folder we cannot write: nobody can be writing there
        return
    lock.release()


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes a store batch by batch, resumably (see the module docstring).

    Use as a context manager; call :meth:`finish` when every sample has been
    consumed. Leaving the block without :meth:`finish` (an error, Ctrl-C)
    keeps the ``.partial`` file for the next run to resume.

    Parameters
    ----------
    path : str or Path
        Final file name (``.h5``).
    header : StoreHeader
    overwrite : bool
        Replace an existing final file (at the end, atomically) and discard
        any partial file instead of resuming it.

    Attributes
    ----------
    written : int
        Rows stored.
    consumed : int
        Samples handled (stored or skipped); the next batch starts here.
    skipped : list of dict
        ``{"path", "reason"}`` of the unreadable images met so far.
    resumed_from : int
        Samples already consumed when the writer opened (0: fresh start).
    repaired : str or None
        What a resume found damaged and cut back (None: nothing). Also
        issued as a warning.

    Raises
    ------
    StoreError
        The final file exists (without ``overwrite``); another process holds
        the lock (:class:`StoreBusyError`); a partial file with other
        provenance or that cannot be read.
    OutputError
        The folder or the file cannot be written (read-only, no space, ...).
    """

    def __init__(self, path: str | Path, header: StoreHeader, *, overwrite: bool = False) -> None:
        if header.dtype not in DTYPES:
            raise StoreError(f"unknown dtype {header.dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
        if header.compression not in COMPRESSIONS:
            raise StoreError(
                f"unknown compression {header.compression!r}",
                hint=f"choose one of {', '.join(COMPRESSIONS)}",
            )
        self.path = Path(path)
        self.header = header
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.written = 0
        self.skipped: list[dict[str, str]] = []
        self.resumed_from = 0
        self.repaired: str | None = None
        self._fresh = False
        self._doomed = False
        self._flushed = 0  # samples handled at the last complete flush
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] | None = None
        self._unsynced = 0  # bytes appended since the last fsync
        self._fault = _test_fault()
        self._lock = _Lock(self.path.with_name(self.path.name + ".lock"), self.path)
        if not self.path.parent.is_dir():
            raise StoreError(
                f"{self.path}: the folder {self.path.parent} does not exist",
                hint="create it or choose another output path",
            )
        self._lock.acquire()
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    # -- opening

    @property
    def consumed(self) -> int:
        """Samples handled so far (stored or skipped)."""
        return self.written + len(self.skipped)

    def _open(self, overwrite: bool) -> None:
        if self.path.exists() and not overwrite:
            raise StoreExistsError(
                f"{self.path} already exists",
                hint="pass {remedy} to replace it, or choose another output path", remedy=Remedy("overwrite"),
            )
        if self.partial_path.exists() and not overwrite:
            self._resume()
        else:
            self._create()
        self._flushed = self.consumed

    def _create(self) -> None:
        h = self.header
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial_path)
        try:
            f = h5py.File(self.partial_path, "w", libver=_LIBVER, track_order=True)
        except OSError as exc:
            raise OutputError(self.partial_path, io_cause(exc), hint="choose a writable output path") from None
        self._file = f
        self._fresh = True
        try:
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
                    chunks=(_samples_per_chunk(shape, _STORED_DTYPE[h.dtype]), *shape),
                    dtype=_STORED_DTYPE[h.dtype], **kwargs,
                )
                ds.attrs["module_path"] = spec.location
                ds.attrs["shape"] = np.array(shape, dtype=np.int64)
                ds.attrs["encoding"] = h.dtype
            f.flush()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None

    def _resume(self) -> None:
        hint, remedy = f"delete {self.partial_path} or pass {{remedy}} to start over", Remedy("overwrite")
        try:
            f = h5py.File(self.partial_path, "r+", libver=_LIBVER)
        except OSError as exc:
            raise StoreError(
                f"{self.partial_path}: cannot resume, the unfinished file is unreadable ({exc})", hint=hint, remedy=remedy,
            ) from None
        self._file = f
        expected = self.header.provenance()
        try:
            differs = [
                k for k in ("format", *PROVENANCE_KEYS)
                if not _same(f.attrs.get(k), FORMAT if k == "format" else expected[k])
            ]
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"{self.partial_path}: cannot resume, the unfinished file is damaged ({exc})",
                             hint=hint, remedy=remedy) from None
        if differs:
            raise StoreError(
                f"{self.partial_path}: an unfinished extraction with other settings "
                f"({', '.join(differs)} differ) is in the way",
                hint=hint, remedy=remedy,
            )
        try:
            written = int(f.attrs["written"])
            skipped = json.loads(attribute_value(f.attrs["skipped"]))
            datasets = [f[key] for key in self._dataset_keys()]
            positions = self._skipped_positions(written, skipped)
        except (KeyError, ValueError, TypeError, OSError, RuntimeError) as exc:
            raise StoreError(
                f"{self.partial_path}: cannot resume, the unfinished file is damaged ({exc})", hint=hint, remedy=remedy,
            ) from None
        if written < 0 or any(d.shape[0] < written for d in datasets):
            raise StoreError(
                f"{self.partial_path}: cannot resume, 'written' = {written} does not match the data", hint=hint, remedy=remedy,
            )
        unprotected = [d.name for d in datasets[1:] if not has_checksums(d)]
        if unprotected:
            raise StoreError(
                f"{self.partial_path}: cannot resume, {unprotected[0]} has no checksums to verify it", hint=hint, remedy=remedy,
            )
        good, problem = self._verified_rows(f, written, positions)
        if good < written:
            # Keep the skipped images met before the first row that is computed again.
            left_out = set(positions)
            restart = [p for p in range(written + len(skipped)) if p not in left_out][good]
            skipped = [s for s, p in zip(skipped, positions) if p < restart]
            self.repaired = (
                f"{self.partial_path}: {problem}; resuming from sample {restart} "
                f"(the {written - good} rows from there on are computed again)"
            )
            warnings.warn(self.repaired, stacklevel=2)
        # Rows past the counter belong to a batch whose flush did not finish, or failed
        # verification: drop them.
        self._flushed = good + len(skipped)  # a failure below keeps the file: it is still resumable
        try:
            if good < written:  # the counter first: a kill in between leaves rows past it, which are dropped
                f.attrs["written"] = good
                f.attrs["skipped"] = json.dumps(skipped)
                f.flush()
            for d in datasets:
                if d.shape[0] != good:
                    d.resize(good, axis=0)
            f.flush()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None
        self.written = good
        self.skipped = list(skipped)
        self.resumed_from = self.consumed

    def _skipped_positions(self, written: int, skipped: list[dict[str, str]]) -> list[int]:
        """Positions in the sample list of the skipped images (increasing), from their paths."""
        consumed = written + len(skipped)
        samples = self.header.samples
        if consumed > len(samples):
            raise ValueError(f"{consumed} samples handled, only {len(samples)} selected")
        index = {rel: i for i, (rel, _) in enumerate(samples[:consumed])}
        positions = [index.get(str(s["path"]), -1) for s in skipped]
        if any(b <= a for a, b in zip(positions, positions[1:])) or (positions and positions[0] < 0):
            raise ValueError("the 'skipped' list does not follow the sample list")
        return positions

    def _verified_rows(self, f: h5py.File, written: int, skipped_positions: list[int]) -> tuple[int, str | None]:
        """Rows below ``written`` that read back intact, and what stopped the count there.

        Labels and stages are read chunk by chunk (checksums, finite values);
        paths and labels are compared with the sample list.
        """
        good, problem = written, None
        for key in self._dataset_keys()[1:]:
            found: ChunkProblem | None = first_problem(f[key], good)
            if found is not None and found.start < good:
                good, problem = found.start, found.line()
        skipped = set(skipped_positions)
        samples = self.header.samples
        expected = [samples[p] for p in range(written + len(skipped)) if p not in skipped][:good]
        try:
            paths = [attribute_value(p) for p in f["samples/path"][:good]]
            labels = np.asarray(f["samples/label"][:good])
            mismatch = next((i for i, ((rel, label), p, l) in enumerate(zip(expected, paths, labels))
                             if rel != p or int(label) != int(l)), None)
        except (OSError, RuntimeError, ValueError) as exc:
            return 0, f"samples/path cannot be read ({' '.join(str(exc).split())})"
        if mismatch is not None:
            return mismatch, f"samples/path or samples/label row {mismatch} does not match the sample list"
        return good, problem

    def _dataset_keys(self) -> list[str]:
        return ["samples/path", "samples/label", *(f"stages/{s.name}" for s in self.header.stages)]

    # -- failures

    def _write_failed(self, exc: BaseException) -> OutputError:
        """Close the file after a failed write; keep it if a resume can use it. The error to raise."""
        cause = io_cause(exc)
        if self._file is not None:  # before the datasets are let go: closing one writes its cached chunks
            detach_file(self._file)
            self._file = None
        self._datasets = None
        keep = self._flushed > 0 and self._readable_partial()
        if not keep:
            with contextlib.suppress(OSError):
                os.unlink(self.partial_path)
        if keep:
            hint = (f"the unfinished file is kept ({self._flushed} samples): fix the cause (free some space) and "
                    "rerun the same command to resume it")
        else:
            hint = "nothing was kept: fix the cause (free some space) or choose another output path"
        return OutputError(self.partial_path, cause, hint=hint)

    def _readable_partial(self) -> bool:
        try:
            with h5py.File(self.partial_path, "r") as f:
                return attribute_value(f.attrs.get("format")) == FORMAT and int(f.attrs["written"]) >= 0
        except Exception:  # noqa: BLE001  any failure: it cannot be resumed
            return False

    def _maybe_fault(self, phase: str, rows: int) -> None:
        """The test suite's kill hook (RESDYN_TEST_FAULT); nothing otherwise."""
        if self._fault is None or self._fault[2] != phase:
            return
        kind, value, _ = self._fault
        if kind == "delay":
            time.sleep(value)
        elif rows >= value:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- writing

    def _encode(self, spec: StageSpec, rows: np.ndarray) -> np.ndarray:
        """Check that ``rows`` are finite and fit the dtype; return what to store."""
        dtype = self.header.dtype
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.size == 0:
            return rows.astype(_STORED_DTYPE[dtype])
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

    def append(
        self,
        rows: Mapping[str, np.ndarray],
        positions: Sequence[int],
        failures: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Store one batch and flush.

        Parameters
        ----------
        rows : mapping of stage name to ndarray of shape (n, *shape)
            float32 activations of the good images, in ``positions`` order.
        positions : sequence of int
            Their positions in ``header.samples``.
        failures : sequence of (int, str)
            Positions and reasons of images skipped in this batch.
            ``positions`` and ``failures`` together must be the next
            consecutive positions starting at :attr:`consumed`.

        Raises
        ------
        StoreError
            Non-finite activations, or a value out of the dtype's range.
        OutputError
            A write failed (no space, I/O error); the file is closed.
        """
        f = self._require_open()
        positions = [int(p) for p in positions]
        handled = sorted(positions + [int(p) for p, _ in failures])
        if handled != list(range(self.consumed, self.consumed + len(handled))):
            raise ValueError(
                f"batch positions {handled[:3]}... do not continue at {self.consumed}"
            )
        encoded = {}
        for spec in self.header.stages:
            data = rows[spec.name]
            if data.shape != (len(positions), *spec.shape):
                raise StoreError(
                    f"stage {spec.name!r}: got activations of shape {tuple(data.shape)}, "
                    f"expected {(len(positions), *spec.shape)}",
                )
            try:
                encoded[spec.name] = self._encode(spec, data)
            except StoreError:
                # The same settings would fail at the same batch again: the unfinished
                # file cannot be resumed, so close() removes it.
                self._doomed = True
                raise
        start, stop = self.written, self.written + len(positions)
        samples = self.header.samples
        skipped = self.skipped + [
            {"path": samples[position][0], "reason": str(reason)} for position, reason in sorted(failures)
        ]
        try:
            if positions:
                if self._datasets is None:  # h5py lookups by name cost more than the writes
                    self._datasets = {key: f[key] for key in self._dataset_keys()}
                paths, labels = self._datasets["samples/path"], self._datasets["samples/label"]
                paths.resize(stop, axis=0)
                paths[start:stop] = np.array([samples[p][0] for p in positions], dtype=object)
                labels.resize(stop, axis=0)
                labels[start:stop] = np.array([samples[p][1] for p in positions], dtype=np.int64)
                for name, data in encoded.items():
                    ds = self._datasets[f"stages/{name}"]
                    ds.resize(stop, axis=0)
                    ds[start:stop] = data
                self._maybe_fault("written", stop)
                # The rows reach the file before the counter that covers them: a kill or a
                # failure in between leaves a counter that never runs ahead of the data.
                f.flush()
                self._maybe_fault("data-flushed", stop)
            f.attrs["written"] = stop
            if failures:
                f.attrs["skipped"] = json.dumps(skipped)
            self._maybe_fault("counted", stop)
            f.flush()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None
        self.written = stop
        self.skipped = skipped
        self._flushed = self.consumed
        self._maybe_fault("flushed", stop)
        # Push what is written to the disk every _SYNC_BYTES, here (on the
        # writer thread, while the next batch is computed) rather than all of
        # it in the fsync of finish(), after the last batch.
        self._unsynced += sum(data.nbytes for data in encoded.values())
        if self._unsynced >= _SYNC_BYTES:
            with contextlib.suppress(OSError, ValueError):
                os.fsync(f.id.get_vfd_handle())
            self._unsynced = 0

    def finish(self) -> Path:
        """Mark the store complete and move it to its final name.

        Raises
        ------
        StoreError
            Samples are still missing, or no image could be stored.
        OutputError
            The last writes, the sync or the rename failed.
        """
        f = self._require_open()
        total = len(self.header.samples)
        if self.consumed != total:
            raise StoreError(f"{self.path}: only {self.consumed} of {total} samples were handled")
        if self.written == 0:
            raise StoreError(
                f"{self.path}: none of the {total} images could be read, nothing to store",
                hint="check the image folder",
            )
        try:
            labels = np.asarray(f["samples/label"][()])
            paths = [attribute_value(p) for p in f["samples/path"][()]]
            f.attrs["rows_sha256"] = rows_digest(labels, paths)
            f.attrs["complete"] = True
            f.flush()
            self._datasets = None
            f.close()
            self._file = None
            _fsync(self.partial_path)
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None
        try:
            os.replace(self.partial_path, self.path)
        except OSError as exc:
            raise OutputError(self.path, exc, hint=f"the finished store stays at {self.partial_path}; "
                              "rerun the same command to move it") from None
        self._lock.release()
        return self.path

    def close(self) -> None:
        """Close without finishing; idempotent.

        The partial file stays for a resume, except when it holds nothing
        (no sample handled since this writer created it) or cannot be resumed
        (activations that are NaN / inf or out of the dtype's range, which the
        same settings would meet again): then it is removed.
        """
        self._datasets = None
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001  a close that fails to write: let nothing write again
                detach_file(self._file)
            self._file = None
            if self._doomed or (self._fresh and self.consumed == 0):
                with contextlib.suppress(OSError):
                    os.unlink(self.partial_path)
        self._lock.release()

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise StoreError(f"{self.path}: the writer is closed")
        return self._file

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- reader


class _BFloat16Stage:
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


class ActivationStore:
    """A finished activation store, open for reading (see :func:`open_store`).

    Attributes
    ----------
    path : Path
    attrs : dict
        Root attributes as plain Python values.
    classes : list of str
        By label.
    labels : ndarray of shape (n_samples,), int64
    paths : list of str
        Relative to ``attrs["data_root"]``.
    stage_names : list of str
        In network order (``penultimate`` last).
    checksums : bool
        Whether every chunk carries a Fletcher-32 checksum, checked by HDF5 on
        every read (stores of format 1.1 on); False for older stores, whose
        damage cannot be detected.
    """

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self._file = file
        self.attrs = {k: attribute_value(v) for k, v in file.attrs.items()}
        self.classes = [attribute_value(c) for c in file["classes"][()]]
        try:
            self.labels = np.asarray(file["samples/label"][()], dtype=np.int64)
        except (OSError, RuntimeError) as exc:
            raise _damaged(path, file["samples/label"], exc) from None
        self.paths = [attribute_value(p) for p in file["samples/path"][()]]
        stages = file["stages"]
        self.checksums = has_checksums(file["samples/label"]) and all(
            has_checksums(stages[name]) for name in stages
        )
        order = self.attrs.get("stages")
        names = list(file["stages"].keys())
        try:
            listed = [entry[0] for entry in json.loads(order)] if order else []
        except (ValueError, TypeError, IndexError):
            listed = []
        self.stage_names = [n for n in listed if n in names] + [n for n in names if n not in listed]

    @property
    def skipped(self) -> list[dict[str, str]]:
        """``{"path", "reason"}`` of the images left out."""
        return json.loads(self.attrs.get("skipped") or "[]")

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing used (``size``, ``resize``, ``mean``, ``std``)."""
        return json.loads(self.attrs.get("preprocessing") or "{}")

    def __len__(self) -> int:
        return len(self.labels)

    def stage(self, name: str) -> h5py.Dataset | _BFloat16Stage:
        """The activations of stage ``name``, shape (n_samples, *shape), read lazily.

        float32 and float16 stages are the h5py datasets themselves; bfloat16
        stages are wrapped so that slicing returns float32.

        Raises
        ------
        StoreError
            Unknown stage.
        """
        if name not in self.stage_names:
            raise StoreError(
                f"{self.path}: no stage {name!r} (key stages/{name})",
                hint=f"stages in the file: {', '.join(self.stage_names)}",
            )
        dataset = self._file["stages"][name]
        if attribute_value(dataset.attrs.get("encoding")) == "bfloat16":
            return _BFloat16Stage(dataset)
        return dataset

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse(path: Path, key: str, problem: str, hint: str | None = None) -> StoreError:
    return StoreError(f"{path}: {problem} (key {key!r})", hint=hint)


def _damaged(path: Path, dataset: Any, exc: BaseException) -> StoreError:
    """The error for a read of ``dataset`` that failed (a chunk that fails its checksum, ...)."""
    cause = "a chunk fails its Fletcher-32 checksum" if fails_checksum(dataset, exc) else " ".join(str(exc).split())
    return _refuse(path, str(dataset.name).lstrip("/"), f"the store is damaged, {cause}", damage_hint(path))


class UnverifiedStoreWarning(UserWarning):
    """A store without checksums (format 1.0) was opened: damage in it cannot be detected."""


def open_store(path: str | Path, *, warn_unverified: bool = True) -> ActivationStore:
    """Open a finished activation store for reading.

    Every chunk read later is checked against its Fletcher-32 checksum by
    HDF5 (a failed check raises instead of returning wrong numbers); the
    sample list is checked against ``rows_sha256`` here.

    Parameters
    ----------
    path : str or Path
    warn_unverified : bool
        Issue :class:`UnverifiedStoreWarning` for a store written without
        checksums (format 1.0), which stays readable.

    Returns
    -------
    ActivationStore
        A context manager; closing it closes the file.

    Raises
    ------
    StoreError
        Missing file, not HDF5, not a resdyn store (no ``format``), an
        unknown major ``format_version``, an incomplete store, or a missing
        dataset. Every message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = (
            "an unfinished extraction exists; rerun the same extract command to resume it"
            if partial.exists() else "run 'resdyn extract' first"
        )
        raise StoreError(f"{path}: no such file", hint=hint)
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError:
        is_hdf5 = False
    if not is_hdf5:
        raise StoreError(f"{path}: not an HDF5 file", hint="pass a store written by 'resdyn extract'")
    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path}: cannot open as HDF5 ({exc})") from None
    try:
        attrs = file.attrs
        if attribute_value(attrs.get("format")) != FORMAT:
            raise _refuse(
                path, "format", f"not a resdyn activation store (format={attribute_value(attrs.get('format'))!r})",
                "pass a store written by 'resdyn extract'",
            )
        version = str(attribute_value(attrs.get("format_version", "")))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise _refuse(
                path, "format_version", f"unsupported store version {version!r} "
                f"(this resdyn reads {FORMAT_VERSION.split('.')[0]}.x)",
                "upgrade resdyn or extract the activations again",
            )
        if not bool(attribute_value(attrs.get("complete", False))):
            raise _refuse(
                path, "complete", "the store is incomplete",
                "rerun the extract command to finish it",
            )
        for key in ("classes", "samples/path", "samples/label", "stages"):
            if key not in file:
                raise _refuse(path, key, "a required dataset is missing")
        store = ActivationStore(path, file)
        if len(store.paths) != len(store.labels):
            raise _refuse(path, "samples/path", "paths and labels differ in length")
        for name in store.stage_names:
            if file["stages"][name].shape[0] != len(store.labels):
                raise _refuse(path, f"stages/{name}", "row count differs from samples/label")
        digest = store.attrs.get("rows_sha256")
        if digest is not None and digest != rows_digest(store.labels, store.paths):
            raise _refuse(path, "samples/path", "the store is damaged, the sample list does not match rows_sha256",
                          damage_hint(path))
        if warn_unverified and not store.checksums:
            warnings.warn(
                f"{path}: written without checksums (store format {version}), so damage in it cannot be "
                "detected; 'resdyn extract --overwrite' rewrites it with checksums",
                UnverifiedStoreWarning, stacklevel=2,
            )
        return store
    except BaseException:
        file.close()
        raise
