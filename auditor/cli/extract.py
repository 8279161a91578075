"""``resdyn extract``: stage activations of real images into an HDF5 store."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ._data_options import ClassesOpt, MeanOpt, PerClassOpt, PresetOpt, SeedOpt, SizeOpt, StdOpt, data_request
from ._options import (
    ArchOpt, BatchOpt, CheckpointArg, DataOpt, Device, DeviceOpt, InputSizeOpt, NoProgressOpt, StagesOpt, split_list,
)

__all__ = ["register", "DType", "Compression"]


class DType(str, Enum):
    """Stored precision."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Compression(str, Enum):
    """HDF5 compression filter."""

    none = "none"
    lzf = "lzf"
    gzip = "gzip"


OutStoreOpt = Annotated[
    Path, typer.Option("--output", "-o", help="The HDF5 activation store to write.", dir_okay=False, show_default=False)
]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Stored precision (float16 overflow is detected, never stored as inf).")]
CompressionOpt = Annotated[Compression, typer.Option("--compression", help="HDF5 compression filter.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Image-decoding worker processes.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing store (or a partial one from other inputs).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Stop at the first unreadable image instead of skipping it.")]


def extract_command(
    checkpoint: CheckpointArg,
    data: DataOpt,
    output: OutStoreOpt,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    preset: PresetOpt = None,
    size: SizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    per_class: PerClassOpt = None,
    seed: SeedOpt = None,
    stages: StagesOpt = None,
    dtype: DTypeOpt = DType.float32,
    compression: CompressionOpt = Compression.none,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = 0,
    device: DeviceOpt = Device.cpu,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Store the activations of every down-sampling stage for real images (resumable after a kill)."""
    request = data_request(data, arch=arch, input_size=input_size, preset=preset, size=size, mean=mean, std=std,
                           classes=classes, per_class=per_class, seed=seed)  # usage errors before torch
    from ..tasks.extract import extract_subject
    from ..tasks.images import open_data
    from ._output import progress_bar, stderr, warn

    subject, images = open_data(checkpoint, request)
    with progress_bar("extract", enabled=not no_progress, unit="images") as update:
        result = extract_subject(subject, images, output, stages=split_list(stages), dtype=dtype.value,
                                 compression=compression.value, batch_size=batch_size, workers=workers,
                                 device=device.value, overwrite=overwrite, strict=strict, progress=update)
    if result.skipped:
        warn(f"{len(result.skipped)} unreadable image(s) skipped (listed in the file's 'skipped' attribute): "
             + ", ".join(s["path"] for s in result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else ""))
    resumed = f", resumed after {result.resumed_from}" if result.resumed_from else ""
    stderr.print(f"wrote {result.path}: {result.samples} samples, stages {', '.join(result.stages)}, "
                 f"{result.seconds:.1f} s on {result.device}{resumed}")


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("extract")(extract_command)
