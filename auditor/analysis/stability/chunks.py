"""Rows in chunks, and the small per-row and summary statistics the measurements keep.

Every batched tensor holds at most ``_CHUNK_ELEMENTS`` elements (a chunk of
block runs); the norms, distances and ratios are per row (a sample or a run).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "row_norms",
    "kept",
    "repeats",
    "distances",
    "stats",
    "share",
    "ratio_or_nan",
    "rows_per_chunk",
    "row_slices",
    "group_runs",
    "concatenate",
]

# Elements per batched tensor (one chunk of block runs); power iterations use a quarter.
_CHUNK_ELEMENTS = 1 << 22


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row (first axis) over all other axes."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())))  # any memory format, no copy


def kept(values: torch.Tensor) -> list[float]:
    """Per-row results of one chunk, to be kept until the end of a loop, as Python floats.

    Not as a small tensor per chunk: allocated between one chunk's large
    buffers and the next's, each such tensor splits a large free block of the
    (never trimmed, :func:`auditor.runtime.keep_freed_memory`) heap, and the
    next chunk's buffers no longer fit in it. On ResNet-50's layer1 blocks the
    heap grew by about 37 MB per chunk that way (2.2 GB for 0.7 GB in use).
    Python floats live in the interpreter's own arenas. Exact: a float32 or
    float64 value is a Python float.
    """
    return values.detach().cpu().tolist()


def repeats(index: torch.Tensor) -> tuple[int, int, int] | None:
    """``(first, stop, k)`` when ``index`` is ``first, .., first, first + 1, .., stop - 1`` each ``k`` times."""
    n = index.numel()
    if not n:
        return None
    first = int(index[0])
    count = int(index[-1]) - first + 1
    if count <= 0 or n % count:
        return None
    k = n // count
    expected = torch.arange(first, first + count, device=index.device).repeat_interleave(k)
    return (first, first + count, k) if torch.equal(index, expected) else None


def distances(runs: torch.Tensor, reference: torch.Tensor, index: torch.Tensor,
               layout: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``||runs[j] - reference[index[j]]||`` per row.

    When ``index`` repeats consecutive samples ``k`` times each (``layout``, see
    :func:`repeats`), the references are broadcast over the ``k`` runs of their
    sample instead of gathered into a copy: the same differences, one pass less.
    """
    if layout is None:
        return row_norms(runs - reference[index])
    first, stop, k = layout
    difference = runs.unflatten(0, (stop - first, k)) - reference[first:stop].unsqueeze(1)
    return torch.linalg.vector_norm(difference, dim=tuple(range(2, difference.dim()))).reshape(-1)


def stats(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """(min, median, max) of finite ``values``; Nones when empty."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None, None
    return float(values.min()), float(np.median(values)), float(values.max())


def share(values: np.ndarray, kappa: float | None) -> float | None:
    """Share of ``values`` inside ``[1/kappa, kappa]``."""
    if kappa is None or values.size == 0:
        return None
    inside = (values >= 1.0 / kappa) & (values <= kappa)
    return float(inside.mean())


def ratio_or_nan(delta: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """``delta / norm`` with NaN where ``norm`` is zero (callers drop NaN)."""
    out = np.full(delta.shape, np.nan)
    ok = norm > 0
    out[ok] = delta[ok] / norm[ok]
    return out


def rows_per_chunk(*shapes: Sequence[int], budget: int | None = None) -> int:
    budget = _CHUNK_ELEMENTS if budget is None else budget
    per_row = max(int(np.prod(s)) for s in shapes)
    return max(1, budget // max(per_row, 1))


def row_slices(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def group_runs(samples: slice, k: int, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The ``k`` runs of each sample of ``samples``, ``size`` runs at a time: each run's sample, group-local."""
    for rows in row_slices((samples.stop - samples.start) * k, size):
        yield torch.arange(rows.start, rows.stop, device=device) // k


def concatenate(chunks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(chunks)`` in the chunks' memory format, emptying ``chunks`` as it goes."""
    first = chunks[0]
    if len(chunks) == 1:
        return chunks.pop()
    channels_last = first.dim() == 4 and not first.is_contiguous() and first.is_contiguous(
        memory_format=torch.channels_last)
    out = torch.empty((sum(c.shape[0] for c in chunks), *first.shape[1:]), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    start = 0
    chunks.reverse()
    while chunks:
        chunk = chunks.pop()
        out[start:start + chunk.shape[0]].copy_(chunk)
        start += chunk.shape[0]
        del chunk
    return out
