"""Extract stage activations: images -> forward pass with hooks -> HDF5 store.

1. the stages to capture are resolved from the anatomy (default: every stage
   and the penultimate features);
2. a forward hook (``hook == "output"``) or pre-hook (``"input"``, first
   positional argument) per stage copies the tensor *inside the hook*, so a
   later in-place operation (``nn.ReLU(inplace=True)``, ``out += x``) cannot
   change what is stored; the copies go into a few recycled float32 buffers
   (no fresh memory per batch, and a bound on the batches in flight);
3. batches run under ``torch.inference_mode()``; the copies go through a
   bounded queue to one writer thread, which checks them (NaN / inf, float16
   range), casts them to the store's dtype and writes them, while the next
   batch is computed;
4. the store (:class:`~auditor.io.store.StoreWriter`) is resumable: a run that
   was killed continues where the last flushed batch ended.

Library code: no printing; progress goes through ``progress(done, total)``.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed
from ..errors import ArchitectureError, DataError, Remedy, UsageError
from ..io.images import ImageDataset, collate_images, make_loader
from ..io.store import COMPRESSIONS, DTYPES, StoreHeader, StoreWriter
from ..models.anatomy import Anatomy, StageSpec
from ..subject import Subject
from .bounds import check_memory, extract_bytes
from .images import PreparedImages
from .store_space import check_store_space, say_estimate

__all__ = ["ExtractResult", "extract_activations", "extract_subject", "resolve_device", "resolve_stages"]

ProgressCallback = Callable[[int, int], None]
_QUEUE_SIZE = 3


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_activations` did.

    Attributes
    ----------
    path : Path
        The finished store.
    samples : int
        Rows stored (selected images minus skipped ones).
    stages : tuple of str
        Stage names stored, in order.
    skipped : tuple of dict
        ``{"path", "reason"}`` of unreadable images left out.
    seconds : float
        Wall time of this call.
    resumed_from : int
        Samples an earlier, interrupted run had already handled (0: fresh).
    device : str
        Where the forward pass ran.
    estimated_bytes : int
        The store's size as estimated before the first image (0 on ranks other than 0).
    """

    path: Path
    samples: int
    stages: tuple[str, ...]
    skipped: tuple[dict[str, str], ...]
    seconds: float
    resumed_from: int
    device: str
    estimated_bytes: int = 0


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; validates the others.

    Raises
    ------
    UsageError
        Unknown device string, or CUDA asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}", hint="use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available", hint="use {remedy}", remedy=Remedy("device", "cpu"))
    return resolved


def resolve_stages(anatomy: Anatomy, stages: Sequence[str] | None = None) -> tuple[StageSpec, ...]:
    """The StageSpecs to capture: ``stages`` by name, or every stage plus the penultimate.

    Raises
    ------
    ArchitectureError
        Unknown stage name (the message lists the known ones).
    UsageError
        No stage at all, or a name given twice.
    """
    if stages is None:
        specs = list(anatomy.stages) + ([anatomy.penultimate] if anatomy.penultimate else [])
    else:
        names = list(stages)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UsageError(f"stage listed more than once: {', '.join(twice)}")
        specs = [anatomy.stage(n) for n in names]
    if not specs:
        raise UsageError("no stages to extract", hint="the anatomy found no stages; pass {remedy}",
                         remedy=Remedy("stages", None))
    return tuple(specs)


def _copy_into(value: Any, buffer: torch.Tensor) -> torch.Tensor | None:
    """Copy ``value`` into the first rows of ``buffer`` (float32, contiguous, CPU).

    A copy, not a reference, so that later in-place operations cannot change
    it; into a reused buffer, because fresh memory for every batch costs page
    faults (about three times the copy itself). A tensor that does not fit is
    copied on its own, for :meth:`_Capture.take` to report.
    """
    if not isinstance(value, torch.Tensor):
        return None
    if value.dim() == buffer.dim() and value.shape[1:] == buffer.shape[1:] and value.shape[0] <= len(buffer):
        target = buffer[: value.shape[0]]
        target.copy_(value.detach())
        return target
    return value.detach().to(
        device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
    )


