"""Counts checked against the memory they will need, before any work starts.

A count far beyond what the machine holds (``directions = 10**9``) used to
grow until the kernel killed the process, with no message. Each check here
estimates, from the count alone (and the anatomy where it is known), a lower
bound on the bytes the run will hold at once, and refuses in one line
(:class:`~auditor.errors.UsageError`) naming the limit and the largest count
that fits, when that bound exceeds the memory available now
(``MemAvailable``). Estimates are lower bounds: passing the check does not
promise the run fits, failing it means it cannot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from ..errors import Remedy, UsageError

__all__ = ["available_memory", "check_memory", "stability_bytes", "extract_bytes", "size_text"]

# Bookkeeping per perturbed run of a block (a float64 reference norm, and the Python floats of the
# direction, output and BatchNorm norms and the deltas kept for the report): about 150 bytes.
RUN_BYTES = 150
# Buffer sets an extraction keeps in flight (_BufferPool: one being filled, three queued, one written).
EXTRACT_SETS = 5


def size_text(n: float, *, binary: bool = False) -> str:
    """``n`` bytes for a person: ``13.7 GB``, ``512 MB``, ``40 kB`` (powers of 1000, as ``df -H``), or with
    ``binary`` ``1.5 GiB``, ``512.0 MiB`` (powers of 1024, as ``free -h``: memory)."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("B", "kB", "MB", "GB", "TB"))
    if n < base:
        return f"{n:.0f} B"
    for unit in units[1:-1]:
        n /= base
        if n < base:
            return f"{n:.1f} {unit}"
    return f"{n / base:.1f} {units[-1]}"


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` of ``/proc/meminfo``; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return 2**63 - 1  # unknown: nothing is refused


def check_memory(need: int, what: str, name: str, value: int, per_unit: int) -> None:
    """Refuse ``need`` bytes when more than the memory available.

    Parameters
    ----------
    need : int
        Bytes the run will hold at once (a lower bound).
    what : str
        The count in words (``"60 samples x 1000000000 directions"``).
    name : str
        The argument to lower (a :class:`~auditor.errors.Remedy` name).
    value : int
        Its value now.
    per_unit : int
        Bytes one unit of it costs: the largest value that fits is derived.

    Raises
    ------
    UsageError
        The need exceeds the available memory.
    """
    free = available_memory()
    if need <= free:
        return
    fits = max(1, value - math.ceil((need - free) / max(1, per_unit)))
    raise UsageError(f"{what} need at least {size_text(need, binary=True)} of memory, {size_text(free, binary=True)} is available",
                     hint="lower {remedy} (the most that fits now)", remedy=Remedy(name, fits))


def stability_bytes(samples: int, directions: int, row_bytes: int = 0) -> tuple[int, int]:
    """Lower bound of a stability run's memory and the cost of one more direction.

    ``samples * directions`` runs of bookkeeping, and the perturbed rows of one
    chunk (at least one sample's ``directions`` rows of ``row_bytes``: the
    widest block's input, drawn in float64, and its output).
    """
    per_direction = samples * RUN_BYTES + row_bytes
    return directions * per_direction, per_direction


def extract_bytes(batch_size: int, stage_shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Lower bound of an extraction's memory (its float32 buffer sets) and the cost of one more sample per batch."""
    per_sample = EXTRACT_SETS * 4 * sum(math.prod(shape) for shape in stage_shapes)
    return batch_size * per_sample, per_sample
