"""The audited network: checkpoint + model + anatomy, loaded once per command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # torch-backed; imported by open_subject, so parse_input_size stays cheap
    from .io.checkpoint import Checkpoint
    from .models.anatomy import Anatomy
    from .models.load import LoadedModel

__all__ = ["Subject", "open_subject", "parse_input_size"]


@dataclass(frozen=True)
class Subject:
    """A loaded checkpoint, its model and its anatomy at one input size."""

    checkpoint: Checkpoint
    loaded: LoadedModel
    anatomy: Anatomy
    input_size_source: str

    def checkpoint_section(self) -> dict:
        """The ``checkpoint`` object of the JSON report."""
        return {
            "path": str(self.checkpoint.path),
            "sha256": self.checkpoint.sha256,
            "format": self.checkpoint.format,
            "arch": self.loaded.arch,
            "arch_source": self.loaded.arch_source,
            "arch_reason": self.loaded.arch_reason,
            "family": self.loaded.spec.family,
            "parameters": self.loaded.parameters,
            "num_classes": self.loaded.num_classes,
            "metadata": dict(sorted(self.checkpoint.metadata.items())),  # safetensors keeps no order
            "notes": list(self.checkpoint.notes),
            **({"converted_from": converted} if (converted := self.checkpoint.converted_from) else {}),
        }


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """``"32"`` -> (32, 32); ``"224,160"`` -> (224, 160); validates positivity."""
    if text is None:
        return None
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise UsageError(
            f"input size {text!r} is not a size", hint="use H or H,W with positive integers, e.g. 32 or 224,224"
        )
    return sizes[0], sizes[1]


def _default_size(checkpoint: Checkpoint, loaded: LoadedModel) -> tuple[tuple[int, int], str]:
    pre = checkpoint.meta_json("preprocessing")
    if isinstance(pre, dict) and isinstance(pre.get("size"), int):
        return (pre["size"], pre["size"]), "checkpoint metadata"
    size = loaded.spec.input_size
    source = "family default" if loaded.spec.family != "custom" else "assumed (custom model; pass --input-size)"
    return (size, size), source


def open_subject(
    path: str | Path, *, arch: str | None = None, input_size: tuple[int, int] | None = None
) -> Subject:
    """Load ``path``, build its architecture, and describe its anatomy.

    Parameters
    ----------
    path : str or Path
        Checkpoint file.
    arch : str, optional
        Registry name or ``path/to/model.py:factory``.
    input_size : (int, int), optional
        Input height and width; default from metadata, else the family's.
    """
    from .models.anatomy import analyze_anatomy
    from .models.load import load_checkpoint, load_model

    checkpoint = load_checkpoint(path)
    loaded = load_model(checkpoint, arch)
    if input_size is None:
        input_size, source = _default_size(checkpoint, loaded)
    else:
        source = "--input-size"
    anatomy = analyze_anatomy(loaded.model, (3, *input_size))
    return Subject(checkpoint, loaded, anatomy, source)