class _BufferPool:
    """A few sets of per-stage float32 buffers, recycled between the hooks and the writer.

    The pool bounds the batches in flight: the forward pass waits for a free
    set when the writer falls behind.
    """

    def __init__(self, specs: Sequence[StageSpec], batch_size: int, sets: int, *, pin: bool = False) -> None:
        self._free: queue.Queue = queue.Queue()
        for _ in range(sets):
            self._free.put({
                s.name: torch.empty((batch_size, *s.shape), dtype=torch.float32, pin_memory=pin)
                for s in specs
            })

    def acquire(self, check: Callable[[], None]) -> dict[str, torch.Tensor]:
        """A free set; waits, calling ``check`` (which raises the writer's error) meanwhile."""
        while True:
            check()
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue

    def release(self, buffers: dict[str, torch.Tensor]) -> None:
        """Give a set back."""
        self._free.put(buffers)


class _Capture:
    """Hooks that copy each stage's tensor, once per forward pass, into the current buffers."""

    def __init__(self, model: nn.Module, specs: Sequence[StageSpec]) -> None:
        self.values: dict[str, torch.Tensor | None] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
        for spec in specs:
            module = modules.get(spec.module_path)
            if module is None:
                raise ArchitectureError(
                    f"stage {spec.name!r}: the model has no module {spec.module_path!r}",
                    hint="analyze the anatomy of the model that is extracted",
                )
            if spec.hook == "input":
                self._handles.append(module.register_forward_pre_hook(self._pre(spec.name)))
            elif spec.hook == "output":
                self._handles.append(module.register_forward_hook(self._post(spec.name)))
            else:
                raise ArchitectureError(f"stage {spec.name!r}: unknown hook kind {spec.hook!r}")

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self.values:  # a module called twice keeps its first call
                self.values[name] = _copy_into(args[0], self.buffers[name]) if args else None

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in self.values:
                self.values[name] = _copy_into(output, self.buffers[name])

        return hook

    def take(self, specs: Sequence[StageSpec], n: int) -> dict[str, np.ndarray]:
        """The batch's copies as numpy arrays, checked against the specs; resets."""
        rows = {}
        for spec in specs:
            value = self.values.get(spec.name)
            if value is None:
                raise ArchitectureError(
                    f"stage {spec.name!r}: {spec.location} was not reached by the forward pass "
                    "or did not carry a tensor",
                )
            if tuple(value.shape) != (n, *spec.shape):
                raise ArchitectureError(
                    f"stage {spec.name!r}: {spec.location} holds shape {tuple(value.shape[1:])}, "
                    f"the anatomy says {tuple(spec.shape)}",
                    hint="analyze the anatomy at the input size the images are preprocessed to",
                )
            rows[spec.name] = value.numpy()
        self.values = {}
        return rows

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _WriterThread:
    """One background thread that appends queued batches to the store, in order.

    Each item carries a callback run after its batch was written (or dropped
    after an error): it gives the batch's buffers back to the pool.
    """

    def __init__(self, writer: StoreWriter, maxsize: int = _QUEUE_SIZE) -> None:
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="resdyn-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            rows, positions, failures, done = item
            try:
                if self._error is None:  # after an error: keep draining, never block put()
                    self._writer.append(rows, positions, failures)
            except BaseException as exc:  # handed to the main thread by check()
                self._error = exc
            finally:
                if done is not None:
                    done()

    def check(self) -> None:
        """Raise the writer's error, if any, in the calling thread."""
        if self._error is not None:
            raise self._error

    def put(self, item: tuple) -> None:
        """Queue ``(rows, positions, failures, done)`` (blocks while full); raises the writer's error."""
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()


