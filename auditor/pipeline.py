"""Stage geometry of a checkpoint on an image folder: extract (or reuse) then angles."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dataset import ImageData
from .errors import StoreError
from .subject import Subject

__all__ = ["GeometryResult", "stage_geometry", "cache_name"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GeometryResult:
    """Stage entries and where the activations came from."""

    stages: list[dict[str, Any]]
    store: Path | None
    reused: bool
    skipped: tuple[dict[str, str], ...]


def cache_name(subject: Subject, images: ImageData, stages: Sequence[str] | None, dtype: str) -> str:
    """A file name that changes whenever the store's content would."""
    digest = hashlib.sha256()
    for part in (
        subject.checkpoint.sha256, subject.loaded.arch, str(images.dataset.root),
        json.dumps(images.preprocessing.to_dict(), sort_keys=True), json.dumps(list(images.dataset.samples)),
        json.dumps(list(stages) if stages else None), dtype, json.dumps(list(subject.anatomy.input_shape)),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"{subject.checkpoint.path.stem}-{digest.hexdigest()[:16]}.h5"


def _reusable(path: Path, subject: Subject) -> bool:
    from .io.store import open_store

    if not path.exists():
        return False
    try:  # a store without checksums (format 1.0) is written again, with them
        with open_store(path, warn_unverified=False) as store:
            return store.checksums and store.attrs.get("checkpoint_sha256") == subject.checkpoint.sha256
    except StoreError:
        return False


def stage_geometry(
    subject: Subject,
    images: ImageData,
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
    without it a temporary store is used and deleted.
    """
    from .extract import extract_activations
    from .geometry import store_angles
    from .io.store import StoreBusyError, StoreExistsError, open_store, wait_for_writer

    def run(path: Path) -> tuple[list[dict[str, Any]], bool, tuple]:
        skipped: tuple = ()
        while not (reused := _reusable(path, subject)):
            try:
                result = extract_activations(
                    subject.loaded.model, subject.anatomy, images.dataset, path,
                    checkpoint_sha256=subject.checkpoint.sha256, arch=subject.loaded.arch, stages=stages,
                    dtype=dtype, batch_size=batch_size, workers=workers, device=device,
                    # Replace only a finished file from other inputs; an unfinished one resumes.
                    progress=extract_progress, overwrite=path.exists(),
                )
            except (StoreBusyError, StoreExistsError):  # another process sharing the cache writes it:
                wait_for_writer(path)  # wait, then reuse (or resume) its store
                continue
            skipped = result.skipped
            break
        with open_store(path) as store:
            entries = store_angles(store, center=center, max_pairs=max_pairs, seed=seed,
                                   subspace_k=subspace_k, progress=angles_progress)
            skipped = skipped or tuple(store.skipped)
        return entries, reused, skipped

    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / cache_name(subject, images, stages, dtype)
        entries, reused, skipped = run(path)
        return GeometryResult(entries, path, reused, skipped)
    with tempfile.TemporaryDirectory(prefix="resdyn-") as scratch:
        entries, _, skipped = run(Path(scratch) / "activations.h5")
    return GeometryResult(entries, None, False, skipped)
