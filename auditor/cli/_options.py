"""Shared option types, so that ``--arch``, ``--format``, ``--device`` read the same everywhere."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..analysis.boundary import BOUNDARIES

__all__ = [
    "Format",
    "Device",
    "CheckpointArg",
    "ArchOpt",
    "InputSizeOpt",
    "FormatOpt",
    "OutputOpt",
    "DeviceOpt",
    "DataOpt",
    "NoProgressOpt",
    "StagesOpt",
    "PlotOpt",
    "CacheOpt",
    "BatchOpt",
    "CenterOpt",
    "SubspaceOpt",
    "MaxPairsOpt",
    "Boundary",
    "NoFoldOpt",
    "BoundaryOpt",
    "EpsOpt",
    "DirectionsOpt",
    "SamplesOpt",
    "PowerOpt",
    "MaxIterationsOpt",
    "Precision",
    "PrecisionOpt",
    "split_list",
    "check_data_early",
    "resolve_device",
]


class Format(str, Enum):
    """Report formats."""

    table = "table"
    json = "json"
    markdown = "markdown"
    html = "html"
    junit = "junit"


# --boundary's choices, from the library's one list of boundary models
Boundary = Enum("Boundary", {name: name for name in BOUNDARIES}, type=str)  # type: ignore[misc]
Boundary.__doc__ = "Boundary model of the convolution operator."


class Precision(str, Enum):
    """Floating-point type of the stability measurements."""

    float32 = "float32"
    float64 = "float64"


class Device(str, Enum):
    """Where tensors run."""

    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint: .safetensors, or .pt/.pth/.th/.bin (read with weights_only=True), or a folder "
        "saved by Hugging Face transformers / timm (config.json beside model.safetensors).",
        exists=True,
        readable=True,
        show_default=False,
    ),
]
ArchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--arch",
        help="Registered architecture (see `resdyn archs`) or path/to/model.py:factory. "
        "Default: checkpoint metadata, else inferred from the weights.",
        show_default=False,
    ),
]
InputSizeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--input-size",
        help="Input H or H,W. Default: checkpoint metadata, else 224 (torchvision) / 32 (CIFAR).",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    Format, typer.Option("--format", "-f", help="Report format.", case_sensitive=False)
]
OutputOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Write the report to FILE (atomically, only after success) instead of stdout.",
        dir_okay=False,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Run tensors on cpu, cuda, or auto (cuda when available).")
]
DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Labeled image folder, one sub-folder per class (ImageFolder layout), or the NAME of a "
        "[data.NAME] source in ./resdyn.toml ([tool.resdyn.data.NAME] in ./pyproject.toml).",
        show_default=False,
    ),
]
NoProgressOpt = Annotated[
    bool, typer.Option("--no-progress", help="No progress bar on stderr.")
]


# -- options of the analyses (each defined here once; the commands and ``audit`` share them)

StagesOpt = Annotated[
    Optional[str],
    typer.Option("--stages", help="Comma-separated stage names (default: every stage and the penultimate features; "
                 "see `resdyn inspect`)."),
]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Draw the command's figure into this PNG file: angle against stage (angles), the "
                 "end-to-end error trajectory (stability), one panel per stage against epoch (trajectory).",
                 dir_okay=False),
]
CacheOpt = Annotated[
    Optional[Path],
    typer.Option("--cache", help="Keep activation stores here and reuse them when their inputs match.", file_okay=False),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
CenterOpt = Annotated[bool, typer.Option("--center", help="Subtract the stage mean first (the paper does not).")]
SubspaceOpt = Annotated[
    Optional[int],
    typer.Option("--subspace", min=1, help="Also report principal angles between class subspaces of dimension K."),
]
MaxPairsOpt = Annotated[
    Optional[int],
    typer.Option("--max-pairs", min=1, help="Sample at most this many pairs per class / class pair (seeded); default exact."),
]
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
def _open_unit_interval(value: float) -> float:
    """``--eps`` must lie in (0, 1): checked while parsing, before torch loads (as every usage error)."""
    if not 0 < value < 1:
        raise typer.BadParameter(f"{value:g} is outside (0, 1). Hint: a relative perturbation such as 1e-3")
    return value


EpsOpt = Annotated[float, typer.Option("--eps", help="Relative perturbation size ||d|| / ||x||, in (0, 1).",
                                       callback=_open_unit_interval)]
DirectionsOpt = Annotated[int, typer.Option("--directions", min=1, help="Seeded random directions per sample.")]
SamplesOpt = Annotated[int, typer.Option("--samples", min=1, help="Images to measure on (spread over the classes).")]
PowerOpt = Annotated[
    int, typer.Option("--power-iterations", min=0, help="Budget of the worst-direction search: Lanczos on each block's Jacobian with the products of this many power steps per sample (0: skip).")
]
MaxIterationsOpt = Annotated[
    Optional[int],
    typer.Option("--max-iterations", min=1,
                 help="--boundary zero: the most Lanczos steps of one run on a block operator (its sigma_max; its "
                 "sigma_min by inverse iteration on an LU); default 300; where the Lanczos basis would exceed 256 MB "
                 "(e.g. 224 px), 80 steps and then restarted Lanczos for sigma_max. A sigma_min not certified within them is no number: a certified interval "
                 "[lower, upper], kappa as an interval, and the reason in the report."),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option("--dtype", help="Floating-point type of the perturbation runs: float32 (fast; --eps at least 1e-5) "
                 "or float64 (slower; --eps at least 1e-13)."),
]


def resolve_device(device: Device) -> str:
    """``auto`` -> cuda when available; ``cuda`` without a GPU is a usage error."""
    from ..tasks.extract import resolve_device as resolve

    return str(resolve(device.value))


def check_data_early(data: Path | None) -> None:
    """Refuse a ``--data`` that is neither a path nor a declared source before torch loads (the source is
    looked up again, the same way, when the images are opened)."""
    if data is not None:
        from ..io.data_sources import resolve_data_source

        resolve_data_source(data)


def split_list(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None stays None."""
    if text is None:
        return None
    items = [part.strip() for part in text.split(",") if part.strip()]
    return items or None
