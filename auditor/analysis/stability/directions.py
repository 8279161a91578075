"""The seeded perturbation directions (the random streams of the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .chunks import kept, row_norms

__all__ = ["Directions"]


class Directions:
    """Seeded perturbation rows, drawn chunk by chunk as the runs consume them.

    Row ``j`` is a Gaussian row (drawn in float32) rescaled in float64 to ``eps * reference_norms[j]``
    (rows with a zero reference stay 0), then cast to ``dtype`` (package
    docstring). The rows come out exactly as one draw of all of them would
    give: torch's CPU sampler fills a tensor of 16 or more elements from one
    uniform per element, transformed in blocks of 16, so consecutive draws
    whose sizes are multiples of 16 continue the same stream (checked in the
    tests). Rows of another size are drawn at once, as before. Only a chunk
    is held at a time: all runs of a ResNet-50 layer1 block at 60 samples
    would take 1.5 GB in float64.
    """

    def __init__(
        self, generator: torch.Generator, reference_norms: torch.Tensor, shape: Sequence[int],
        eps: float, dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.generator, self.shape, self.eps, self.dtype, self.device = generator, tuple(shape), eps, dtype, device
        self.reference = reference_norms.double().cpu()
        self.taken = 0
        self.norms: list[float] = []
        row = int(np.prod(self.shape))
        self._all: torch.Tensor | None = None
        if row < 16 or row % 16:
            self._all = self._draw(len(self.reference))

    def _draw(self, rows: int) -> torch.Tensor:
        return torch.randn((rows, *self.shape), generator=self.generator, dtype=torch.float32).double()

    def take(self, rows: int) -> torch.Tensor:
        """The next ``rows`` rows, scaled, in ``dtype`` on the device."""
        start, self.taken = self.taken, self.taken + rows
        d = self._draw(rows) if self._all is None else self._all[start:self.taken]
        scale = self.eps * self.reference[start:self.taken] / row_norms(d)
        # in place: the rows are this call's own (a fresh draw, or rows of the single draw taken once)
        d = d.mul_(scale.reshape(-1, *([1] * len(self.shape)))).to(self.device, self.dtype)
        self.norms.extend(kept(row_norms(d)))
        return d

    def finish(self) -> np.ndarray:
        """Draw any rows not taken yet (so the stream ends where one draw would), and every row's norm."""
        remaining = len(self.reference) - self.taken
        if remaining:
            self.take(remaining)
        self._all = None
        return np.asarray(self.norms, dtype=np.float64)
