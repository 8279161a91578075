"""``resdyn condition``: exact operator spectra and block condition numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import (
    ArchOpt, Boundary, BoundaryOpt, CheckpointArg, Device, DeviceOpt, Format, FormatOpt, InputSizeOpt, MaxIterationsOpt,
    NoFoldOpt, NoProgressOpt, OutputOpt, resolve_device,
)

__all__ = ["register"]


SaveSpectraOpt = Annotated[
    Optional[Path],
    typer.Option("--save-spectra", help="Write every layer's full singular values to this HDF5 file.", dir_okay=False),
]


def condition_command(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    no_fold_bn: NoFoldOpt = False,
    boundary: BoundaryOpt = Boundary.circular,
    max_iterations: MaxIterationsOpt = None,
    save: SaveSpectraOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Singular values of every convolution as an operator, and block condition numbers with Lemma 1 checks."""
    from ..errors import UsageError
    from ..subject import open_subject, parse_input_size

    if save is not None and boundary is Boundary.zero:
        raise UsageError("--save-spectra needs --boundary circular (zero gives only the extremes)")
    size = parse_input_size(input_size)  # usage errors before torch is imported
    from ..tasks.condition import condition
    from ..report.condition_view import condition_markdown, condition_tables
    from ._output import emit, progress_bar

    subject = open_subject(checkpoint, arch=arch, input_size=size)
    with progress_bar("spectra", enabled=not no_progress and fmt is not Format.json, unit="ops") as update:
        report = condition(
            subject, fold_bn=not no_fold_bn, boundary=boundary.value, device=resolve_device(device),
            keep_spectra=save is not None, progress=update,
            **({} if max_iterations is None else {"max_iterations": max_iterations}),
        )
    document = report.to_document()
    if save is not None:
        from ..errors import OutputError
        from ..tasks.condition import save_spectra

        try:
            save_spectra(save, report)
        except OutputError as exc:
            exc.hint = "pass --save-spectra a writable path with enough free space"
            raise
    emit(document, fmt, output, table=condition_tables, markdown=condition_markdown)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("condition")(condition_command)
