"""Options shared by the commands that read images (extract, stability, trajectory, audit, angles), and the
one :class:`~auditor.tasks.data_request.DataRequest` built from them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from ..subject import parse_input_size
from ..tasks.data_request import DataRequest
from ._options import split_list

__all__ = ["data_request", "Preset", "PresetOpt", "SizeOpt", "MeanOpt", "StdOpt", "ClassesOpt", "PerClassOpt", "SeedOpt", "parse_triple"]


class Preset(str, Enum):
    """Preprocessing presets."""

    imagenet = "imagenet"
    cifar10 = "cifar10"
    none = "none"


PresetOpt = Annotated[
    Optional[Preset],
    typer.Option("--preset", help="Resize / crop / normalization preset. Default: checkpoint metadata, else by input size."),
]
SizeOpt = Annotated[Optional[int], typer.Option("--size", min=1, help="Final image size (square crop).")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Normalization mean, three numbers a,b,c.")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Normalization std, three positive numbers a,b,c.")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="Comma-separated classes to use, in this order.")]
PerClassOpt = Annotated[Optional[int], typer.Option("--per-class", min=1, help="Images per class, sampled with --seed (default: all).")]
SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", help="Seed of every random choice (default 0; a data source's own seed picks its images).",
                 show_default=False),
]


def parse_triple(text: str | None, option: str) -> tuple[float, float, float] | None:
    """``"0.5,0.5,0.5"`` -> (0.5, 0.5, 0.5)."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UsageError(f"{option} {text!r} is not three numbers", hint=f"e.g. {option} 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


def data_request(
    data: str | Path | None,
    *,
    arch: str | None,
    input_size: str | None,
    preset: Preset | None,
    size: int | None,
    mean: str | None,
    std: str | None,
    classes: str | None,
    per_class: int | None,
    seed: int | None,
) -> DataRequest:
    """The :class:`DataRequest` of the shared options, checked before torch loads.

    Raises
    ------
    UsageError
        A malformed ``--input-size``, ``--mean`` or ``--std`` (in this order).
    """
    shape = parse_input_size(input_size)
    chosen = split_list(classes)
    return DataRequest(
        data=data, arch=arch, input_size=shape, preset=preset.value if preset else None, size=size,
        mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"), classes=tuple(chosen) if chosen else None,
        per_class=per_class, seed=seed,
    )