def _failure_error(dataset: ImageDataset, position: int, reason: str, fatal: bool) -> DataError:
    path = dataset.root / dataset.samples[position][0]
    if fatal:
        return DataError(f"{path}: {reason}")
    return DataError(
        f"{path}: cannot read the image ({reason})",
        hint="fix or remove the file, or skip unreadable images ({remedy})", remedy=Remedy("strict", False),
    )


def extract_activations(
    model: nn.Module,
    anatomy: Anatomy,
    dataset: ImageDataset,
    out_path: str | Path,
    *,
    checkpoint_sha256: str,
    arch: str,
    stages: Sequence[str] | None = None,
    dtype: str = "float32",
    compression: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    strict: bool = False,
) -> ExtractResult:
    """Run ``model`` over ``dataset`` and store the activations of its stages.

    Parameters
    ----------
    model : nn.Module
        Put in eval mode and moved to ``device`` (in place).
    anatomy : Anatomy
        Of ``model`` at ``dataset.input_shape``.
    dataset : ImageDataset
        Selected, preprocessed images; its selection (root, classes, seed,
        per-class count, shard) and preprocessing are stored as provenance.
    out_path : str or Path
        The store to write (``.h5``). Written as ``<out_path>.partial`` and
        renamed when complete; an existing partial file with the same
        provenance is resumed.
    checkpoint_sha256, arch : str
        Provenance of the model (``Checkpoint.sha256``, ``LoadedModel.arch``).
    stages : sequence of str, optional
        Stage names (see ``anatomy.stage``); default every stage and
        ``penultimate``.
    dtype : {"float32", "float16", "bfloat16"}
        Stored precision. float16 refuses values beyond +-65504.
    compression : {None, "none", "lzf", "gzip"}
    batch_size : int
    workers : int
        DataLoader worker processes.
    device : str
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    progress : callable, optional
        ``progress(done, total)`` after each batch, ``done`` counting samples
        handled (including those of an earlier, interrupted run). Where it has a
        ``note(text)`` method, that is called once before the first image with the
        store's estimated size (for the progress line).
    overwrite : bool
        Replace an existing store and discard an unfinished one.
    strict : bool
        Raise on the first unreadable image instead of skipping it.

    Returns
    -------
    ExtractResult

    Raises
    ------
    UsageError
        Invalid dtype, compression, batch size, workers, device or stages.
    DataError
        An unreadable image in strict mode; an image that does not fit the
        preprocessing.
    StoreError
        Existing output, a concurrent writer, an unfinished file with other
        provenance, NaN / inf activations, float16 overflow.
    OutputError
        The output's folder has less free space than the store's estimated size
        (checked before the first image), or a write failed.
    ArchitectureError
        A stage the forward pass does not reach, or of another shape.
    """
    started = time.perf_counter()
    compression = "none" if compression is None else compression
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
    if compression not in COMPRESSIONS:
        raise UsageError(
            f"unknown compression {compression!r}", hint=f"choose one of {', '.join(COMPRESSIONS)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"workers must be an integer >= 0, got {workers!r}")
    if tuple(anatomy.input_shape) != tuple(dataset.input_shape):
        raise UsageError(
            f"the anatomy was analysed at input {tuple(anatomy.input_shape)}, the images are "
            f"preprocessed to {tuple(dataset.input_shape)}",
            hint="analyze the anatomy at dataset.input_shape",
        )
    specs = resolve_stages(anatomy, stages)
    need, per_sample = extract_bytes(min(batch_size, max(1, len(dataset))), [s.shape for s in specs])
    check_memory(need, f"batches of {batch_size} images", "batch_size", batch_size, per_sample)
    target = resolve_device(device)
    selection = dataset.selection
    header = StoreHeader(
        checkpoint_sha256=checkpoint_sha256,
        arch=arch,
        data_root=str(selection.root),
        preset=dataset.preprocessing.preset,
        preprocessing=dataset.preprocessing.to_json(),
        seed=selection.seed,
        per_class=selection.per_class,
        shard=selection.shard,
        classes=selection.classes,
        samples=selection.samples,
        stages=specs,
        dtype=dtype,
        compression=compression,
    )
    total = len(dataset)
    if distributed.world().size > 1:
        return _extract_ranks(model, specs, dataset, out_path, header, overwrite=overwrite, device=target,
                              batch_size=batch_size, workers=workers, strict=strict, progress=progress,
                              started=started)
    estimate = check_store_space(out_path, header)  # before the first image
    say_estimate(progress, estimate)
    with StoreWriter(out_path, header, overwrite=overwrite) as writer:
        resumed_from = writer.consumed
        if progress is not None:
            progress(resumed_from, total)
        if writer.consumed < total:
            _run(model, specs, dataset, writer, target, batch_size, workers, strict, progress)
        path = writer.finish()
        skipped = tuple(writer.skipped)
        written = writer.written
    if progress is not None:
        progress(total, total)
    return ExtractResult(
        path, written, tuple(s.name for s in specs), skipped,
        time.perf_counter() - started, resumed_from, str(target), estimate,
    )


def _run(
    model: nn.Module,
    specs: Sequence[StageSpec],
    dataset: ImageDataset,
    writer: StoreWriter,
    device: torch.device,
    batch_size: int,
    workers: int,
    strict: bool,
    progress: ProgressCallback | None,
) -> None:
    """The forward loop from ``writer.consumed`` to the end of the dataset."""
    cuda = device.type == "cuda"
    model.eval().to(device)
    loader = make_loader(
        dataset, batch_size=batch_size, workers=workers, pin_memory=cuda, start=writer.consumed
    )
    capture = _Capture(model, specs)
    background = _WriterThread(writer)
    # one set being filled, up to _QUEUE_SIZE queued, one being written; never more sets
    # than there are batches (60 ResNet-50 images in batches of 32: 2 sets, not 5 of 190 MB)
    batches = max(1, math.ceil((len(dataset) - writer.consumed) / batch_size))
    pool = _BufferPool(specs, min(batch_size, len(dataset)), min(_QUEUE_SIZE + 2, batches), pin=cuda)
    total = len(dataset)
    done = writer.consumed
    empty = {s.name: np.empty((0, *s.shape), dtype=np.float32) for s in specs}
    try:
        with torch.inference_mode():
            for batch in loader:
                failures = []
                for position, failure in batch.failures:
                    if failure.fatal or strict:
                        raise _failure_error(dataset, position, failure.reason, failure.fatal)
                    failures.append((position, failure.reason))
                if batch.images is not None:
                    buffers = pool.acquire(background.check)
                    capture.buffers = buffers
                    try:
                        model(batch.images.to(device, non_blocking=cuda))
                        rows = capture.take(specs, len(batch.indices))
                    except BaseException:
                        pool.release(buffers)
                        raise
                    release = functools.partial(pool.release, buffers)
                else:
                    rows, release = empty, None
                background.put((rows, batch.indices.tolist(), failures, release))
                done += len(batch.indices) + len(failures)
                if progress is not None:
                    progress(done, total)
    finally:
        capture.remove()
        background.stop()
    background.check()


def _extract_ranks(
    model: nn.Module,
    specs: Sequence[StageSpec],
    dataset: ImageDataset,
    out_path: str | Path,
    header: StoreHeader,
    *,
    overwrite: bool,
    device: torch.device,
    batch_size: int,
    workers: int,
    strict: bool,
    progress: ProgressCallback | None,
    started: float,
) -> ExtractResult:
    """:func:`extract_activations` under torchrun: batches round-robin across ranks, rank 0 writes.

    Rank 0 alone opens the store (lock, ``.partial``, resume) and tells the others
    where to start. The remaining samples are cut into the single process's
    batches; in round ``t`` rank ``r`` runs batch ``t * world + r``, rank 0 gathers
    the round's rows and appends them in batch order: the same appends as one
    process makes, so the same file. A failure on any rank ends every rank (the
    partial file stays for a resume, as after a kill of any rank).
    """
    here = distributed.world()
    total = len(dataset)
    writer: StoreWriter | None = None

    estimate = 0

    def open_writer() -> int:
        nonlocal writer, estimate
        estimate = check_store_space(out_path, header)  # before the first image
        say_estimate(progress, estimate)
        writer = StoreWriter(out_path, header, overwrite=overwrite)
        return writer.consumed

    try:
        resumed_from = distributed.on_main(open_writer)
        if progress is not None:
            progress(resumed_from, total)
        starts = list(range(resumed_from, total, batch_size))
        mine = [list(range(a, min(a + batch_size, total))) for a in starts[here.rank :: here.size]]
        cuda = device.type == "cuda"
        model.eval().to(device)
        loader = iter(DataLoader(dataset, batch_sampler=mine, num_workers=workers, collate_fn=collate_images,
                                 pin_memory=cuda, prefetch_factor=2 if workers > 0 else None))
        capture = _Capture(model, specs)
        capture.buffers = {s.name: torch.empty((batch_size, *s.shape), dtype=torch.float32) for s in specs}
        empty = {s.name: np.empty((0, *s.shape), dtype=np.float32) for s in specs}

        def forward(start: int) -> tuple[dict[str, np.ndarray], list[int], list[tuple[int, str]]]:
            batch = next(loader)
            handled = batch.indices.tolist() + [position for position, _ in batch.failures]
            if min(handled) != start:  # this rank's batches in order: t * world + rank
                raise RuntimeError(f"loader batch at {min(handled)}, expected {start}")
            failures = []
            for position, failure in batch.failures:
                if failure.fatal or strict:
                    raise _failure_error(dataset, position, failure.reason, failure.fatal)
                failures.append((position, failure.reason))
            if batch.images is None:
                return empty, [], failures
            with torch.inference_mode():
                model(batch.images.to(device, non_blocking=cuda))
            return capture.take(specs, len(batch.indices)), batch.indices.tolist(), failures

        try:
            for first in range(0, len(starts), here.size):
                batches = min(here.size, len(starts) - first)

                def batch_rows(unit: int, first: int = first) -> tuple:
                    return forward(starts[first + unit])  # split() gives unit r of a round to rank r

                rows = distributed.compute(batches, batch_rows, to_main=True)

                def append(rows: list = rows) -> None:
                    for done in rows:
                        writer.append(*done)

                distributed.on_main(append)
                if progress is not None:
                    progress(min(total, starts[first + batches - 1] + batch_size), total)
        finally:
            capture.remove()

        def finish() -> tuple[Path, tuple[dict[str, str], ...], int]:
            path = writer.finish()
            return path, tuple(writer.skipped), writer.written

        path, skipped, written = distributed.on_main(finish)
    finally:
        if writer is not None:
            writer.close()
    if progress is not None:
        progress(total, total)
    return ExtractResult(
        Path(path), written, tuple(s.name for s in specs), skipped,
        time.perf_counter() - started, resumed_from, str(device), estimate,
    )


def extract_subject(subject: Subject, images: PreparedImages, out_path: str | Path, **options: Any) -> ExtractResult:
    """:func:`extract_activations` for a subject and its images (from :func:`auditor.tasks.images.open_data`).

    ``options`` are :func:`extract_activations`' keywords after ``arch`` (``stages``, ``dtype``, ...).
    """
    return extract_activations(
        subject.loaded.model, subject.anatomy, images.dataset, out_path,
        checkpoint_sha256=subject.checkpoint.sha256, arch=subject.loaded.arch, **options,
    )
