"""Shared option types, so that ``--arch``, ``--format``, ``--device`` read the same everywhere."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

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
    "split_list",
]


class Format(str, Enum):
    """Report formats."""

    table = "table"
    json = "json"
    markdown = "markdown"


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


def split_list(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None stays None."""
    if text is None:
        return None
    items = [part.strip() for part in text.split(",") if part.strip()]
    return items or None
