"""``resdyn stability``: how small perturbations grow or shrink through the blocks."""

from __future__ import annotations

import typer

from ..analysis.stability import STABILITY_DEFAULTS
from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, data_request
from ._options import (
    ArchOpt, CheckpointArg, DataOpt, Device, DeviceOpt, DirectionsOpt, EpsOpt, Format, FormatOpt, InputSizeOpt,
    NoProgressOpt, OutputOpt, PlotOpt, PowerOpt, Precision, PrecisionOpt, SamplesOpt, check_data_early, resolve_device,
)

__all__ = ["register"]


def stability_command(
    checkpoint: CheckpointArg,
    data: DataOpt,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    eps: EpsOpt = STABILITY_DEFAULTS.eps,
    directions: DirectionsOpt = STABILITY_DEFAULTS.directions,
    samples: SamplesOpt = STABILITY_DEFAULTS.samples,
    power_iterations: PowerOpt = STABILITY_DEFAULTS.power_iterations,
    dtype: PrecisionOpt = Precision(STABILITY_DEFAULTS.dtype),
    seed: SeedOpt = None,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    plot: PlotOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Perturbation amplification per block at real inputs, BatchNorm's effect, and the end-to-end error (Lemmas 2, 3)."""
    request = data_request(data, arch=arch, input_size=input_size, preset=preset, size=size, mean=mean, std=std,
                           classes=classes, per_class=per_class, seed=seed)  # usage errors before torch
    check_data_early(data)
    from ..analysis.stability.options import check_eps

    check_eps(eps, dtype.value)  # before torch loads
    from ..tasks.stability import check_stability_options

    check_stability_options(eps=eps, directions=directions, samples=samples, dtype=dtype.value)
    from ..tasks.images import open_data, skipped_message
    from ..report.stability_view import stability_report_markdown, stability_report_tables
    from ..tasks.stability import subject_stability
    from ._output import emit, progress_bar, warn

    subject, images = open_data(checkpoint, request)
    # one bar: the conditioning (for the Lemma 1 bounds), then the blocks
    with progress_bar("stability", enabled=not no_progress and fmt is not Format.json) as update:
        result = subject_stability(
            subject, images, eps=eps, directions=directions, samples=samples, power_iterations=power_iterations,
            seed=STABILITY_DEFAULTS.seed if seed is None else seed, device=resolve_device(device), dtype=dtype.value,
            condition_progress=update, progress=update,
        )
    if result.skipped:
        warn(skipped_message(images.dataset.root, result.skipped))
    document = result.to_document()
    from ..report.normalization import dropped_normalization

    dropped = dropped_normalization(document)
    if dropped:
        warn(dropped)
    if plot is not None:
        from ..report.plots import stability_figure

        stability_figure(document, plot)
    emit(document, fmt, output, table=stability_report_tables, markdown=stability_report_markdown,
         figures=[plot] if plot is not None else [])


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("stability")(stability_command)
