"""Stability of residual blocks under small perturbations (the paper's Lemmas 2 and 3).

At real data points x_l (a block's input for real images) a perturbation d with
``||d|| / ||x_l|| = eps`` is added, the real block f (ReLU, BatchNorm in eval mode)
is run on ``x_l`` and ``x_l + d``, and the amplification

    r = (||f(x_l + d) - f(x_l)|| / ||f(x_l)||) / (||d|| / ||x_l||)

is measured. Lemma 2 predicts ``1/kappa <= r <= kappa``. Besides seeded random
directions, Lanczos on ``J^T J`` (J the block's Jacobian at x_l: ``J v`` by the
linearized block, checked against autograd, ``J^T u`` by autograd) finds the
worst direction, with a residual certificate (:mod:`.krylov`). Lemma 3
(BatchNorm) is checked per BatchNorm layer by comparing the relative perturbation
at its input and at its output. Finally one input perturbation per run is followed
through the whole network: the relative error after every block (the trajectory of
the dynamical system) and at the logits.

Precision. Everything runs on a private copy of the model in float32 by default
(``dtype=torch.float64`` keeps the slower double-precision path). ``r`` is a
difference of two forward passes: ``f(x_l + d) - f(x_l)`` has norm about
``eps ||f(x_l)||`` while each output carries a rounding error of a few units of
``2**-24 ~ 6e-8`` relative to ``||f(x_l)||`` (conv sums add a little more), so at the
default ``eps = 1e-3`` the relative error of ``r`` is of order ``1e-4`` at most
(measured against the float64 path, 32 images x 4 directions on the trained CIFAR
ResNet-20 and 12 x 4 on a ResNet-50 at 224 px: at most ``6e-5`` for every run); rounding
errors are independent of ``d``, so they widen ``r`` without biasing it. That is
four significant digits, ample against the run-to-run spread of ``r`` over
directions; a much smaller ``eps`` (below about ``1e-5``) needs float64. The Jacobian
products of the Lanczos runs involve no cancellation and keep float32's ~7 digits.

Worst direction. Golub-Kahan-Lanczos per sample, all samples of a batch at once (an
eval-mode block acts on each row separately, so one batched product is many
independent ones); :mod:`.krylov` states what the top Ritz value and its residual
certify, and how the budget of ``power_iterations`` power steps per sample is spent
(a race: a short survey of every sample, then round by round the better half goes on,
so how many steps a sample gets depends on the others' gains). A sample's value
meets the test when its final relative residual is at most ``power_tolerance`` (or
its Krylov space became invariant: exact, and its run stops there). Samples that never met the test are counted in ``worst_unconverged``: their value is
still a lower bound of ``sigma_max(J_i)``. For the products the block is evaluated on a copy whose eval-mode BatchNorm layers
are replaced by the equivalent per-channel affine map ``x * scale + shift`` (same
function, far cheaper forward-mode derivatives).

Random streams (so that anyone can rebuild the perturbations)
--------------------------------------------------------------
With ``N`` samples, ``K`` directions and blocks numbered ``l = 0, 1, ...`` in
``anatomy.blocks`` order:

* block ``l``: ``g = torch.Generator().manual_seed(seed + l)``; then
  ``d = torch.randn((N * K, C, H, W), generator=g, dtype=torch.float32).double()`` (run
  ``j = i * K + k`` is sample ``i``, direction ``k``), each row multiplied by
  ``eps * ||x_l[i]|| / ||d[j]||``; then from the same generator
  ``v0 = torch.randn((N, C, H, W), generator=g, dtype=torch.float32)``, the start of the
  Lanczos runs;
* trajectory: ``g = torch.Generator().manual_seed(seed + len(anatomy.blocks))``; then
  ``torch.randn((N * K, *input_shape), generator=g, dtype=torch.float32).double()``, row
  ``j`` multiplied by ``eps * ||x[i]|| / ||d[j]||`` (``x`` the images).

Streams are always drawn in float32 (torch's vectorized sampler, 2.6x faster than its
float64 one: a ResNet-50 audit at 224 px draws 1.7e9 numbers), scaled in float64 and
then cast to the working ``dtype``, so the float32 and float64 paths perturb in the
same directions. Gaussian directions in float32 are as random as in float64 for this
purpose: ``r`` of a random direction concentrates (its spread over directions is far
above float32's resolution of a direction). Against the float64 draws of earlier
versions the numbers moved as with a new seed (ResNet-50 at 224 px, 60 images, 240
runs per block): block ``r_median`` by at most 0.11 %, ``r_min``/``r_max`` 1.3 %,
``worst_gain`` 2.2 %, shares not at all; the trajectory's per-point extremes up to
4.7 % (10 % at the logits' maximum, the largest of 240 ratios). The rows of ``d`` are drawn
chunk by chunk as the runs use them, which gives exactly the rows of the single call
above (:class:`.directions.Directions`), so batching (memory) never changes the numbers.
A block output with ``||f(x_l)|| <= 1e-12 ||x_l||`` counts as dead: its runs have no
``r`` and are counted in ``excluded``, never reported as NaN or inf.

Norms are Euclidean, per sample, over all of (C, H, W). Medians are
``numpy.median`` (the mean of the two middle values for an even count).

The package, one job a module: :mod:`.measure` (the phases and
:func:`measure_stability`), :mod:`.checks` (its arguments), :mod:`.capture`
(taps and the capture pass), :mod:`.directions` (the seeded directions),
:mod:`.linearized` (the Jacobian products and the power step), :mod:`.chunks`
(rows in chunks, small statistics), :mod:`.results` (the result dataclasses),
:mod:`.options` (:class:`StabilityOptions` and the defaults).

References
----------
.. [1] "Understanding ResNet from a Discrete Dynamical System Perspective", ICLR 2022
   submission: Lemma 2 (stability of a residual block), Lemma 3 (BatchNorm).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "BlockStability",
    "BatchNormStability",
    "TrajectoryPoint",
    "Trajectory",
    "StabilityReport",
    "StabilityOptions",
    "STABILITY_DEFAULTS",
    "measure_stability",
]

# Names load with their module on first use (PEP 562), so that the command line can read
# StabilityOptions' defaults (.options, torch-free) without importing torch.
_HOMES = {
    "BlockStability": "results",
    "BatchNormStability": "results",
    "TrajectoryPoint": "results",
    "Trajectory": "results",
    "StabilityReport": "results",
    "StabilityOptions": "options",
    "STABILITY_DEFAULTS": "options",
    "measure_stability": "measure",
}

if TYPE_CHECKING:
    from .measure import measure_stability
    from .options import STABILITY_DEFAULTS, StabilityOptions
    from .results import BatchNormStability, BlockStability, StabilityReport, Trajectory, TrajectoryPoint


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
