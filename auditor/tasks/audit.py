"""The one-shot audit: inspect, condition, extract + angles, stability, verdict.

``from auditor import audit`` gives notebooks the same report the CLI prints::

    report = audit("model.safetensors", data="images/", rules=["lemma1_lower_violations>0"])
    report.to_dict()["blocks"][0]["kappa_linear_residual"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.stability import STABILITY_DEFAULTS
from ..errors import Remedy, UsageError
from ..report.document import report_header
from ..report.verdict import METRICS, Rule, evaluate, parse_rule
from .data_request import DataRequest

__all__ = ["AuditOptions", "AuditReport", "audit"]

_DATA_SECTIONS = ("stages", "stability")


@dataclass(frozen=True)
class AuditOptions:
    """Every knob of an audit (the ``config`` section of the report)."""

    arch: str | None = None
    input_size: tuple[int, int] | None = None
    fold_bn: bool = True
    boundary: str = "circular"
    preset: str | None = None
    size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    classes: tuple[str, ...] | None = None
    per_class: int | None = None
    seed: int | None = None  # None: 0, and a data source's own seed for its images
    stages: tuple[str, ...] | None = None
    center: bool = False
    max_pairs: int | None = None
    subspace: int | None = None
    eps: float = STABILITY_DEFAULTS.eps
    directions: int = STABILITY_DEFAULTS.directions
    samples: int = STABILITY_DEFAULTS.samples
    power_iterations: int = STABILITY_DEFAULTS.power_iterations
    dtype: str = STABILITY_DEFAULTS.dtype
    batch_size: int = 32
    workers: int = 0
    device: str = "cpu"
    cache: Path | None = None
    max_iterations: int | None = None  # --boundary zero: Lanczos steps per block operator run (None: the default)

    @property
    def random_seed(self) -> int:
        """The seed of the draws after the image selection (angle pairs, stability samples and directions)."""
        return 0 if self.seed is None else self.seed

    def data_request(self, data: str | Path | None) -> DataRequest:
        """The images ``data`` as these options prepare them, for :func:`auditor.tasks.images.open_data`."""
        return DataRequest(data, arch=self.arch, input_size=self.input_size, preset=self.preset, size=self.size,
                           mean=self.mean, std=self.std, classes=self.classes, per_class=self.per_class,
                           seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe copy (paths as strings; ``seed`` as used by the draws, the images' seed is in ``data``)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["seed"] = self.random_seed
        out["cache"] = str(self.cache) if self.cache else None
        for key in ("input_size", "mean", "std", "classes", "stages"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


@dataclass
class AuditReport:
    """The audit's JSON document plus timings; ``to_dict()`` is the JSON contract."""

    document: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every rule held (or there were none)."""
        return bool(self.document.get("verdict", {}).get("passed", True))

    def to_document(self) -> dict[str, Any]:
        """The ``audit`` report document, as the other tasks' results give theirs."""
        return self.document

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-safe values."""
        from ..report.document import json_safe

        return json_safe(self.document)


def _rules(rules: Sequence[str | Rule], with_data: bool) -> list[Rule]:
    parsed = [r if isinstance(r, Rule) else parse_rule(r) for r in rules]
    if not with_data:
        needing = [str(r) for r in parsed if METRICS[r.metric].section in _DATA_SECTIONS]
        if needing:
            raise UsageError(
                f"rule {needing[0]!r} needs measurements on images, but no image data was given",
                hint="pass {remedy} (a class-per-folder image directory) or drop the rule", remedy=Remedy("data", "DIR"),
            )
    return parsed


def audit(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    rules: Sequence[str | Rule] = (),
    options: AuditOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **overrides: Any,
) -> AuditReport:
    """Audit a checkpoint: conditioning, and with ``data`` class geometry and stability.

    Parameters
    ----------
    checkpoint : str or Path
    data : str or Path, optional
        Class-per-folder image directory; without it only the data-free parts run.
    rules : sequence of str or Rule
        ``METRIC OP NUMBER`` rules; the report's ``verdict`` evaluates them.
    options : AuditOptions, optional
        Defaults as in :class:`AuditOptions`; keyword ``overrides`` replace fields.
    progress : callable, optional
        ``progress(phase, done, total)``; its ``note(phase, text)`` method, where it has one,
        gets the activation store's estimated size before the first image.

    Returns
    -------
    AuditReport

    Raises
    ------
    AuditorError
        Any input the parts refuse; a rule that needs data when none is given.
    """
    from dataclasses import replace

    from .condition import condition
    from ..report.sections import anatomy_sections
    from ..subject import open_subject

    opts = replace(options or AuditOptions(), **overrides)
    parsed = _rules(rules, data is not None)

    def phase(name: str) -> Callable[[int, int], None]:
        if progress is None:
            return lambda done, total: None

        def step(done: int, total: int) -> None:
            progress(name, done, total)

        if callable(getattr(progress, "note", None)):  # the extraction's store estimate, named by its phase
            step.note = lambda text: progress.note(name, text)  # type: ignore[attr-defined]
        return step

    timings: dict[str, float] = {}
    start = time.perf_counter()
    images = None
    if data is None:
        subject = open_subject(checkpoint, arch=opts.arch, input_size=opts.input_size)
    else:  # cheap checks of every data input before any heavy work
        from .images import open_data
        from .stability import check_stability_options

        check_stability_options(eps=opts.eps, directions=opts.directions, samples=opts.samples, dtype=opts.dtype)
        subject, images = open_data(checkpoint, opts.data_request(data))
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    steps = {} if opts.max_iterations is None else {"max_iterations": opts.max_iterations}
    conditioning = condition(subject, fold_bn=opts.fold_bn, boundary=opts.boundary, device=opts.device,
                             progress=phase("conditioning"), **steps)
    timings["condition"] = time.perf_counter() - start
    anatomy = anatomy_sections(subject.anatomy)
    document: dict[str, Any] = {
        **report_header("audit", subject),
        "config": opts.to_dict(),
        "layers": [layer.to_dict() for layer in conditioning.layers],
        "blocks": conditioning.block_entries(),
        "summary": conditioning.summary(),
        "anatomy": {"stages": anatomy["stages"], "penultimate": anatomy["penultimate"]},
    }
    if images is None:
        document["notes"] = ["no --data given: class geometry and stability were not measured"]
    else:
        from .geometry import stage_geometry
        from .stability import subject_stability

        document["data"] = images.section()
        start = time.perf_counter()
        geometry = stage_geometry(
            subject, images, cache=opts.cache, stages=opts.stages, center=opts.center, max_pairs=opts.max_pairs,
            seed=opts.random_seed, subspace_k=opts.subspace, batch_size=opts.batch_size, workers=opts.workers,
            device=opts.device, extract_progress=phase("extract"), angles_progress=phase("angles"),
        )
        timings["extract+angles"] = time.perf_counter() - start
        document["stages"] = geometry.stages
        from .geometry import separation_warning

        undefined = separation_warning(geometry.stages)
        if undefined:
            document.setdefault("notes", []).append(undefined)
        if geometry.skipped:
            from .images import skipped_message

            document["data"] = images.section(geometry.skipped)  # counts what was used
            document.setdefault("notes", []).append(skipped_message(images.dataset.root, geometry.skipped))
        start = time.perf_counter()
        stability = subject_stability(
            subject, images, eps=opts.eps, directions=opts.directions, samples=opts.samples,
            power_iterations=opts.power_iterations, seed=opts.random_seed, device=opts.device, dtype=opts.dtype,
            bounds=conditioning.bounds(), progress=phase("stability"),
        )
        timings["stability"] = time.perf_counter() - start
        document["stability"] = stability.report.to_dict()
    document["verdict"] = evaluate(parsed, document)
    return AuditReport(document, timings)
