"""What a stability measurement found: the result dataclasses and their JSON-safe dicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BlockStability", "BatchNormStability", "TrajectoryPoint", "Trajectory", "StabilityReport"]


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples become lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _fields_dict(obj: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    return {
        name: _clean(getattr(obj, name))
        for name in obj.__dataclass_fields__
        if name not in skip
    }


@dataclass(frozen=True)
class BlockStability:
    """Amplification of small perturbations by one block (Lemma 2).

    Attributes
    ----------
    name, stage, shortcut : str
        From the anatomy.
    n : int
        Runs (sample x direction) with a defined ``r``.
    excluded : int
        Runs without one (zero input or dead output); ``notes`` says why.
    r_min, r_median, r_max : float or None
        Over the ``n`` runs; None when ``n == 0``.
    share_in_paper_bounds, share_in_linear_bounds : float or None
        Share of the ``n`` runs with ``1/kappa <= r <= kappa`` for the paper's kappa
        (Eq. 2) and the exact linearized one; None without bounds.
    worst_gain : float or None
        Largest ``sigma_max(J)`` over samples: the top Ritz value of a Lanczos run
        (:mod:`.krylov`), never above the true value; a lower bound of unknown distance
        where ``worst_gain_converged`` is False.
    worst_r : float or None
        Largest ``sigma_max(J_i) ||x_i|| / ||f(x_i)||`` over samples: the first-order
        ``r`` of the worst direction.
    worst_r_median : float or None
        Median of the same over samples.
    worst_share_in_paper_bounds, worst_share_in_linear_bounds : float or None
        Share of samples whose worst-direction ``r`` lies inside the bounds.
    inactive_share : float or None
        Mean over samples of the share of output units exactly zero at ``x_l``. When
        it is positive and the block ends in a ReLU, ``J`` is rank deficient, so the
        smallest gain (and the lower bound of Lemma 1/2 in the linearization) is 0.
    worst_unconverged : int or None
        Samples (with a defined ``r``) whose Lanczos run did not meet the residual test
        (samples dropped early from the race among them); their gain is a lower bound
        only. None when the worst direction was not searched.
    worst_gain_converged : bool or None
        Whether the sample that gives ``worst_gain`` met the residual test
        ``residual <= power_tolerance``. None when not searched.
    worst_gain_residual : float or None
        Its relative Ritz residual ``rho / worst_gain``: some singular value of ``J``
        lies within ``rho`` of ``worst_gain``.
    worst_r_converged : bool or None
        Whether the sample that gives ``worst_r`` met the residual test.
    ratios : tuple of (float or None)
        ``r`` of every run in run order (``j = i * K + k``), None where excluded. Not
        in :meth:`to_dict` unless asked for.
    notes : tuple of str
        Why a field is None.
    """

    name: str
    stage: str
    shortcut: str
    n: int
    excluded: int
    r_min: float | None
    r_median: float | None
    r_max: float | None
    share_in_paper_bounds: float | None
    share_in_linear_bounds: float | None
    worst_gain: float | None
    worst_r: float | None
    worst_r_median: float | None
    worst_share_in_paper_bounds: float | None
    worst_share_in_linear_bounds: float | None
    inactive_share: float | None
    worst_unconverged: int | None = None
    worst_gain_converged: bool | None = None
    worst_gain_residual: float | None = None
    worst_r_converged: bool | None = None
    ratios: tuple[float | None, ...] = field(default=(), repr=False)
    notes: tuple[str, ...] = ()

    def to_dict(self, *, include_ratios: bool = False) -> dict[str, Any]:
        """JSON-safe dict (floats or None, never NaN/inf)."""
        return _fields_dict(self, () if include_ratios else ("ratios",))


@dataclass(frozen=True)
class BatchNormStability:
    """Relative perturbation before and after one BatchNorm layer (Lemma 3).

    Attributes
    ----------
    name : str
        Module path of the BatchNorm.
    block : str or None
        The block whose local perturbation runs observed it; None when it lies outside
        every block (the stem) and was observed in the trajectory runs.
    n, excluded : int
        Runs used, and runs without a defined ratio (zero activation, or the
        perturbation did not reach the layer).
    before_median, after_median : float or None
        Median of ``||d_in|| / ||in||`` and of ``||d_out|| / ||out||``.
    ratio_min, ratio_median, ratio_max : float or None
        Of ``(||d_out|| / ||out||) / (||d_in|| / ||in||)`` per run.
    notes : tuple of str
    """

    name: str
    block: str | None
    n: int
    excluded: int
    before_median: float | None
    after_median: float | None
    ratio_min: float | None
    ratio_median: float | None
    ratio_max: float | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return _fields_dict(self)


@dataclass(frozen=True)
class TrajectoryPoint:
    """Relative error ``||Δh|| / ||h||`` at one point of the network, over runs."""

    name: str
    median: float | None
    min: float | None
    max: float | None
    n: int
    excluded: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return _fields_dict(self)


@dataclass(frozen=True)
class Trajectory:
    """One input perturbation followed through the whole network.

    Attributes
    ----------
    points : tuple of TrajectoryPoint
        After every block, in ``anatomy.blocks`` order (named by block).
    stem : TrajectoryPoint or None
        At the input of the first block (after the stem); None without blocks.
    logits : TrajectoryPoint or None
        At the model output; None when the output is not a tensor of shape (N, classes).
    flips : int or None
        Runs whose predicted class (argmax of the logits) changed; None without logits.
    runs : int
        ``N * K``.
    """

    points: tuple[TrajectoryPoint, ...]
    stem: TrajectoryPoint | None
    logits: TrajectoryPoint | None
    flips: int | None
    runs: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return _fields_dict(self)


@dataclass(frozen=True)
class StabilityReport:
    """Everything :func:`measure_stability` found.

    Attributes
    ----------
    eps : float
        Relative size of every perturbation.
    directions : int
        Random directions per sample (``K``).
    samples : int
        Images (``N``).
    seed : int
    power_iterations : int
        Lanczos steps per sample for the worst direction, spent by
        :func:`~.krylov.plan_rounds` (each one ``J v`` and one ``J^T u``).
    power_tolerance : float
        Residual test of the worst direction: a sample's top Ritz value is converged
        when its relative residual is at most this.
    batch_size : int or None
        Samples per batched Jacobian product as requested; None: from a memory budget.
    dtype : str
        ``"float64"`` or ``"float32"``.
    blocks : tuple of BlockStability
    batchnorm : tuple of BatchNormStability
    trajectory : Trajectory
    notes : tuple of str
    """

    eps: float
    directions: int
    samples: int
    seed: int
    power_iterations: int
    dtype: str
    blocks: tuple[BlockStability, ...]
    batchnorm: tuple[BatchNormStability, ...]
    trajectory: Trajectory
    notes: tuple[str, ...] = ()
    power_tolerance: float = 0.0
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (per-run ratios left out), with ``worst_gain_lower_bounds``: the blocks whose
        ``worst_gain`` did not meet the residual test (a lower bound there)."""
        out = _fields_dict(self)
        out["worst_gain_lower_bounds"] = [b.name for b in self.blocks if b.worst_gain_converged is False]
        return out
