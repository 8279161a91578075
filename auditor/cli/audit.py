"""``resdyn audit``: the one-shot report for people and CI pipelines."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..analysis.stability import STABILITY_DEFAULTS
from ..errors import ExitCode
from .reference import metrics_help
from .ci_reports import JunitOpt, StepSummaryOpt, junit_to, step_summary_file
from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, data_request
from ._options import (
    ArchOpt, BatchOpt, Boundary, BoundaryOpt, CacheOpt, CenterOpt, CheckpointArg, Device, DeviceOpt, DirectionsOpt,
    EpsOpt, Format, FormatOpt, InputSizeOpt, MaxPairsOpt, NoFoldOpt, NoProgressOpt, OutputOpt, PowerOpt, Precision,
    MaxIterationsOpt, PrecisionOpt, SamplesOpt, StagesOpt, SubspaceOpt, check_data_early, resolve_device, split_list,
)

__all__ = ["register"]

OptionalDataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Labeled image folder (class per sub-folder), or the NAME of a data source in "
                 "./resdyn.toml or ./pyproject.toml. Without it only the data-free parts run."),
]
FailOnOpt = Annotated[
    Optional[list[str]],
    typer.Option("--fail-on", help="Rule METRIC OP NUMBER, e.g. 'max_kappa_linear_residual>1e4' (repeatable); "
                 "exit 1 when one holds (OP: > >= < <= == !=). The metrics (also `resdyn metrics`):"
                 + metrics_help()),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML file with fail-on rules (default: ./resdyn.toml, else [tool.resdyn] in ./pyproject.toml).",
                 exists=True, dir_okay=False),
]
PlotsOpt = Annotated[Optional[Path], typer.Option("--plots", help="Write PNG figures into this folder.", file_okay=False)]


def audit_command(
    checkpoint: CheckpointArg,
    data: OptionalDataOpt = None,
    fail_on: FailOnOpt = None,
    config: ConfigOpt = None,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    no_fold_bn: NoFoldOpt = False,
    boundary: BoundaryOpt = Boundary.circular,
    max_iterations: MaxIterationsOpt = None,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    seed: SeedOpt = None,
    stages: StagesOpt = None,
    center: CenterOpt = False,
    max_pairs: MaxPairsOpt = None,
    subspace: SubspaceOpt = None,
    eps: EpsOpt = STABILITY_DEFAULTS.eps,
    directions: DirectionsOpt = STABILITY_DEFAULTS.directions,
    samples: SamplesOpt = STABILITY_DEFAULTS.samples,
    power_iterations: PowerOpt = STABILITY_DEFAULTS.power_iterations,
    dtype: PrecisionOpt = Precision(STABILITY_DEFAULTS.dtype),
    batch_size: BatchOpt = 32,
    cache: CacheOpt = None,
    plots: PlotsOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    junit: JunitOpt = None,
    step_summary: StepSummaryOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Conditioning, class geometry and stability in one report, with --fail-on rules for CI."""
    from ..report.verdict import parse_rule, rules_from_config

    config_rules, _ = rules_from_config(config)
    rules = [parse_rule(r) for r in [*config_rules, *(fail_on or [])]]  # malformed rules fail before any work
    summary_file = step_summary_file(step_summary)
    check_data_early(data)
    if data is not None:  # stability runs: its eps floor before torch loads
        from ..analysis.stability.options import check_eps

        check_eps(eps, dtype.value)
    request = data_request(data, arch=arch, input_size=input_size, preset=preset, size=size, mean=mean, std=std,
                           classes=classes, per_class=per_class, seed=seed)
    from ..tasks.audit import AuditOptions, audit  # the library (torch, numpy) only past the usage checks
    from ..report.audit_view import audit_markdown, audit_tables
    from ._output import emit, progress_bar, stderr

    options = AuditOptions(
        **request.options(), fold_bn=not no_fold_bn, boundary=boundary.value,
        stages=tuple(split_list(stages) or ()) or None, center=center, max_pairs=max_pairs,
        subspace=subspace, eps=eps, directions=directions, samples=samples, power_iterations=power_iterations,
        dtype=dtype.value, batch_size=batch_size, device=resolve_device(device), cache=cache,
        max_iterations=max_iterations,
    )
    with progress_bar("audit", enabled=not no_progress and fmt is not Format.json) as update:
        shown = {"phase": ""}

        def progress(phase: str, done: int, total: int) -> None:
            if phase != shown["phase"] and hasattr(update, "note"):  # the phase, and its note (the store's size)
                shown["phase"] = phase
                update.note(phase)
            update(done, total)

        def note(phase: str, text: str) -> None:  # comes before the phase's first progress call
            shown["phase"] = phase
            update.note(f"{phase}: {text}")

        if hasattr(update, "note"):
            progress.note = note  # type: ignore[attr-defined]

        report = audit(checkpoint, data=data, rules=rules, options=options, progress=progress)
    from ..report.normalization import dropped_normalization
    from ._output import warn

    dropped = dropped_normalization(report.document)
    if dropped:
        warn(dropped)
    skipped = report.document.get("data", {}).get("skipped")
    if skipped:  # in every format, on stderr (the report lists them too)
        from ..tasks.images import skipped_message

        warn(skipped_message(report.document["data"]["root"], skipped))
    if report.document.get("stages"):
        from ..tasks.geometry import separation_warning

        undefined = separation_warning(report.document["stages"])
        if undefined:
            warn(undefined)
    from ..distributed import world

    speaks = world().is_main  # under torchrun rank 0 alone writes (emit checks it too)
    from ..report.plots import audit_figures

    with tempfile.TemporaryDirectory(prefix="resdyn-figures-") as scratch:
        written: list[Path] = []
        if plots is not None:
            from ..errors import OutputError

            try:
                written = audit_figures(plots, report.document)
            except OutputError as exc:
                exc.hint = "pass --plots a writable folder with enough free space"
                raise
            for path in written:
                stderr.print(f"wrote {path}")
        elif fmt is Format.html and speaks:  # the page embeds the figures even when none are kept
            written = audit_figures(Path(scratch), report.document)
        emit(report.document, fmt, output, table=audit_tables, markdown=audit_markdown, figures=written)
    if junit is not None and speaks:
        junit_to(report.document, junit)
    if summary_file is not None and speaks:
        from ..report.step_summary import append_step_summary

        append_step_summary(summary_file, audit_markdown(report.document))
    if not report.passed:
        raise typer.Exit(int(ExitCode.RULE_FAILED))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("audit")(audit_command)
