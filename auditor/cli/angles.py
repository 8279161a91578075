"""``resdyn angles``: median principal angles per stage of activation stores or checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, data_request
from ._options import (
    ArchOpt, CacheOpt, CenterOpt, Device, DeviceOpt, Format, FormatOpt, InputSizeOpt, MaxPairsOpt, NoProgressOpt,
    OutputOpt, StagesOpt, SubspaceOpt, resolve_device, split_list,
)

__all__ = ["register"]

InputsArg = Annotated[
    list[Path],
    typer.Argument(help="Activation stores written by 'resdyn extract', or checkpoints (with --data); several "
                   "models are compared side by side.", exists=True),
]
OptionalDataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="Images for the checkpoints: a labeled image folder (class per sub-folder), or the "
                 "NAME of a data source in ./resdyn.toml or ./pyproject.toml. Not needed for stores."),
]
NameOpt = Annotated[
    Optional[list[str]],
    typer.Option("--name", help="A model's name in the table, JSON and figure (default: its file name without "
                 "suffix, folder/name when two share it); once per model, in order.", show_default=False),
]
AnglesPlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Draw angle against stage into this PNG: one panel per model, intra- and "
                 "inter-class angles per class.", dir_okay=False),
]


def angles_command(
    inputs: InputsArg,
    data: OptionalDataOpt = None,
    name: NameOpt = None,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    stages: StagesOpt = None,
    classes: ClassesOpt = None,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    per_class: PerClassOpt = None,
    center: CenterOpt = False,
    subspace: SubspaceOpt = None,
    max_pairs: MaxPairsOpt = None,
    seed: SeedOpt = 0,
    cache: CacheOpt = None,
    plot: AnglesPlotOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Median principal angles within and between classes at every stage (the paper's Definition 1), per model."""
    request = data_request(data, arch=arch, input_size=input_size, preset=preset, size=size, mean=mean, std=std,
                           classes=classes, per_class=per_class, seed=seed)  # usage errors before torch
    from ..report.models_view import models_markdown, models_tables
    from ..tasks.geometry import separation_warning
    from ..tasks.model_angles import models_angles
    from ._output import emit, progress_bar, warn

    with progress_bar("models", enabled=not no_progress and fmt is not Format.json) as update:
        result = models_angles(
            inputs, request, names=name, stages=split_list(stages), center=center, max_pairs=max_pairs,
            subspace_k=subspace, cache=cache, device=resolve_device(device), progress=update,
        )
    document = result.to_document()
    if result.skipped and result.data is not None:
        from ..tasks.images import skipped_message

        warn(skipped_message(result.data["root"], result.skipped))
    for model in result.models:
        undefined = separation_warning(model["stages"])
        if undefined:
            warn(undefined if len(result.models) == 1 else f"{model['name']}: {undefined}")
    if plot is not None:
        from ..distributed import world
        from ..report.figures.models import plot_angles_by_model

        if world().is_main:
            plot_angles_by_model(result.models, plot, classes=result.classes)
    emit(document, fmt, output, table=models_tables, markdown=models_markdown,
         figures=[plot] if plot is not None else [])  # html embeds it


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("angles")(angles_command)
