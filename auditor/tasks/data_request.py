"""What a command asks of its images, before anything is loaded: a :class:`DataRequest`.

Torch-free (the command line builds one from its options, so that a usage error never waits
for torch); :func:`auditor.tasks.images.open_data` opens a checkpoint and its images from it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["DataRequest"]


@dataclass(frozen=True)
class DataRequest:
    """The images of a run and how the network sees them: one value for every command that reads images.

    Parameters
    ----------
    data : str or Path, optional
        Class-per-folder image directory or the name of a data source
        (:mod:`auditor.io.data_sources`); None where a command runs without images.
    classes : tuple of str, optional
        The classes to use, in this order (default all).
    per_class : int, optional
        Images per class, sampled with ``seed`` (default all).
    seed : int, optional
        Seed of the image selection; None: a data source's own seed, else 0.
    arch : str, optional
        Registry name or ``path/to/model.py:factory`` (as in :func:`auditor.subject.open_subject`).
    input_size : (int, int), optional
        Input height and width; default from the checkpoint's metadata, else its family's.
    preset, size, mean, std
        Preprocessing (see :func:`auditor.io.images.resolve_preprocessing`); None: the
        checkpoint's own, else the preset's.
    """

    # which images
    data: str | Path | None = None
    classes: tuple[str, ...] | None = None
    per_class: int | None = None
    seed: int | None = None
    # the network that sees them, and how they are prepared for it
    arch: str | None = None
    input_size: tuple[int, int] | None = None
    preset: str | None = None
    size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def random_seed(self) -> int:
        """The seed of the draws after the image selection (None counts as 0)."""
        return 0 if self.seed is None else self.seed

    def image_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`auditor.tasks.images.open_images`."""
        return dict(preset=self.preset, size=self.size, mean=self.mean, std=self.std, classes=self.classes,
                    per_class=self.per_class, seed=self.seed)

    def options(self) -> dict[str, Any]:
        """Every field but ``data``, by name (for an options record such as ``AuditOptions``)."""
        return {field.name: getattr(self, field.name) for field in fields(self) if field.name != "data"}
