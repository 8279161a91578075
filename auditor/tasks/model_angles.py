"""Median principal angles per stage of one or more models, each an activation store or a checkpoint on images.

:func:`models_angles` runs :func:`auditor.tasks.geometry.store_geometry` on a
store and :func:`auditor.tasks.geometry.stage_geometry` on a checkpoint (its
activations extracted through the same cache as ``trajectory``), one model after
another, and names each model for the comparison figure (the paper's Figure 5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, Remedy, UsageError
from .data_request import DataRequest
from .runs import natural_key

__all__ = ["STORE_SUFFIXES", "ModelsAngles", "is_store", "models_angles", "model_names"]

STORE_SUFFIXES = (".h5", ".hdf5", ".hdf")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
Progress = Callable[[int, int], None]


def is_store(path: Path) -> bool:
    """True for an activation store (an HDF5 suffix, or a file that starts with HDF5's signature)."""
    if path.suffix.lower() in STORE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def model_names(paths: Sequence[Path], names: Sequence[str] | None = None) -> list[str]:
    """Each model's name: ``names``, else its file name without suffix, else (when two share it) folder/file.

    Raises
    ------
    UsageError
        ``names`` does not give one name per model, or two models have the same name.
    """
    if names is not None:
        if len(names) != len(paths):
            raise UsageError(f"{len(names)} name(s) for {len(paths)} model(s)",
                             hint="give one name per model, in the models' order")
        chosen = [str(n) for n in names]
    else:
        chosen = [p.stem for p in paths]
        if len(set(chosen)) < len(chosen):
            chosen = [f"{p.resolve().parent.name}/{p.stem}" for p in paths]
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1}, key=lambda n: natural_key(Path(n)))
    if duplicates:
        raise UsageError(f"two models are named {duplicates[0]!r}", hint="name each model (one name per model)")
    return chosen


@dataclass(frozen=True)
class ModelsAngles:
    """Median principal angles per stage of each model (``resdyn angles``).

    Attributes
    ----------
    models : list of dict
        Per model: ``name``, ``store`` (path, arch, checkpoint_sha256, samples),
        ``checkpoint`` (a checkpoint's path) and ``stages``.
    config : dict
        ``center``, ``max_pairs``, ``seed``, ``subspace``.
    data : dict or None
        The ``data`` section of the first checkpoint's images (None: stores only).
    checkpoint : dict or None
        One checkpoint alone: its ``checkpoint`` section.
    skipped : tuple of dict
        ``{path, reason}`` of unreadable images left out.
    """

    models: list[dict[str, Any]]
    config: dict[str, Any]
    data: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None
    skipped: tuple[dict[str, str], ...] = ()

    @property
    def classes(self) -> list[str]:
        """Every class of the models, in order of appearance (the figure's colours)."""
        found: list[str] = []
        for model in self.models:
            for stage in model["stages"]:
                found.extend(c for c in stage["intra"] if c not in found)
        return found

    def to_document(self) -> dict[str, Any]:
        """The ``angles`` report: ``store``, ``config`` and ``stages`` for one model, ``config`` and ``models`` for several."""
        from ..report.document import report_header

        document: dict[str, Any] = report_header("angles")
        if self.checkpoint is not None:
            document["checkpoint"] = self.checkpoint
        if self.data is not None:
            document["data"] = self.data
        if len(self.models) == 1:
            model = self.models[0]
            return {**document, "store": model["store"], "config": self.config, "stages": model["stages"]}
        return {**document, "config": self.config, "models": self.models}


def models_angles(
    inputs: Sequence[str | Path],
    request: DataRequest | None = None,
    *,
    names: Sequence[str] | None = None,
    stages: Sequence[str] | None = None,
    center: bool = False,
    max_pairs: int | None = None,
    subspace_k: int | None = None,
    cache: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> ModelsAngles:
    """Median principal angles per stage of every model in ``inputs``.

    Parameters
    ----------
    inputs : sequence of str or Path
        Activation stores (``resdyn extract``) or checkpoints, in the order wanted.
    request : DataRequest, optional
        Images for the checkpoints (``request.data``: an image folder or a data source's
        name; required when ``inputs`` holds a checkpoint), with their architecture, input
        size and preprocessing; ``request.classes`` selects the images of a checkpoint and
        the rows of a store, ``request.seed`` (None: 0) seeds the images and the pairs.
    names : sequence of str, optional
        One name per model (see :func:`model_names`).
    stages, center, max_pairs, subspace_k
        As in :func:`auditor.tasks.geometry.store_angles`.
    cache : Path, optional
        Keep the checkpoints' activation stores here and reuse them.
    device : str
    progress : callable, optional
        ``progress(done, total)`` over the models.

    Raises
    ------
    UsageError
        A checkpoint without ``data``; names that do not fit (see :func:`model_names`).
    """
    from .geometry import stage_geometry, store_geometry
    from .images import open_data

    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no store or checkpoint given")
    labels = model_names(paths, names)
    checkpoints = [p for p in paths if not is_store(p)]
    request = request or DataRequest()
    if checkpoints and request.data is None:
        raise UsageError(f"{checkpoints[0]}: a checkpoint needs images to compute its activations",
                         hint="pass {remedy} (a folder or the name of a data source), or give the store "
                         "'resdyn extract' wrote", remedy=Remedy("data", "DIR"))
    seed, classes = request.random_seed, request.classes
    request = dataclasses.replace(request, seed=seed)  # a store's pairs and a checkpoint's images: one seed
    options = dict(center=center, max_pairs=max_pairs, seed=seed, subspace_k=subspace_k)
    models: list[dict[str, Any]] = []
    first_data: dict[str, Any] | None = None
    section: dict[str, Any] | None = None
    skipped: tuple[dict[str, str], ...] = ()
    for index, (path, name) in enumerate(zip(paths, labels)):
        if is_store(path):
            result = store_geometry(path, stages=stages, classes=classes, **options)
            models.append({"name": name, "store": result.store, "stages": result.stages})
        else:
            subject, images = open_data(path, request)
            found = stage_geometry(subject, images, cache=cache, stages=stages, device=device, **options)
            skipped = skipped or found.skipped
            described = images.section(found.skipped)
            first_data = first_data or described
            samples = sum(described["samples_per_class"].values())
            store = {"path": str(found.store) if found.store else None, "arch": subject.loaded.arch,
                     "checkpoint_sha256": subject.checkpoint.sha256, "samples": samples}
            models.append({"name": name, "store": store, "checkpoint": str(path), "stages": found.stages})
            if len(paths) == 1:
                section = subject.checkpoint_section()
        if progress is not None:
            progress(index + 1, len(paths))
    config = {"center": center, "max_pairs": max_pairs, "seed": seed, "subspace": subspace_k}
    return ModelsAngles(models, config, first_data, section, skipped)
