"""Where a stage's activation is captured: the metadata type the store writes and the anatomy finds."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StageSpec"]


@dataclass(frozen=True)
class StageSpec:
    """Where to capture a stage's activation.

    ``hook`` is ``"input"`` (forward pre-hook: the module's first input) or
    ``"output"`` (forward hook). ``shape`` excludes the batch axis.
    """

    name: str
    module_path: str
    hook: str
    shape: tuple[int, ...]

    @property
    def location(self) -> str:
        """``module_path:hook``, as stored in HDF5 attributes."""
        return f"{self.module_path}:{self.hook}"
