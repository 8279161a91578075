"""Class geometry (and block conditioning) across the checkpoints of training runs (``resdyn trajectory``).

:func:`trajectory` groups the checkpoints into named runs
(:func:`auditor.tasks.runs.collect_runs`), orders each run by epoch, and runs
:func:`auditor.tasks.geometry.stage_geometry` on every checkpoint, with
:func:`auditor.tasks.block_kappas.block_kappas` when the conditioning is asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed
from ..errors import InputError
from .data_request import DataRequest
from .runs import CHECKPOINT_SUFFIXES, Run, collect_checkpoints, collect_runs, order_checkpoints

__all__ = ["CHECKPOINT_SUFFIXES", "TrajectoryResult", "collect_checkpoints", "collect_runs", "order_checkpoints",
           "trajectory"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TrajectoryResult:
    """Median principal angles per stage (and block kappas) for each checkpoint of each run.

    Attributes
    ----------
    series : list of dict
        One entry per run, in the order given: ``name``, ``checkpoints`` (in
        training order: epoch, checkpoint, sha256, arch, store, reused_store,
        stages, and ``condition`` when asked for), ``order_note`` when the order
        is by file name, ``data`` when the run's images were prepared otherwise
        than the first run's.
    data : dict
        The ``data`` section of the first run (the same images for every checkpoint).
    config : dict
    skipped : tuple of dict
        ``{path, reason}`` of unreadable images left out.
    """

    series: list[dict[str, Any]]
    data: dict[str, Any]
    config: dict[str, Any]
    skipped: tuple[dict[str, str], ...] = ()

    def to_document(self) -> dict[str, Any]:
        """The ``trajectory`` report (JSON contract of ``resdyn trajectory``)."""
        from ..report.document import report_header

        return {**report_header("trajectory"), "data": self.data, "config": self.config, "series": self.series}


def _units(runs: Sequence[Run]) -> tuple[list[tuple[int, Path, int | float]], list[str]]:
    """Every checkpoint as ``(run index, path, epoch)`` in training order, and each run's order note.

    Only the checkpoints are read here (their ``epoch`` metadata); each unit builds
    its model, so that under torchrun a rank builds only its own.
    """
    from ..models.load import load_checkpoint

    units, notes = [], []
    for index, run in enumerate(runs):
        # the metadata without the weights: one checkpoint's tensors in memory at a time
        read = [dataclasses.replace(load_checkpoint(p), state_dict={}) for p in run.paths]
        order, epochs, note = order_checkpoints(read)
        notes.append(note)
        units.extend((index, run.paths[i], epochs[i] if epochs[i] is not None else rank)
                     for rank, i in enumerate(order))
    return units, notes


def trajectory(
    checkpoints: Sequence[str | Path],
    request: DataRequest,
    *,
    names: Sequence[str] | None = None,
    stages: Sequence[str] | None = None,
    cache: Path | None = None,
    conditioning: bool = False,
    fold_bn: bool = True,
    device: str = "cpu",
    progress: Progress | None = None,
) -> TrajectoryResult:
    """Class geometry of every checkpoint of one or more training runs on the same images.

    Parameters
    ----------
    checkpoints : sequence of str or Path
        Runs: folders of per-epoch checkpoints, glob patterns, or checkpoint files
        (grouped by folder; see :func:`auditor.tasks.runs.collect_runs`).
    request : DataRequest
        The images (a class-per-folder directory or a data source's name), the architecture and
        input size, and the preprocessing, for every checkpoint; its ``seed`` is the seed of the
        image selection and of the angles' pair sampling (None: 0, and a data source's own seed
        for its images).
    names : sequence of str, optional
        One name per run (default: the folder names).
    stages : sequence of str, optional
        Stage names (default all).
    cache : Path, optional
        Keep the activation stores (see :func:`auditor.tasks.geometry.stage_geometry`)
        and the blocks' kappas (see :func:`auditor.tasks.block_kappas.block_kappas`)
        here and reuse them.
    conditioning : bool
        Add every block's paper and exact kappa and Lemma 1's verdicts per checkpoint.
    fold_bn : bool
        Fold eval-mode BatchNorm for the kappas.
    device : str
    progress : callable, optional
        ``progress(done, total)`` over the checkpoints.

    Returns
    -------
    TrajectoryResult

    Raises
    ------
    InputError
        No checkpoints, or an item that names none.
    UsageError
        ``names`` does not give one name per run, or two runs share a name.
    """
    from .block_kappas import block_kappas
    from .geometry import stage_geometry
    from .images import open_data

    random_seed = request.random_seed  # the images: request.seed (None: a data source's seed picks them)
    if not checkpoints:
        raise InputError("no checkpoints given")
    runs = collect_runs(checkpoints, names)
    units, notes = _units(runs)
    stage_names = list(stages) if stages else None

    def point(done: int) -> tuple[dict[str, Any], tuple, Any]:
        _, path, epoch = units[done]
        subject, images = open_data(path, request)
        result = stage_geometry(subject, images, cache=cache, stages=stage_names, seed=random_seed, device=device)
        entry = {
            "epoch": epoch,
            "checkpoint": str(path),
            "sha256": subject.checkpoint.sha256,
            "arch": subject.loaded.arch,
            "store": str(result.store) if result.store else None,
            "reused_store": result.reused,
            "stages": result.stages,
        }
        if conditioning:
            entry["condition"] = block_kappas(subject, cache=cache, fold_bn=fold_bn, device=device).to_dict()
        return entry, result.skipped, images.section(result.skipped)

    # one unit per checkpoint, split across the ranks under torchrun (one rank: a loop)
    points = distributed.compute(len(units), point, progress=progress)
    skipped = next((s for _, s, _ in points if s), ())  # the same images for every checkpoint
    series: list[dict[str, Any]] = []
    first: dict[str, Any] = {}
    for index, run in enumerate(runs):
        mine = [done for unit, done in zip(units, points) if unit[0] == index]
        entry: dict[str, Any] = {"name": run.name, "checkpoints": [e for e, _, _ in mine]}
        if notes[index]:
            entry["order_note"] = notes[index]
        section = mine[-1][2]
        if index == 0:
            first = section
        elif section != first:  # this run's checkpoints prepare the images otherwise
            entry["data"] = section
        series.append(entry)
    config = {"seed": random_seed, "per_class": request.per_class, "stages": stage_names,
              "condition": conditioning, "fold_bn": fold_bn}
    return TrajectoryResult(series, first, config, skipped)
