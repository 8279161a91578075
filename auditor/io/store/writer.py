"""Writing a store batch by batch, resumably, under a lock (the package docstring tells the whole contract)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ...errors import OutputError, Remedy, StoreError
from ..integrity import attribute_value, detach_file, io_cause
from .encoding import encode_rows
from .faults import FaultHook
from .layout import COMPRESSIONS, DTYPES, FORMAT, LIBVER, StoreHeader, create_layout, dataset_keys, rows_digest
from .lock import StoreLock
from .rebuild import NEW_SUFFIX, copy_rows, new_file, sync_file
from .resume import find_resume_point, open_partial

__all__ = ["StoreExistsError", "StoreWriter"]

# The writer fsyncs after every this many bytes (the final fsync then has
# little left to wait for).
_SYNC_BYTES = 128 * 1024 * 1024


class StoreExistsError(StoreError):
    """The finished store exists and ``overwrite`` was not asked for."""


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


class StoreWriter:
    """Writes a store batch by batch, resumably (see the package docstring, :mod:`auditor.io.store`).

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
        self.new_path = self.partial_path.with_name(self.partial_path.name + NEW_SUFFIX)
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
        self._fault = FaultHook()
        self._lock = StoreLock.beside(self.path)
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
        """Lay out a new file in ``<name>.partial.new`` and rename it to ``.partial`` (:mod:`.rebuild`)."""
        self._start_new_file(created=None)
        self._fresh = True
        self._publish()

    def _start_new_file(self, created: object) -> h5py.File:
        """A new file with the layout (``created`` copied when given) at :attr:`new_path`, as ``self._file``."""
        try:
            f = new_file(self.new_path)
        except OSError as exc:
            raise OutputError(self.new_path, io_cause(exc), hint="choose a writable output path") from None
        self._file = f
        try:
            create_layout(f, self.header)
            if created is not None:
                f.attrs["created"] = created
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None
        return f

    def _publish(self) -> None:
        """Sync the new file and rename it over ``.partial`` (it stays open for the appends)."""
        try:
            sync_file(self._require_open())
            os.replace(self.new_path, self.partial_path)
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None

    def _resume(self) -> None:
        """Copy the verified rows of the unfinished file into a fresh one (never writing into the old file)."""
        old = open_partial(self.partial_path)
        try:
            point = find_resume_point(old, self.header, self.partial_path)
            good, skipped = point.rows, point.skipped
            if point.repaired is not None:
                self.repaired = point.repaired
                warnings.warn(self.repaired, stacklevel=3)
            # Rows past the counter belong to a batch whose flush did not finish, or failed
            # verification: they are not copied.
            self._flushed = good + len(skipped)  # a failure below keeps the old file: it is still resumable
            f = self._start_new_file(created=old.attrs.get("created"))
            try:
                copy_rows(old, f, dataset_keys(self.header), good)
                f.attrs["written"] = good
                f.attrs["skipped"] = json.dumps(skipped)
            except (OSError, RuntimeError) as exc:
                raise self._write_failed(exc) from None
        finally:
            old.close()
        self._publish()
        self.written = good
        self.skipped = list(skipped)
        self.resumed_from = self.consumed

    # -- failures

    def _write_failed(self, exc: BaseException) -> OutputError:
        """Close the file after a failed write; keep it if a resume can use it. The error to raise."""
        cause = io_cause(exc)
        if self._file is not None:  # before the datasets are let go: closing one writes its cached chunks
            detach_file(self._file)
            self._file = None
        self._datasets = None
        with contextlib.suppress(OSError):
            os.unlink(self.new_path)  # a copy or a layout that did not finish
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

    # -- writing

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
                encoded[spec.name] = encode_rows(spec, data, self.header.dtype)
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
                    self._datasets = {key: f[key] for key in dataset_keys(self.header)}
                paths, labels = self._datasets["samples/path"], self._datasets["samples/label"]
                paths.resize(stop, axis=0)
                paths[start:stop] = np.array([samples[p][0] for p in positions], dtype=object)
                labels.resize(stop, axis=0)
                labels[start:stop] = np.array([samples[p][1] for p in positions], dtype=np.int64)
                for name, data in encoded.items():
                    ds = self._datasets[f"stages/{name}"]
                    ds.resize(stop, axis=0)
                    ds[start:stop] = data
                self._fault.at("written", stop)
                # The rows reach the file before the counter that covers them: a kill or a
                # failure in between leaves a counter that never runs ahead of the data.
                f.flush()
                self._fault.at("data-flushed", stop)
            f.attrs["written"] = stop
            if failures:
                f.attrs["skipped"] = json.dumps(skipped)
            self._fault.at("counted", stop)
            f.flush()
        except (OSError, RuntimeError) as exc:
            raise self._write_failed(exc) from None
        self.written = stop
        self.skipped = skipped
        self._flushed = self.consumed
        self._fault.at("flushed", stop)
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
            with contextlib.suppress(OSError):
                os.unlink(self.new_path)  # a layout or a copy that was not renamed yet
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
