"""Class geometry: median principal angles per stage, of an activation store or of a checkpoint on images.

:func:`store_angles` reads a store; :func:`stage_geometry` extracts (or reuses) the
activations of a checkpoint on an image folder, then calls it.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .. import distributed
from ..analysis.angles import Share, StageAngles, median_angles, median_angles_h5
from ..errors import DataError, OutputError, Remedy, StoreError
from ..io.fingerprint import files_fingerprint
from ..io.scratch import scratch_folder
from ..io.store import ActivationStore
from ..subject import Subject
from .images import PreparedImages

T = TypeVar("T")
_IDENTITY = ("created", "rows_sha256", "checkpoint_sha256")  # a store file's attributes that tell it from a copy

__all__ = ["store_angles", "StoreGeometry", "store_geometry", "angles_entry", "separation_warning", "GeometryResult", "stage_geometry", "cache_name"]

Progress = Callable[[int, int], None]


class _RowSubset:
    """Rows ``indices`` (increasing) of a stage dataset, read lazily by slices."""

    def __init__(self, data: Any, indices: np.ndarray) -> None:
        self._data = data
        self._indices = indices
        self.shape = (len(indices), *data.shape[1:])
        self.dtype = data.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = self._indices[key]
        return np.asarray(self._data[np.atleast_1d(rows).tolist()], dtype=self.dtype)


def _separation_reason(result: StageAngles) -> str:
    """Why a stage has no separation (smallest inter minus largest intra angle)."""
    if len(result.counts) < 2:
        return (f"one class only ({', '.join(result.counts) or 'none'}): separation needs at least two classes")
    if not any(v is not None for v in result.inter.values()):
        return "no between-class angle is defined (see inter_reason)"
    return "no within-class angle is defined (see intra_reason)"


def separation_warning(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """One line for the stages whose separation is null, with the (first) reason; None when all are defined."""
    undefined = [e for e in entries if e.get("separation") is None]
    if not undefined:
        return None
    names = ", ".join(e["name"] for e in undefined)
    return f"class separation is undefined at stage(s) {names}: {undefined[0].get('separation_reason', 'no valid angles')}"


def angles_entry(name: str, shape: Sequence[int], result: StageAngles) -> dict[str, Any]:
    """One ``stages`` entry of the JSON report (degrees; null with a reason where undefined)."""
    entry: dict[str, Any] = {
        "name": name,
        "shape": [int(s) for s in shape],
        "intra": dict(result.intra),
        "inter": dict(result.inter),
        "counts": dict(result.counts),
        "excluded_zero": dict(result.excluded_zero),
        "separation": result.separation,
        "pairs_sampled": result.pairs_sampled,
    }
    if result.separation is None:
        entry["separation_reason"] = _separation_reason(result)
    if result.intra_reason:
        entry["intra_reason"] = dict(result.intra_reason)
    if result.inter_reason:
        entry["inter_reason"] = dict(result.inter_reason)
    if result.subspace is not None:
        entry["subspace"] = dict(result.subspace)
        entry["subspace_dims"] = dict(result.subspace_dims or {})
    return entry


def store_angles(
    store: ActivationStore,
    *,
    stages: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    center: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    subspace_k: int | None = None,
    progress: Progress | None = None,
    products: str = "auto",
) -> list[dict[str, Any]]:
    """Median principal angles of every (selected) stage of ``store``.

    Parameters
    ----------
    store : ActivationStore
    stages : sequence of str, optional
        Stage names, in the order wanted; default all (network order).
    classes : sequence of str, optional
        Classes to keep, in the order wanted; default all.
    center, max_pairs, seed, subspace_k, progress, products
        As in :func:`auditor.analysis.angles.median_angles`.

    Returns
    -------
    list of dict
        ``stages`` entries (see :func:`angles_entry`).

    Notes
    -----
    Under torchrun a stage with float32 products (see ``products``) is split: each
    rank computes its share of the Gram tiles and every rank gets the medians of all,
    the single process's (exact medians do not depend on how the float32 products
    round); a stage with float64 products is computed by rank 0 with every core of its
    machine and given to the other ranks (their rounding depends on the thread count,
    so this keeps the single process's numbers).
    """
    share = None
    here = distributed.world()
    if here.size > 1:
        share = Share(here.rank, here.size, distributed.split, distributed.everyone, distributed.on_main)
    names = list(stages) if stages else list(store.stage_names)
    for name in names:
        store.stage(name)  # refuses unknown stages, naming the ones in the file
    class_names = list(store.classes)
    labels = store.labels
    keep_rows = None
    if classes:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DataError(
                f"{store.path}: no class {unknown[0]!r} in the store",
                hint="classes in the file: " + ", ".join(class_names),
            )
        old_index = {c: i for i, c in enumerate(class_names)}
        remap = np.full(len(class_names), -1, dtype=np.int64)
        for new, name in enumerate(classes):
            remap[old_index[name]] = new
        keep_rows = np.flatnonzero(remap[labels] >= 0)
        labels = remap[labels[keep_rows]]
        class_names = list(classes)
    results = []
    for index, name in enumerate(names):
        data = store.stage(name)
        inner = None
        if progress is not None:
            inner = lambda done, total, i=index: progress(i * 1000 + done * 1000 // max(total, 1), len(names) * 1000)  # noqa: E731
        options = dict(center=center, max_pairs=max_pairs, seed=seed, subspace_k=subspace_k, progress=inner,
                       products=products, share=share)
        if keep_rows is not None:
            result = median_angles(_RowSubset(data, keep_rows), labels, class_names, **options)
        elif hasattr(data, "id"):
            result = median_angles_h5(data, labels, class_names, **options)
        else:
            result = median_angles(data, labels, class_names, **options)
        results.append(angles_entry(name, data.shape[1:], result))
    return results


@dataclass(frozen=True)
class StoreGeometry:
    """Median principal angles of an activation store (``resdyn angles``).

    Attributes
    ----------
    store : dict
        ``path``, ``arch``, ``checkpoint_sha256`` and ``samples`` of the store.
    config : dict
        ``center``, ``max_pairs``, ``seed``, ``subspace``.
    stages : list of dict
        ``stages`` entries (see :func:`angles_entry`).
    """

    store: dict[str, Any]
    config: dict[str, Any]
    stages: list[dict[str, Any]]

    def to_document(self) -> dict[str, Any]:
        """The ``angles`` report (JSON contract of ``resdyn angles``)."""
        from ..report.document import report_header

        return {**report_header("angles"), "store": self.store, "config": self.config, "stages": self.stages}


def store_geometry(path: str | Path, **options: Any) -> StoreGeometry:
    """Open the store at ``path`` and run :func:`store_angles` on it.

    Parameters
    ----------
    path : str or Path
    **options
        Keyword arguments of :func:`store_angles` (``stages``, ``classes``, ``center``,
        ``max_pairs``, ``seed``, ``subspace_k``, ``progress``).
    """
    from ..io.store import open_store

    with open_store(path) as store:
        entries = store_angles(store, **options)
        described = {"path": str(path), "arch": store.attrs.get("arch"),
                     "checkpoint_sha256": store.attrs.get("checkpoint_sha256"), "samples": len(store)}
    config = {"center": options.get("center", False), "max_pairs": options.get("max_pairs"),
              "seed": options.get("seed", 0), "subspace": options.get("subspace_k")}
    return StoreGeometry(described, config, entries)


@dataclass(frozen=True)
class GeometryResult:
    """Stage entries and where the activations came from."""

    stages: list[dict[str, Any]]
    store: Path | None
    reused: bool
    skipped: tuple[dict[str, str], ...]


def cache_name(subject: Subject, images: PreparedImages, stages: Sequence[str] | None, dtype: str) -> str:
    """A file name that changes whenever the store's content would (the images' files included)."""
    digest = hashlib.sha256()
    for part in (
        subject.checkpoint.sha256, subject.loaded.arch, str(images.dataset.root),
        json.dumps(images.preprocessing.to_dict(), sort_keys=True), json.dumps(list(images.dataset.samples)),
        json.dumps(list(stages) if stages else None), dtype, json.dumps(list(subject.anatomy.input_shape)),
        # the images themselves (size, mtime, inode): replaced in place under the same names, they are new data
        files_fingerprint(images.dataset.root, (rel for rel, _ in images.dataset.samples),
                          archive=images.dataset.selection.reader is not None),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{subject.checkpoint.path.stem}-{digest.hexdigest()[:16]}.h5"


def _reusable(path: Path, subject: Subject) -> bool:
    from ..io.store import open_store

    if not path.exists():
        return False
    try:  # a store without checksums (format 1.0) is written again, with them
        with open_store(path, warn_unverified=False) as store:
            return store.checksums and store.attrs.get("checkpoint_sha256") == subject.checkpoint.sha256
    except StoreError:
        return False


def stage_geometry(
    subject: Subject,
    images: PreparedImages,
    *,
    cache: Path | None = None,
    stages: Sequence[str] | None = None,
    center: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    subspace_k: int | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
    workers: int = 0,
    device: str = "cpu",
    extract_progress: Progress | None = None,
    angles_progress: Progress | None = None,
) -> GeometryResult:
    """Median principal angles at every stage of ``subject`` on ``images``.

    With ``cache`` the activation store is kept in that folder under a name
    derived from every input (see :func:`cache_name`) and reused when present;
    without it a temporary store is used and deleted. Under torchrun the ranks
    share the extraction (rank 0 writes the store) and, when every rank can open
    rank 0's store, the float32 stages' Gram tiles and repairs (:func:`store_angles`).
    """
    from ..io.store import StoreBusyError, StoreExistsError, open_store, wait_for_writer
    from .extract import extract_activations

    def run(path: Path) -> tuple[list[dict[str, Any]], bool, tuple]:
        # Under torchrun the ranks share the extraction; rank 0 owns the store
        # (its path, its cache decision) and reads the angles from it.
        skipped: tuple = ()
        while not (reused := distributed.on_main(lambda: _reusable(path, subject))):
            try:
                result = extract_activations(
                    subject.loaded.model, subject.anatomy, images.dataset, path,
                    checkpoint_sha256=subject.checkpoint.sha256, arch=subject.loaded.arch, stages=stages,
                    dtype=dtype, batch_size=batch_size, workers=workers, device=device,
                    # Replace only a finished file from other inputs; an unfinished one resumes.
                    progress=extract_progress, overwrite=path.exists(),
                )
            except (StoreBusyError, StoreExistsError):  # another process sharing the cache writes it:
                wait_for_writer(path)  # wait, then reuse (or resume) its store (under torchrun: RankError, refused)
                continue
            except OutputError as exc:  # no room (estimated up front, or a write that failed): say where else
                if getattr(exc.cause, "errno", None) == errno.ENOSPC and exc.remedy is None:
                    elsewhere = ("pass {remedy} a folder with room for the activation store"
                                 + ("" if cache is not None else " (or set TMPDIR to one)"))
                    up_front = str(exc.cause.strerror).startswith("no room for the activation store")
                    exc.hint = (f"free some space, or {elsewhere}" if up_front or not exc.hint
                                else f"{exc.hint}; or {elsewhere}")  # a failed write keeps what it says of the file
                    exc.remedy = Remedy("cache", None)
                raise
            skipped = result.skipped
            break

        def angles(at: Path) -> tuple[list[dict[str, Any]], tuple]:
            with open_store(at) as store:
                entries = store_angles(store, center=center, max_pairs=max_pairs, seed=seed,
                                       subspace_k=subspace_k, progress=angles_progress)
                return entries, skipped or tuple(store.skipped)

        entries, skipped = _ranks_angles(path, angles)
        return entries, reused, skipped

    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / cache_name(subject, images, stages, dtype)
        entries, reused, skipped = run(path)
        return GeometryResult(entries, path, reused, skipped)
    with scratch_folder() as scratch:  # removed on SIGTERM too; a SIGKILLed run's by the next run
        entries, _, skipped = run(scratch / "activations.h5")
    return GeometryResult(entries, None, False, skipped)


def _ranks_angles(path: Path, angles: Callable[[Path], T]) -> T:
    """``angles(store)`` of rank 0's store ``path``; under torchrun on every rank when every rank can open it.

    Rank 0 has written (or reused) the store and closed it. When every rank opens it (one
    machine, or a shared folder: the same file, by its ``_IDENTITY``), every rank reads it and :func:`store_angles` splits each
    float32 stage's Gram tiles among them (the medians are one process's); rank 0 keeps
    the file (its scratch store) until every rank is done. Otherwise rank 0 alone
    computes, with every core of its machine.
    """
    if distributed.world().size == 1:
        return angles(path)
    store = Path(distributed.on_main(lambda: str(path.resolve())))  # after rank 0 closed it

    def opens() -> str | None:  # the file's identity as this rank sees it (None: it cannot open it)
        from ..io.store import open_store

        try:
            with open_store(store, warn_unverified=False) as opened:
                return json.dumps([str(opened.attrs.get(key)) for key in _IDENTITY])
        except StoreError:
            return None

    seen = distributed.everyone(opens)
    if seen[0] is None or any(other != seen[0] for other in seen):  # another machine, another file
        return distributed.on_main(lambda: angles(path))
    result = angles(store)  # store_angles splits the float32 stages among the ranks
    distributed.everyone(lambda: None)  # every rank is done with rank 0's store
    return result
