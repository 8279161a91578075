"""Extract stage activations: images -> forward pass with hooks -> HDF5 store.

1. the stages to capture are resolved from the anatomy (default: every stage
   and the penultimate features);
2. a forward hook (``hook == "output"``) or pre-hook (``"input"``, first
   positional argument) per stage copies the tensor *inside the hook*, so a
   later in-place operation (``nn.ReLU(inplace=True)``, ``out += x``) cannot
   change what is stored;
3. batches run under ``torch.inference_mode()``; the copies go through a
   bounded queue to one writer thread, which checks them (NaN / inf, float16
   range), casts them to the store's dtype and writes them, while the next
   batch is computed;
4. the store (:class:`~auditor.io.store.StoreWriter`) is resumable: a run that
   was killed continues where the last flushed batch ended.

Library code: no printing; progress goes through ``progress(done, total)``.
"""

from __future__ import annotations

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

from .errors import ArchitectureError, DataError, UsageError
from .io.images import ImageDataset, make_loader
from .io.store import COMPRESSIONS, DTYPES, StoreHeader, StoreWriter
from .models.anatomy import Anatomy, StageSpec

__all__ = ["ExtractResult", "extract_activations", "resolve_device", "resolve_stages"]

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
    """

    path: Path
    samples: int
    stages: tuple[str, ...]
    skipped: tuple[dict[str, str], ...]
    seconds: float
    resumed_from: int
    device: str


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
        raise UsageError(f"device {device!r} asked for, but CUDA is not available", hint="use --device cpu")
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
        raise UsageError("no stages to extract", hint="the anatomy found no stages; pass --stages")
    return tuple(specs)


def _copy(value: Any) -> torch.Tensor | None:
    """A float32, contiguous CPU copy that later in-place operations cannot touch."""
    if not isinstance(value, torch.Tensor):
        return None
    return value.detach().to(
        device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
    )


class _Capture:
    """Hooks that copy each stage's tensor once per forward pass."""

    def __init__(self, model: nn.Module, specs: Sequence[StageSpec]) -> None:
        self.values: dict[str, torch.Tensor | None] = {}
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
                self.values[name] = _copy(args[0]) if args else None

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in self.values:
                self.values[name] = _copy(output)

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
    """One background thread that appends queued batches to the store, in order."""

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
            if self._error is not None:
                continue  # keep draining so that put() never blocks forever
            try:
                self._writer.append(*item)
            except BaseException as exc:  # handed to the main thread by check()
                self._error = exc

    def check(self) -> None:
        """Raise the writer's error, if any, in the calling thread."""
        if self._error is not None:
            raise self._error

    def put(self, item: tuple) -> None:
        """Queue a batch (blocks while the queue is full); raises the writer's error."""
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
        hint="fix or remove the file, or run without --strict to skip unreadable images",
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
        handled (including those of an earlier, interrupted run).
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
        time.perf_counter() - started, resumed_from, str(target),
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
                    model(batch.images.to(device, non_blocking=cuda))
                    rows = capture.take(specs, len(batch.indices))
                else:
                    rows = empty
                background.put((rows, batch.indices.tolist(), failures))
                done += len(batch.indices) + len(failures)
                if progress is not None:
                    progress(done, total)
    finally:
        capture.remove()
        background.stop()
    background.check()
