"""What a stability measurement is asked for, and the defaults: one home for the library, the tasks and the CLI.

Neither torch nor numpy: the command line reads these defaults for its options
without loading the numeric stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import Remedy, UsageError

__all__ = ["StabilityOptions", "STABILITY_DEFAULTS", "MIN_EPS", "check_eps"]


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
        Residual test of the worst direction's Lanczos runs (relative residual of the top Ritz value).
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


# Smallest usable eps per working dtype. ``r`` differences two forward passes whose
# rounding is a few units of the dtype's resolution (float32: 6e-8) relative to the
# output, so its relative error is about that over eps: measured against float64 on
# the bundled ResNet-8 (8 images x 2 directions), block r_median off by 0.25 % at
# 1e-5, 1.3 % at 3e-6, 10 % at 1e-6, 56 % at 3e-7 and 9x at 1e-8; far below, the
# perturbation vanishes when added (at 1e-12 every r and end-to-end error read 0.0).
# float64: the same margin over its resolution (1.1e-16).
MIN_EPS = {"float32": 1e-5, "float64": 1e-13}


def check_eps(eps: float, dtype: str) -> None:
    """Refuse a working ``dtype`` resdyn does not have, and an ``eps`` outside (0, 1) or below ``MIN_EPS[dtype]``.

    Neither torch nor numpy: the command line calls it before loading them.

    Raises
    ------
    UsageError
        With the smallest usable eps, and ``dtype="float64"`` as the remedy for float32.
    """
    if dtype not in MIN_EPS:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(MIN_EPS)}")
    if not (0 < eps < 1):
        raise UsageError(f"eps {eps!r} is outside (0, 1)", hint="a relative perturbation such as 1e-3")
    if eps < MIN_EPS[dtype]:
        wider = dtype == "float32"
        raise UsageError(f"eps {eps:g} is below what {dtype} products resolve: eps must be at least "
                         f"{MIN_EPS[dtype]:g} with {dtype} products",
                         hint="use {remedy} for smaller" if wider else None,
                         remedy=Remedy("dtype", "float64") if wider else None)
