"""What a stability measurement is asked for, and the defaults: one home for the library, the tasks and the CLI.

Neither torch nor numpy: the command line reads these defaults for its options
without loading the numeric stack.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StabilityOptions", "STABILITY_DEFAULTS"]


@dataclass(frozen=True)
class StabilityOptions:
    """The knobs of a stability measurement (see :func:`auditor.analysis.stability.measure_stability`).

    Attributes
    ----------
    eps : float
        Relative perturbation size ``||d|| / ||x||``, in (0, 1).
    directions : int
        Seeded random directions ``K`` per sample.
    samples : int
        Images ``N`` to measure on (the tasks draw them; the library measures the images it is given).
    power_iterations : int
        Most products ``J v`` per sample for the worst direction; 0 skips it.
    power_tolerance : float
        Convergence test of the power iteration (relative change of the gain estimate).
    seed : int
        Seeds every random stream.
    dtype : {"float32", "float64"}
        Working precision of the runs.
    """

    eps: float = 1e-3
    directions: int = 4
    samples: int = 32
    power_iterations: int = 8
    power_tolerance: float = 1e-2
    seed: int = 0
    dtype: str = "float32"


# The defaults of every entry point: measure_stability, the tasks, and the options of
# `resdyn stability` and `resdyn audit`.
STABILITY_DEFAULTS = StabilityOptions()
