"""``resdyn condition``: exact operator spectra and block condition numbers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ._options import ArchOpt, CheckpointArg, Device, DeviceOpt, Format, FormatOpt, InputSizeOpt, NoProgressOpt, OutputOpt

if TYPE_CHECKING:
    from ..subject import Subject

__all__ = ["register", "condition_document", "resolve_device"]


class Boundary(str, Enum):
    """Boundary model of the convolution operator."""

    circular = "circular"
    zero = "zero"


NoFoldOpt = Annotated[
    bool, typer.Option("--no-fold-bn", help="Use the raw convolution weights (do not fold eval-mode BatchNorm).")
]
BoundaryOpt = Annotated[
    Boundary,
    typer.Option(
        "--boundary",
        help="circular: all singular values, exact by FFT; zero: exact extremes of the zero-padded "
        "operator by an iterative method (CIFAR-sized inputs).",
    ),
]
SaveSpectraOpt = Annotated[
    Optional[Path],
    typer.Option("--save-spectra", help="Write every layer's full singular values to this HDF5 file.", dir_okay=False),
]


def resolve_device(device: Device) -> str:
    """``auto`` -> cuda when available; ``cuda`` without a GPU is a usage error."""
    from ..extract import resolve_device as resolve

    return str(resolve(device.value))


def condition_document(subject: Subject, report: Any) -> dict[str, Any]:
    """The ``condition`` report document."""
    from ..report.document import SCHEMA_VERSION, tool_info

    return {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_info(),
        "command": "condition",
        "checkpoint": subject.checkpoint_section(),
        "input_shape": list(subject.anatomy.input_shape),
        "config": {"boundary": report.boundary, "fold_bn": report.fold_bn},
        "layers": [layer.to_dict() for layer in report.layers],
        "blocks": report.block_entries(),
        "summary": report.summary(),
    }


def save_spectra(path: Path, subject: Subject, report: Any) -> None:
    """Every layer's singular values into HDF5 (atomically: temp file, then rename)."""
    import errno
    import os
    import tempfile

    import h5py

    from ..errors import OutputError

    temporary: str | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # a file where a folder is needed: say so, not "File exists"
            raise NotADirectoryError(errno.ENOTDIR, f"{exc.filename} is a file, not a folder", exc.filename) from exc
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        with h5py.File(temporary, "w") as h5:
            h5.attrs["format"] = "resdyn-spectra"
            h5.attrs["format_version"] = "1.0"
            h5.attrs["checkpoint_sha256"] = subject.checkpoint.sha256
            h5.attrs["arch"] = subject.loaded.arch
            h5.attrs["boundary"] = report.boundary
            h5.attrs["fold_bn"] = report.fold_bn
            group = h5.create_group("layers")
            for layer in report.layers:
                if layer.singular_values is None:
                    continue
                data = group.create_dataset(layer.name, data=layer.singular_values, compression="gzip",
                                            fletcher32=True)  # every chunk checksummed, as in the stores
                data.attrs["input_shape"] = list(layer.input_shape)
                data.attrs["method"] = layer.method
        os.replace(temporary, path)
    except OSError as exc:  # h5py reports its write failures as OSError too
        raise OutputError(path, exc, hint="pass --save-spectra a writable path with enough free space") from exc
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def condition_command(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    no_fold_bn: NoFoldOpt = False,
    boundary: BoundaryOpt = Boundary.circular,
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
    from ..condition import condition
    from ..report.condition_view import condition_markdown, condition_tables
    from ._output import emit, progress_bar

    subject = open_subject(checkpoint, arch=arch, input_size=size)
    with progress_bar("spectra", enabled=not no_progress and fmt is not Format.json, unit="ops") as update:
        report = condition(
            subject, fold_bn=not no_fold_bn, boundary=boundary.value, device=resolve_device(device),
            keep_spectra=save is not None, progress=update,
        )
    document = condition_document(subject, report)
    if save is not None:
        save_spectra(save, subject, report)
    emit(document, fmt, output, table=condition_tables, markdown=condition_markdown)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("condition")(condition_command)
