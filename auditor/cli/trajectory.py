"""``resdyn trajectory``: median principal angles per stage (and block kappas) across the epochs of training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, data_request
from ._options import (
    ArchOpt, CacheOpt, DataOpt, Device, DeviceOpt, Format, FormatOpt, InputSizeOpt, NoFoldOpt, NoProgressOpt,
    OutputOpt, StagesOpt, resolve_device, split_list,
)

__all__ = ["register"]

CheckpointsArg = Annotated[
    list[str],
    typer.Argument(help="Training runs: each folder of per-epoch checkpoints, or quoted glob pattern, is a run; "
                   "checkpoint files are grouped into one run per folder."),
]
NameOpt = Annotated[
    Optional[list[str]],
    typer.Option("--name", help="A run's name in the table, JSON and figure (default: its folder's name); "
                 "once per run, in the runs' order.", show_default=False),
]
ConditionOpt = Annotated[
    bool,
    typer.Option("--condition", help="Also each block's paper and exact kappa and Lemma 1's verdicts per checkpoint "
                 "(cached in --cache by the checkpoint's digest)."),
]
TrajectoryPlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Draw the angles into this PNG: one column per run, a row per stage, against epoch.",
                 dir_okay=False),
]
KappaPlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot-condition", help="With --condition: draw the blocks' kappas against epoch into this PNG, "
                 "one panel per run (log scale).", dir_okay=False),
]


def trajectory_command(
    checkpoints: CheckpointsArg,
    data: DataOpt,
    name: NameOpt = None,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    stages: StagesOpt = None,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    seed: SeedOpt = None,
    cache: CacheOpt = None,
    condition: ConditionOpt = False,
    no_fold_bn: NoFoldOpt = False,
    plot: TrajectoryPlotOpt = None,
    plot_condition: KappaPlotOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Median principal angles per stage for each checkpoint of one or more training runs, ordered by epoch."""
    from ..errors import UsageError

    if plot_condition is not None and not condition:
        raise UsageError("--plot-condition draws the kappas of --condition", hint="add --condition")
    request = data_request(data, arch=arch, input_size=input_size, preset=preset, size=size, mean=mean, std=std,
                           classes=classes, per_class=per_class, seed=seed)  # usage errors before torch
    from ..report.trajectory_view import trajectory_markdown, trajectory_tables
    from ..tasks.images import skipped_message
    from ..tasks.trajectory import trajectory
    from ._output import emit, progress_bar, warn

    with progress_bar("checkpoints", enabled=not no_progress and fmt is not Format.json) as update:
        result = trajectory(
            checkpoints, request, names=name, stages=split_list(stages), cache=cache, conditioning=condition,
            fold_bn=not no_fold_bn, device=resolve_device(device), progress=update,
        )
    document = result.to_document()
    if result.skipped:
        warn(skipped_message(result.data["root"], result.skipped))
    from ..distributed import world

    if world().is_main:  # rank 0 draws the figures (under torchrun every rank holds the same report)
        from ..report.figures.runs import trajectory_figures

        trajectory_figures(document, plot, plot_condition)
    drawn = [path for path in (plot, plot_condition) if path is not None]  # html embeds them
    emit(document, fmt, output, table=trajectory_tables, markdown=trajectory_markdown, figures=drawn)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("trajectory")(trajectory_command)
