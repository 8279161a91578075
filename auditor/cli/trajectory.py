"""``resdyn trajectory``: median principal angles per stage across training epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, image_options
from ._options import (
    ArchOpt, CacheOpt, DataOpt, Device, DeviceOpt, Format, FormatOpt, InputSizeOpt, NoProgressOpt, OutputOpt, PlotOpt,
    StagesOpt, resolve_device, split_list,
)

__all__ = ["register"]

CheckpointsArg = Annotated[
    list[str], typer.Argument(help="Checkpoints: files, folders of per-epoch checkpoints, or quoted glob patterns.")
]


def _mean(values: dict[str, float | None]) -> float | None:
    present = [v for v in values.values() if v is not None]
    return sum(present) / len(present) if present else None


def _rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for point in doc["series"]:
        for stage in point["stages"]:
            rows.append([
                str(point["epoch"]) if point["epoch"] is not None else "-", Path(point["checkpoint"]).name, stage["name"],
                f"{_mean(stage['intra']):.2f}" if _mean(stage["intra"]) is not None else "-",
                f"{_mean(stage['inter']):.2f}" if _mean(stage["inter"]) is not None else "-",
                f"{stage['separation']:.2f}" if stage.get("separation") is not None else "-",
            ])
    return rows


_HEADER = ["epoch", "checkpoint", "stage", "intra mean", "inter mean", "separation"]


def _tables(doc: dict[str, Any]) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Median principal angles across checkpoints (degrees; full matrices in JSON)", title_justify="left")
    for column in _HEADER:
        table.add_column(column, justify="right" if "mean" in column or column == "separation" else "left")
    previous = None
    for row in _rows(doc):
        if previous is not None and row[1] != previous:
            table.add_section()
        previous = row[1]
        table.add_row(*row)
    out: list[Any] = [table]
    if doc.get("order_note"):
        out.append(Text(doc["order_note"], style="yellow"))
    return out


def _markdown(doc: dict[str, Any]) -> str:
    from ..report.markdown import md_table

    return "## resdyn trajectory\n\n" + md_table(_HEADER, _rows(doc))


def trajectory_command(
    checkpoints: CheckpointsArg,
    data: DataOpt,
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
    plot: PlotOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Median principal angles per stage for each checkpoint of a training run, ordered by epoch."""
    from ..subject import parse_input_size

    shape = parse_input_size(input_size)
    chosen = image_options(preset, size, mean, std, classes, per_class, seed)  # usage errors before torch
    from ..tasks.images import skipped_message
    from ..tasks.trajectory import trajectory
    from ._output import emit, progress_bar, warn

    with progress_bar("checkpoints", enabled=not no_progress and fmt is not Format.json) as update:
        result = trajectory(
            checkpoints, data, arch=arch, input_size=shape, stages=split_list(stages), image_options=chosen,
            seed=seed, cache=cache, device=resolve_device(device), progress=update,
        )
    document = result.to_document()
    if result.skipped:
        warn(skipped_message(result.data["root"], result.skipped))
    if plot is not None:
        from ..report.plots import plot_angle_trajectory

        series = result.series
        plot_angle_trajectory([p["epoch"] for p in series], [p["stages"] for p in series], plot,
                              title=f"Median principal angles across training, {series[0]['arch']}")
    emit(document, fmt, output, table=_tables, markdown=_markdown)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("trajectory")(trajectory_command)
