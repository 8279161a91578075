"""Class geometry across the checkpoints of a training run (``resdyn trajectory``).

:func:`collect_checkpoints` expands files, folders and globs; :func:`order_checkpoints`
orders opened subjects by their ``epoch`` metadata (natural file-name order when
one lacks it); :func:`trajectory` runs :func:`auditor.tasks.geometry.stage_geometry`
on each, in that order.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import InputError
from ..subject import Subject

__all__ = ["CHECKPOINT_SUFFIXES", "TrajectoryResult", "collect_checkpoints", "order_checkpoints", "trajectory"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")
Progress = Callable[[int, int], None]


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def collect_checkpoints(items: Sequence[str | Path]) -> list[Path]:
    """Expand folders and globs into checkpoint files (natural order; duplicates removed).

    Raises
    ------
    InputError
        A folder without checkpoint files; a name that is no file, folder or matching glob.
    """
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted((p for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES), key=_natural_key)
            if not matches:
                raise InputError(f"{item}: no checkpoint files in this folder",
                                 hint="resdyn reads " + ", ".join(CHECKPOINT_SUFFIXES))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted((Path(p) for p in glob.glob(str(item)) if Path(p).is_file()), key=_natural_key)
            if not matches:
                raise InputError(f"{item}: no such file, folder or matching checkpoint")
        found.extend(m for m in matches if m not in found)
    return found


def _epoch(subject: Subject) -> int | float | None:
    raw = subject.checkpoint.metadata.get("epoch")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return int(value) if value is not None and value.is_integer() else value


def order_checkpoints(subjects: Sequence[Subject]) -> tuple[list[int], list[int | float | None], str]:
    """The order in which to report ``subjects``, their epochs, and a note when the order is a guess.

    Returns
    -------
    order : list of int
        Indices into ``subjects``: by ``epoch`` metadata (ties by natural file
        name) when every checkpoint has one, else as given.
    epochs : list of int, float or None
        The ``epoch`` metadata of each subject, in the given order.
    note : str
        Empty, or why the order is by file name.
    """
    epochs = [_epoch(s) for s in subjects]
    if all(e is not None for e in epochs):
        order = sorted(range(len(subjects)), key=lambda i: (epochs[i], _natural_key(subjects[i].checkpoint.path)))
        return order, epochs, ""
    return (list(range(len(subjects))), epochs,
            "no 'epoch' metadata in every checkpoint: ordered by natural sort of the file names")


@dataclass(frozen=True)
class TrajectoryResult:
    """Median principal angles per stage for each checkpoint, in training order.

    Attributes
    ----------
    series : list of dict
        One point per checkpoint: epoch, checkpoint, sha256, arch, store, reused_store, stages.
    data : dict
        The ``data`` section (the same images for every checkpoint).
    config : dict
    order_note : str
        Empty, or why the order is by file name.
    skipped : tuple of dict
        ``{path, reason}`` of unreadable images left out.
    """

    series: list[dict[str, Any]]
    data: dict[str, Any]
    config: dict[str, Any]
    order_note: str = ""
    skipped: tuple[dict[str, str], ...] = ()

    def to_document(self) -> dict[str, Any]:
        """The ``trajectory`` report (JSON contract of ``resdyn trajectory``)."""
        from ..report.document import report_header

        document = {**report_header("trajectory"), "data": self.data, "config": self.config, "series": self.series}
        if self.order_note:
            document["order_note"] = self.order_note
        return document


def trajectory(
    checkpoints: Sequence[str | Path],
    data: str | Path,
    *,
    arch: str | None = None,
    input_size: tuple[int, int] | None = None,
    stages: Sequence[str] | None = None,
    image_options: dict[str, Any] | None = None,
    seed: int | None = None,
    cache: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> TrajectoryResult:
    """Class geometry of every checkpoint of a training run on the same images.

    Parameters
    ----------
    checkpoints : sequence of str or Path
        Files, folders of per-epoch checkpoints, or glob patterns (see :func:`collect_checkpoints`).
    data : str or Path
        Class-per-folder image directory.
    arch, input_size
        As in :func:`auditor.subject.open_subject`.
    stages : sequence of str, optional
        Stage names (default all).
    image_options : dict, optional
        Keyword arguments of :func:`auditor.tasks.images.open_images` (preset, size,
        mean, std, classes, per_class); ``seed`` is added.
    seed : int or None
        Seed of the image selection and of the angles' pair sampling; None: 0, and a
        data source's own seed for its images.
    cache : Path, optional
        Keep the activation stores here and reuse them (see :func:`auditor.tasks.geometry.stage_geometry`).
    device : str
    progress : callable, optional
        ``progress(done, total)`` over the checkpoints.

    Returns
    -------
    TrajectoryResult
    """
    from ..subject import open_subject
    from .geometry import stage_geometry
    from .images import open_images

    chosen = {**(image_options or {}), "seed": seed}  # None: a data source's seed picks the images
    random_seed = 0 if seed is None else seed
    paths = collect_checkpoints(checkpoints)
    if not paths:
        raise InputError("no checkpoints given")
    subjects = [open_subject(p, arch=arch, input_size=input_size) for p in paths]
    order, epochs, note = order_checkpoints(subjects)
    stage_names = list(stages) if stages else None

    def point(done: int) -> tuple[dict[str, Any], tuple, Any]:
        index = order[done]
        subject = subjects[index]
        images = open_images(data, subject, **chosen)
        result = stage_geometry(subject, images, cache=cache, stages=stage_names, seed=random_seed, device=device)
        entry = {
            "epoch": epochs[index] if epochs[index] is not None else done,
            "checkpoint": str(paths[index]),
            "sha256": subject.checkpoint.sha256,
            "arch": subject.loaded.arch,
            "store": str(result.store) if result.store else None,
            "reused_store": result.reused,
            "stages": result.stages,
        }
        return entry, result.skipped, images if done == len(order) - 1 else None

    # one unit per checkpoint, split across the ranks under torchrun (one rank: a loop)
    points = distributed.compute(len(order), point, progress=progress)
    series = [entry for entry, _, _ in points]
    skipped = next((s for _, s, _ in points if s), ())  # the same images for every checkpoint
    images = points[-1][2]
    config = {"seed": random_seed, "per_class": chosen.get("per_class"), "stages": stage_names}
    return TrajectoryResult(series, images.section(skipped), config, note, skipped)
