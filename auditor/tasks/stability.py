"""Stability of a checkpoint at real images: the wiring shared by ``resdyn stability`` and the audit.

Samples images from a prepared folder, takes the conditioning bounds (computed
here unless the caller has them) and calls
:func:`auditor.analysis.stability.measure_stability`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import distributed
from ..analysis.stability import STABILITY_DEFAULTS, StabilityReport
from ..analysis.stability.options import MIN_EPS, check_eps
from ..errors import UsageError
from ..subject import Subject
from .bounds import check_memory, stability_bytes
from .images import PreparedImages

__all__ = ["StabilityResult", "MIN_EPS", "check_stability_options", "subject_stability"]

Progress = Callable[[int, int], None]



@dataclass(frozen=True)
class StabilityResult:
    """What :func:`subject_stability` measured, and on what.

    Attributes
    ----------
    subject : Subject
    images : PreparedImages
    report : StabilityReport
        The measurements (``report.to_dict()`` is the ``stability`` section).
    samples : int
        Images asked for (``report.samples`` counts those measured).
    skipped : tuple of dict
        ``{path, reason}`` of unreadable images passed over while sampling.
    """

    subject: Subject
    images: PreparedImages
    report: StabilityReport
    samples: int
    skipped: tuple[dict[str, str], ...] = ()

    def to_document(self) -> dict[str, Any]:
        """The ``stability`` report (JSON contract of ``resdyn stability``)."""
        from ..report.document import report_header

        report = self.report
        return {
            **report_header("stability", self.subject),
            "data": self.images.section(),
            "config": {"eps": report.eps, "directions": report.directions, "samples": self.samples,
                       "seed": report.seed, "power_iterations": report.power_iterations},
            "stability": report.to_dict(),
        }


def check_stability_options(*, eps: float, directions: int, samples: int,
                            dtype: str = STABILITY_DEFAULTS.dtype) -> None:
    """Refuse stability options that would only fail at the end of a long run, or measure nothing.

    Raises
    ------
    UsageError
        ``eps`` outside (0, 1) or below :data:`MIN_EPS` of ``dtype`` (the
        perturbation would drown in rounding); ``directions`` or ``samples``
        below 1; ``dtype`` not float32 or float64.
    """
    check_eps(eps, dtype)
    if directions < 1 or samples < 1:
        raise UsageError(f"directions ({directions}) and samples ({samples}) must be at least 1")
    need, per_direction = stability_bytes(samples, directions)  # before any work: no model needed
    check_memory(need, f"{samples} samples x {directions} directions", "directions", directions, per_direction)


def subject_stability(
    subject: Subject,
    images: PreparedImages,
    *,
    eps: float = STABILITY_DEFAULTS.eps,
    directions: int = STABILITY_DEFAULTS.directions,
    samples: int = STABILITY_DEFAULTS.samples,
    power_iterations: int = STABILITY_DEFAULTS.power_iterations,
    seed: int = STABILITY_DEFAULTS.seed,
    device: str = "cpu",
    dtype: str = STABILITY_DEFAULTS.dtype,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    condition_progress: Progress | None = None,
    progress: Progress | None = None,
) -> StabilityResult:
    """Perturbation amplification per block of ``subject`` at ``samples`` images of ``images``.

    Parameters
    ----------
    subject : Subject
    images : PreparedImages
        From :func:`auditor.tasks.images.open_images`.
    eps, directions, power_iterations, seed, device
        As in :func:`auditor.analysis.stability.measure_stability`.
    dtype : {"float32", "float64"}
        Working precision of the runs (``measure_stability``'s ``dtype``).
    samples : int
        Images to draw, spread over the classes (seeded by ``seed``).
    bounds : mapping, optional
        Lemma 1 bounds per block (``ConditionReport.bounds()``); computed with
        :func:`auditor.tasks.condition.condition` when not given.
    condition_progress, progress : callable, optional
        ``progress(done, total)`` of the conditioning and of the blocks.

    Returns
    -------
    StabilityResult
    """
    import torch

    from ..analysis.stability import measure_stability
    from .condition import condition
    from .images import sample_images

    check_stability_options(eps=eps, directions=directions, samples=samples, dtype=dtype)
    # a chunk holds at least one sample's perturbed rows: inputs drawn in float64, outputs in float32
    widest = max((8 * math.prod(b.input_shape) + 4 * math.prod(b.output_shape) for b in subject.anatomy.blocks),
                 default=0)
    need, per_direction = stability_bytes(samples, directions, widest)
    check_memory(need, f"{samples} samples x {directions} directions", "directions", directions, per_direction)
    sample = sample_images(images, samples, seed)
    if bounds is None:
        # blocks no rule of the linearization covers are measured without Lemma 2 bounds
        bounds = condition(subject, device=device, progress=condition_progress, skip_uncovered=True).bounds()
    options = dict(eps=eps, directions=directions, seed=seed, power_iterations=power_iterations, bounds=bounds,
                   progress=progress, device=device, dtype=getattr(torch, dtype))
    if distributed.world().size == 1:
        report = measure_stability(subject.loaded.model, subject.anatomy, sample.images, **options)
    else:
        report = _split_stability(subject, sample.images, options)
    return StabilityResult(subject, images, report, samples, sample.skipped)


def _split_stability(subject: Subject, images: Any, options: dict[str, Any]) -> StabilityReport:
    """:func:`measure_stability` with its blocks and its trajectory split across the ranks (torchrun).

    Units ``0 .. L-1`` are the blocks, unit ``L`` the trajectory; every block draws
    its random stream from ``seed + index`` alone, so each unit's numbers equal the
    single-process run's, and the report is put together in its order.
    """
    from ..analysis.stability import measure_stability

    anatomy = subject.anatomy
    count = len(anatomy.blocks)
    directions, iterations = int(options["directions"]), int(options["power_iterations"])
    # cost in block passes of one sample: 1 + K random runs and about 5 per power step
    costs = [math.prod(b.input_shape) * (1 + directions + 5 * iterations) for b in anatomy.blocks]
    costs.append(sum(math.prod(b.input_shape) for b in anatomy.blocks) * (1 + directions))

    def share(units: list[int]) -> list[tuple[str, StabilityReport]]:
        report = measure_stability(subject.loaded.model, anatomy, images, **options,
                                   only_blocks=[u for u in units if u < count], with_trajectory=count in units)
        return [(anatomy.blocks[u].name if u < count else "", report) for u in units]

    parts = distributed.compute_shares(count + 1, share, costs=costs)
    blocks, batchnorm = [], []
    for name, report in parts[:count]:
        blocks.extend(b for b in report.blocks if b.name == name)
        batchnorm.extend(b for b in report.batchnorm if b.block == name)
    last = parts[count][1]
    outer = [b for b in last.batchnorm if b.block is None]
    return dataclasses.replace(last, blocks=tuple(blocks), batchnorm=tuple(outer + batchnorm))
