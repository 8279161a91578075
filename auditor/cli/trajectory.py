"""``resdyn trajectory``: median principal angles per stage across training epochs."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import InputError
from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, image_options
from ._options import ArchOpt, DataOpt, Device, DeviceOpt, Format, FormatOpt, InputSizeOpt, NoProgressOpt, OutputOpt, split_list

__all__ = ["register", "collect_checkpoints"]

_SUFFIXES = (".safetensors", ".pt", ".pth", ".th", ".bin", ".ckpt")

CheckpointsArg = Annotated[
    list[str], typer.Argument(help="Checkpoints: files, folders of per-epoch checkpoints, or quoted glob patterns.")
]
CacheOpt = Annotated[
    Optional[Path],
    typer.Option("--cache", help="Keep activation stores here and reuse them when their inputs match.", file_okay=False),
]
StagesOpt = Annotated[Optional[str], typer.Option("--stages", help="Comma-separated stages (default: all).")]
PlotOpt = Annotated[
    Optional[Path], typer.Option("--plot", help="Draw one panel per stage, angles against epoch, into this PNG.", dir_okay=False)
]


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def collect_checkpoints(items: list[str]) -> list[Path]:
    """Expand folders and globs into checkpoint files (natural order; duplicates removed)."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted((p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES), key=_natural_key)
            if not matches:
                raise InputError(f"{item}: no checkpoint files in this folder", hint="resdyn reads " + ", ".join(_SUFFIXES))
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted((Path(p) for p in glob.glob(item) if Path(p).is_file()), key=_natural_key)
            if not matches:
                raise InputError(f"{item}: no such file, folder or matching checkpoint")
        found.extend(m for m in matches if m not in found)
    return found


def _epoch(subject: Any) -> int | float | None:
    raw = subject.checkpoint.metadata.get("epoch")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return int(value) if value is not None and value.is_integer() else value


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
    seed: SeedOpt = 0,
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
    paths = collect_checkpoints(checkpoints)
    from ..tasks.images import open_images
    from ..tasks.geometry import stage_geometry
    from ..report.document import SCHEMA_VERSION, tool_info
    from ..subject import open_subject
    from ._output import emit, progress_bar
    from .condition import resolve_device

    target = resolve_device(device)
    subjects = [open_subject(p, arch=arch, input_size=shape) for p in paths]
    epochs = [_epoch(s) for s in subjects]
    note = ""
    if all(e is not None for e in epochs):
        order = sorted(range(len(subjects)), key=lambda i: (epochs[i], _natural_key(paths[i])))
    else:
        order = list(range(len(subjects)))
        note = "no 'epoch' metadata in every checkpoint: ordered by natural sort of the file names"
    series = []
    skipped: tuple = ()
    stage_names = split_list(stages)
    with progress_bar("checkpoints", enabled=not no_progress and fmt is not Format.json) as update:
        for done, index in enumerate(order):
            subject = subjects[index]
            images = open_images(data, subject, **chosen)
            result = stage_geometry(subject, images, cache=cache, stages=stage_names, seed=seed, device=target)
            skipped = skipped or result.skipped  # the same images for every checkpoint
            series.append({
                "epoch": epochs[index] if epochs[index] is not None else done,
                "checkpoint": str(paths[index]),
                "sha256": subject.checkpoint.sha256,
                "arch": subject.loaded.arch,
                "store": str(result.store) if result.store else None,
                "reused_store": result.reused,
                "stages": result.stages,
            })
            update(done + 1, len(order))
    document = {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_info(),
        "command": "trajectory",
        "data": images.section(skipped),
        "config": {"seed": seed, "per_class": per_class, "stages": stage_names},
        "series": series,
    }
    if note:
        document["order_note"] = note
    if skipped:
        from ..tasks.images import skipped_message
        from ._output import warn

        warn(skipped_message(images.dataset.root, skipped))
    if plot is not None:
        from ..report.plots import plot_angle_trajectory

        plot_angle_trajectory([p["epoch"] for p in series], [p["stages"] for p in series], plot,
                              title=f"Median principal angles across training, {series[0]['arch']}")
    emit(document, fmt, output, table=_tables, markdown=_markdown)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("trajectory")(trajectory_command)
