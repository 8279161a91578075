"""Stability of residual blocks under small perturbations (the paper's Lemmas 2 and 3).

At real data points x_l (a block's input for real images) a perturbation d with
``||d|| / ||x_l|| = eps`` is added, the real block f (ReLU, BatchNorm in eval mode)
is run on ``x_l`` and ``x_l + d``, and the amplification

    r = (||f(x_l + d) - f(x_l)|| / ||f(x_l)||) / (||d|| / ||x_l||)

is measured. Lemma 2 predicts ``1/kappa <= r <= kappa``. Besides seeded random
directions, a few power iterations on ``J^T J`` (J the block's Jacobian at x_l:
``J v`` by the linearized block, checked against autograd, ``J^T u`` by autograd)
find the worst direction. Lemma 3
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
products of the power iteration involve no cancellation and keep float32's ~7 digits.

Worst direction. Power iteration on ``J^T J`` per sample, all samples of a batch at
once (an eval-mode block acts on each row separately, so one batched product is many
independent ones). Sample ``i`` stops when its gain estimate ``g_k = ||J v_k||``
changes by at most ``power_tolerance`` relatively (``g_k - g_{k-1} <= tol * g_k``),
or after ``power_iterations`` products ``J v``; from then on its vector and estimate
are frozen, so a sample's result does not depend on the others in its batch. Samples
that never met the test are counted in ``worst_unconverged`` and named in the notes:
their estimate is still a valid lower bound of ``sigma_max(J_i)`` but not a converged
one. For the products the block is evaluated on a copy whose eval-mode BatchNorm layers
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
  power iteration;
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
above (``_Directions``), so batching (memory) never changes the numbers.
A block output with ``||f(x_l)|| <= 1e-12 ||x_l||`` counts as dead: its runs have no
``r`` and are counted in ``excluded``, never reported as NaN or inf.

Norms are Euclidean, per sample, over all of (C, H, W). Medians are
``numpy.median`` (the mean of the two middle values for an even count).

References
----------
.. [1] "Understanding ResNet from a Discrete Dynamical System Perspective", ICLR 2022
   submission: Lemma 2 (stability of a residual block), Lemma 3 (BatchNorm).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, UsageError
from ..models.anatomy import Anatomy, BlockInfo

__all__ = [
    "BlockStability",
    "BatchNormStability",
    "TrajectoryPoint",
    "Trajectory",
    "StabilityReport",
    "measure_stability",
]

# A block output with ||f(x)|| <= _DEAD * ||x|| counts as dead: r is undefined there.
_DEAD = 1e-12
# Elements per batched tensor (one chunk of block runs); power iterations use a quarter.
_CHUNK_ELEMENTS = 1 << 22
# Elements of captured block inputs held at once; more blocks need more forward passes.
_CAPTURE_ELEMENTS = 1 << 26

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- results


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
        Largest ``sigma_max(J)`` found over samples (power iteration: a lower bound
        that converges from below).
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
        Samples (with a defined ``r``) whose power iteration did not meet the convergence
        test within ``power_iterations`` products; their gain is a lower bound only. None
        when the worst direction was not searched.
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
        Most products ``J v`` per sample.
    power_tolerance : float
        Convergence test of the power iteration (relative change of the gain estimate).
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
        """JSON-safe dict (per-run ratios left out)."""
        return _fields_dict(self)


# --------------------------------------------------------------------------- helpers


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row (first axis) over all other axes."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())))  # any memory format, no copy


class _Reverse:
    """Jacobian products of ``fn`` at ``x`` by reverse-mode autograd, from one recorded forward pass.

    ``torch.autograd.grad`` rather than ``torch.func`` (the same products): the
    first use of ``torch.func`` imports ``torch._dynamo``, which cost every audit
    1.5 s and 150 MB here.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
        with torch.enable_grad():
            self.leaf = x.detach().requires_grad_(True)
            self.out = fn(self.leaf)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """``J^T u``."""
        if not self.out.requires_grad:  # the output does not depend on x
            return torch.zeros_like(self.leaf)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.out, self.leaf, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.leaf) if grad is None else grad

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` by reverse mode twice, without forward-mode AD.

        ``g(u) = J^T u`` is linear in ``u`` with derivative ``J^T``, so ``J v`` is
        the gradient of ``<g(u), v>`` with respect to ``u`` (taken at ``u = 0``).
        About two more passes; used once per block, to check the linearization
        (:meth:`_Linearized.matches`) with autograd's own derivative rules.
        """
        if not self.out.requires_grad:
            return torch.zeros_like(self.out)
        with torch.enable_grad():
            probe = torch.zeros_like(self.out, requires_grad=True)
            (grad,) = torch.autograd.grad(self.out, self.leaf, probe, create_graph=True, retain_graph=True,
                                          allow_unused=True)
            if grad is None or not grad.requires_grad:  # J = 0, or J^T u does not depend on u
                return torch.zeros_like(self.out)
            (product,) = torch.autograd.grad(grad, probe, v, allow_unused=True)
        return torch.zeros_like(self.out) if product is None else product.detach()


def _kept(values: torch.Tensor) -> list[float]:
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


def _repeats(index: torch.Tensor) -> tuple[int, int, int] | None:
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


def _distances(runs: torch.Tensor, reference: torch.Tensor, index: torch.Tensor,
               layout: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``||runs[j] - reference[index[j]]||`` per row.

    When ``index`` repeats consecutive samples ``k`` times each (``layout``, see
    :func:`_repeats`), the references are broadcast over the ``k`` runs of their
    sample instead of gathered into a copy: the same differences, one pass less.
    """
    if layout is None:
        return _row_norms(runs - reference[index])
    first, stop, k = layout
    difference = runs.unflatten(0, (stop - first, k)) - reference[first:stop].unsqueeze(1)
    return torch.linalg.vector_norm(difference, dim=tuple(range(2, difference.dim()))).reshape(-1)


def _stats(values: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """(min, median, max) of finite ``values``; Nones when empty."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None, None
    return float(values.min()), float(np.median(values)), float(values.max())


def _share(values: np.ndarray, kappa: float | None) -> float | None:
    """Share of ``values`` inside ``[1/kappa, kappa]``."""
    if kappa is None or values.size == 0:
        return None
    inside = (values >= 1.0 / kappa) & (values <= kappa)
    return float(inside.mean())


def _rows_per_chunk(*shapes: Sequence[int], budget: int | None = None) -> int:
    budget = _CHUNK_ELEMENTS if budget is None else budget
    per_row = max(int(np.prod(s)) for s in shapes)
    return max(1, budget // max(per_row, 1))


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _group_runs(samples: slice, k: int, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The ``k`` runs of each sample of ``samples``, ``size`` runs at a time: each run's sample, group-local."""
    for rows in _chunks((samples.stop - samples.start) * k, size):
        yield torch.arange(rows.start, rows.stop, device=device) // k


class _Directions:
    """Seeded perturbation rows, drawn chunk by chunk as the runs consume them.

    Row ``j`` is a Gaussian row (drawn in float32) rescaled in float64 to ``eps * reference_norms[j]``
    (rows with a zero reference stay 0), then cast to ``dtype`` (module
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
        scale = self.eps * self.reference[start:self.taken] / _row_norms(d)
        # in place: the rows are this call's own (a fresh draw, or rows of the single draw taken once)
        d = d.mul_(scale.reshape(-1, *([1] * len(self.shape)))).to(self.device, self.dtype)
        self.norms.extend(_kept(_row_norms(d)))
        return d

    def finish(self) -> np.ndarray:
        """Draw any rows not taken yet (so the stream ends where one draw would), and every row's norm."""
        remaining = len(self.reference) - self.taken
        if remaining:
            self.take(remaining)
        self._all = None
        return np.asarray(self.norms, dtype=np.float64)


def _bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".")


def _concatenate(chunks: list[torch.Tensor]) -> torch.Tensor:
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


class _Taps:
    """Hooks on module inputs / outputs.

    In *reference* mode they keep a copy of every tapped tensor; in *compare* mode
    they record, per row, ``||t - ref[index]||`` and ``||ref[index]||``. Only the
    first call of a module per forward pass counts. Copies guard against in-place
    operations after the tap.
    """

    def __init__(self, modules: Mapping[str, nn.Module], points: Sequence[tuple[str, str]]) -> None:
        self._modules = modules
        self.points = list(points)
        self.mode = "off"
        self.index: torch.Tensor | None = None
        self.layout: tuple[int, int, int] | None = None
        self.refs: dict[tuple[str, str], Any] = {}
        self.ref_norms: dict[tuple[str, str], torch.Tensor | None] = {}
        self.delta: dict[tuple[str, str], list[float]] = {p: [] for p in self.points}
        self.norm: dict[tuple[str, str], list[float]] = {p: [] for p in self.points}
        self._seen: set[tuple[str, str]] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> _Taps:
        for name, where in self.points:
            module = self._modules[name]
            if where == "in":
                handle = module.register_forward_pre_hook(self._pre_hook(name))
            else:
                handle = module.register_forward_hook(self._hook(name))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._record((name, "in"), args[0])

        return pre

    def _hook(self, name: str) -> Callable[..., None]:
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._record((name, "out"), output)

        return post

    def start(self, mode: str, index: torch.Tensor | None = None) -> None:
        """Prepare one forward pass in ``mode`` ("reference" or "compare")."""
        self.mode, self.index = mode, index
        self.layout = None if index is None else _repeats(index)
        self._seen.clear()
        if mode == "reference":
            for point in self.points:
                if not isinstance(self.refs.get(point), list):
                    self.refs[point] = []

    def recorded_all(self) -> bool:
        """Whether every tapped point has recorded its tensor in the current forward pass."""
        return len(self._seen) == len(self.points)

    def freeze_reference(self) -> None:
        """Concatenate the reference chunks, each freed once copied (not ``torch.cat``,
        which holds every chunk and the result at once: twice the references)."""
        self.refs = {k: _concatenate(v) if v else None for k, v in self.refs.items()}
        self.ref_norms = {k: None if v is None else _row_norms(v) for k, v in self.refs.items()}
        self.mode = "off"

    def reset(self) -> None:
        """Forget references and comparisons."""
        self.refs, self.ref_norms = {}, {}
        self.delta = {p: [] for p in self.points}
        self.norm = {p: [] for p in self.points}

    def _record(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        if self.mode == "off" or key in self._seen:
            return
        self._seen.add(key)
        if self.mode == "reference":
            self.refs[key].append(tensor.detach().clone())
            return
        ref = self.refs.get(key)
        if ref is None or self.index is None:
            return
        if (len(self.index), *ref.shape[1:]) != tensor.shape:
            return
        self.delta[key].extend(_kept(_distances(tensor.detach(), ref, self.index, self.layout)))
        self.norm[key].extend(_kept(self.ref_norms[key][self.index]))

    def relative(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """(||Δ||, ||ref||) per compared row, as float64 arrays."""
        if not self.delta[key]:
            return np.zeros(0), np.zeros(0)
        return (
            np.asarray(self.delta[key], dtype=np.float64),
            np.asarray(self.norm[key], dtype=np.float64),
        )


def _ratio(delta: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """``delta / norm`` with NaN where ``norm`` is zero (callers drop NaN)."""
    out = np.full(delta.shape, np.nan)
    ok = norm > 0
    out[ok] = delta[ok] / norm[ok]
    return out


def _point(name: str, relative: np.ndarray) -> TrajectoryPoint:
    """Median / min / max of the finite relative errors; the rest counted as excluded."""
    good = np.isfinite(relative)
    lo, mid, hi = _stats(relative[good])
    return TrajectoryPoint(name, mid, lo, hi, int(good.sum()), int(relative.size - good.sum()))


def _batchnorm_result(
    name: str, block: str | None, taps: _Taps, context: str
) -> BatchNormStability:
    before = _ratio(*taps.relative((name, "in")))
    after = _ratio(*taps.relative((name, "out")))
    if before.size != after.size:  # one side never ran: nothing comparable
        before = after = np.zeros(0)
    ok = np.isfinite(before) & np.isfinite(after) & (before > 0)
    ratio = np.where(ok, after / np.where(ok, before, 1.0), np.nan)
    excluded = int(before.size - ok.sum())
    notes = []
    if before.size == 0:
        notes.append(f"the layer was not reached by the {context} runs")
    elif excluded:
        notes.append(
            f"{excluded} of {before.size} runs excluded: zero activation or the "
            "perturbation did not reach the layer"
        )
    lo, mid, hi = _stats(ratio[ok])
    return BatchNormStability(
        name, block, int(ok.sum()), excluded,
        _stats(before[ok])[1], _stats(after[ok])[1], lo, mid, hi, tuple(notes),
    )


# --------------------------------------------------------------------------- validation


def _check_images(images: Any, anatomy: Anatomy) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputError(
            f"images must be a tensor of shape (N, C, H, W), got {type(images).__name__}"
        )
    expected = tuple(anatomy.input_shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        raise InputError(
            f"images must have shape (N, {', '.join(map(str, expected))}) with N >= 1, "
            f"got {tuple(images.shape)}",
            hint="pass preprocessed images at the input size the anatomy was built for",
        )
    if not images.is_floating_point():
        raise InputError(
            f"images must be preprocessed floating-point tensors, got dtype {images.dtype}",
            hint="scale pixels to [0, 1] and normalize as in training",
        )
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise InputError(f"images contain {bad} non-finite values (NaN or inf)")
    return images


def _check_options(eps: Any, directions: Any, seed: Any, power_iterations: Any, dtype: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < float(eps) < 1.0:
        raise InputError(f"eps must be a number in (0, 1), got {eps!r}", hint="the default is 1e-3")
    if (
        isinstance(directions, bool)
        or not isinstance(directions, numbers.Integral)
        or directions < 1
    ):
        raise InputError(f"directions must be an integer >= 1, got {directions!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**62:
        raise InputError(f"seed must be a non-negative integer below 2**62, got {seed!r}")
    if (
        isinstance(power_iterations, bool)
        or not isinstance(power_iterations, numbers.Integral)
        or power_iterations < 0
    ):
        raise InputError(f"power_iterations must be an integer >= 0, got {power_iterations!r}")
    if dtype not in (torch.float32, torch.float64):
        raise UsageError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def _check_power(tolerance: Any, batch_size: Any) -> None:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, numbers.Real)
        or not 0.0 <= float(tolerance) < 1.0
    ):
        raise InputError(
            f"power_tolerance must be a number in [0, 1), got {tolerance!r}", hint="the default is 1e-2"
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise InputError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")


def _check_bounds(
    bounds: Mapping[str, tuple[float | None, float | None]] | None, anatomy: Anatomy
) -> dict[str, tuple[float | None, float | None]]:
    if bounds is None:
        return {}
    names = [b.name for b in anatomy.blocks]
    checked: dict[str, tuple[float | None, float | None]] = {}
    for name, pair in bounds.items():
        if name not in names:
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise InputError(f"bounds name an unknown block {name!r} (blocks: {shown})")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"bounds[{name!r}] must be (kappa_paper, kappa_linear), got {pair!r}")
        values: list[float | None] = []
        for kappa in pair:
            if kappa is None:
                values.append(None)
                continue
            kappa = float(kappa)
            if math.isnan(kappa) or kappa < 1.0 - 1e-9:
                raise InputError(f"bounds[{name!r}] holds {kappa!r}; a condition number is >= 1")
            values.append(max(kappa, 1.0))
        checked[name] = (values[0], values[1])
    return checked


def _device(device: Any) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}", hint="pass 'cpu' or 'cuda'") from exc
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device {device!r} requested but CUDA is not available", hint="pass 'cpu'"
        )
    return target


# --------------------------------------------------------------------------- steps


class _StopForward(Exception):
    """Raised by a hook to end a forward pass whose remaining layers are not needed."""


def _capture(
    model: nn.Module, modules: Mapping[str, nn.Module], images: torch.Tensor, names: Sequence[str],
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Input of each named block for all images (one forward pass in chunks)."""
    taps = _Taps(modules, [(n, "in") for n in names])
    size = _rows_per_chunk(images.shape[1:]) if batch_size is None else batch_size

    def stop_when_all_seen(module: nn.Module, args: tuple) -> None:
        # registered after the taps' own hooks, so this block's input is already kept
        if taps.recorded_all():
            raise _StopForward

    with taps, torch.no_grad():
        # The forward pass stops once every named block has its input: the
        # layers after the group's last block are never run.
        stops = [modules[n].register_forward_pre_hook(stop_when_all_seen) for n in names]
        try:
            for rows in _chunks(images.shape[0], size):
                taps.start("reference")
                try:
                    model(images[rows])
                except _StopForward:
                    pass
        finally:
            for handle in stops:
                handle.remove()
        taps.freeze_reference()
    missing = [n for n in names if taps.refs.get((n, "in")) is None]
    if missing:
        raise InputError(
            f"block(s) {', '.join(missing)} never received a tensor input in a forward pass",
            hint="the anatomy does not match this model",
        )
    return {n: taps.refs[(n, "in")] for n in names}


class _AffineBatchNorm(nn.Module):
    """Eval-mode BatchNorm as the per-channel affine map it is: ``x * scale + shift``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (t.dim() - 2)
        return torch.addcmul(self.shift.reshape(shape), t, self.scale.reshape(shape))


def _jacobian_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with its eval-mode BatchNorm layers as :class:`_AffineBatchNorm`.

    The same function (up to rounding) but with cheap forward-mode derivatives: torch's
    ``batch_norm`` forward-mode rule costs several times the layer itself. Layers that
    normalize by batch statistics even in eval mode (no running statistics) are kept.
    """
    copy_ = copy.deepcopy(block)
    for module in list(copy_.modules()):
        for child_name, child in list(module.named_children()):
            if (
                isinstance(child, nn.modules.batchnorm._BatchNorm)
                and not child.training
                and child.running_mean is not None
                and child.running_var is not None
            ):
                setattr(module, child_name, _AffineBatchNorm(child))
    return copy_


class _MaskedReLU(nn.Module):
    """A ReLU of the linearized block: records ``t > 0`` on the clean pass, applies the masks to tangents.

    A module may be called several times per forward (torchvision's blocks call
    ``self.relu`` three times): masks are kept in call order, in a list shared
    by the recording and the applying copy.
    """

    def __init__(self, masks: list[torch.Tensor], record: bool) -> None:
        super().__init__()
        self.masks, self.record, self.index = masks, record, 0

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.record:
            mask = t > 0
            self.masks.append(mask)
            return t * mask
        mask = self.masks[self.index]
        self.index += 1
        return t * mask


# modules whose Jacobian the masked copy of _Linearized does not model (functions are caught by its check)
_NOT_MASKABLE = (nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.LeakyReLU,
                 nn.ELU, nn.Mish, nn.Softplus, nn.LayerNorm, nn.GroupNorm)


class _Linearized:
    """``v -> J(x) v`` of a piecewise-linear block by one forward pass, instead of forward-mode AD.

    An eval block made of convolutions, linear layers, eval BatchNorm (an affine
    map, :class:`_AffineBatchNorm`), ReLU modules and additions is, around ``x``,
    the same network with every ReLU replaced by the fixed mask ``x_relu > 0``
    and every additive constant (biases, BatchNorm shifts) removed: its Jacobian
    product costs one forward pass, where ``torch.func.jvp`` costs 4-8 (measured
    on ResNet-50 blocks at 224 px). Exact at points where no ReLU input is zero
    (a measure-zero set; there autograd takes one one-sided derivative, this the
    other). Whether a block has only these parts is not assumed: :meth:`matches`
    compares one product with autograd's (:meth:`_Reverse.jvp`) and the caller
    falls back to ``torch.func.jvp`` for every product where they differ.
    That is a property of the block's parts, not of the point: ``exact`` keeps the
    verdict of the first comparison (None before it) for every later batch of points.
    """

    exact: bool | None = None

    def __init__(self, block: nn.Module) -> None:
        if any(isinstance(m, _NOT_MASKABLE) for m in block.modules()):
            # a part the masked copy does not model (GELU, SiLU, a gate's sigmoid, LayerNorm):
            # it cannot be exact, and autograd's double backward may not exist for the part
            self.exact = False
        masks: list[list[torch.Tensor]] = []
        self.masks = masks
        self.recorder, self.linear = copy.deepcopy(block), copy.deepcopy(block)
        for recorder_module, linear_module in zip(self.recorder.modules(), self.linear.modules()):
            for (name, child), (_, twin) in zip(list(recorder_module.named_children()),
                                                list(linear_module.named_children())):
                if isinstance(child, nn.ReLU):
                    masks.append([])
                    setattr(recorder_module, name, _MaskedReLU(masks[-1], record=True))
                    setattr(linear_module, name, _MaskedReLU(masks[-1], record=False))
                elif isinstance(twin, _AffineBatchNorm):
                    twin.shift.zero_()
                elif isinstance(twin, (nn.Conv2d, nn.Linear)) and twin.bias is not None:
                    twin.bias = None
        self.relus = [m for m in self.linear.modules() if isinstance(m, _MaskedReLU)]

    def at(self, x: torch.Tensor) -> _Linearized:
        """Fix the ReLU masks at the points ``x`` (one clean forward pass); returns self."""
        for masks in self.masks:
            masks.clear()
        with torch.no_grad():
            self.recorder(x.clone())
        return self

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        for relu in self.relus:
            relu.index = 0
        with torch.no_grad():
            return self.linear(v)

    def matches(self, jvp: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the product equals autograd's ``jvp = J v`` to working precision."""
        mine = self(v)
        if mine.shape != jvp.shape:
            return False
        scale = _row_norms(jvp).clamp_min(torch.finfo(jvp.dtype).tiny)
        return bool((_row_norms(mine - jvp) <= 1e3 * torch.finfo(jvp.dtype).eps * scale).all())


def _power_iteration(
    block: nn.Module, x: torch.Tensor, v: torch.Tensor, iterations: int, tolerance: float,
    linearized: _Linearized | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate ``sigma_max(J_i)`` of ``block`` at every row ``x_i``.

    Parameters
    ----------
    block : nn.Module
        Eval mode: it acts on each row separately, so one batched Jacobian product is
        ``n`` independent ones (the batch dimension plays the role of ``vmap``).
    x, v : Tensor of shape (n, C, H, W)
        Points and start vectors.
    iterations : int
        Most products ``J v`` per row (``>= 1``).
    tolerance : float
        Row ``i`` stops once ``g_k - g_{k-1} <= tolerance * g_k`` for its estimate
        ``g_k = ||J_i v_k||``; its vector and estimate are frozen from then on.
    linearized : _Linearized, optional
        ``_Linearized(block)``, built once per block by the caller (two copies
        of the block, and the verdict of its one comparison with autograd);
        built here when omitted.

    Returns
    -------
    gain : Tensor of shape (n,)
        The largest ``||J_i v_i||`` over the unit vectors ``v_i`` visited: a lower
        bound of ``sigma_max(J_i)`` that power iteration drives up to it.
    converged : Tensor of shape (n,), bool
        Whether row ``i`` met the test.
    """

    def fn(t: torch.Tensor) -> torch.Tensor:
        return block(t.clone())

    shape = (-1,) + (1,) * (x.dim() - 1)
    tiny = torch.finfo(x.dtype).tiny
    gain = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.enable_grad(), warnings.catch_warnings():
        # Forward-mode AD loads decompositions through torch.jit.script once per
        # process, which warns (FutureWarning); the library prints nothing.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        reverse = _Reverse(fn, x)
        v = v / _row_norms(v).clamp_min(tiny).reshape(shape)
        # J v by one forward pass of the linearized block where that is exact
        # (checked against autograd on the block's first product), else by forward-mode AD
        linearized = linearized or _Linearized(block)
        linear = None if linearized.exact is False else linearized.at(x)
        for step in range(iterations):
            # 1. u = J v; ||u|| is the gain of the unit vector v.
            if linear is not None and (step > 0 or linear.exact):
                u = linear(v)
            elif linear is not None:  # the block's one check of its linearization
                try:
                    u = reverse.jvp(v)
                except RuntimeError:  # an operation without a double backward (hardsigmoid)
                    linearized.exact, linear = False, None
                    _, u = torch.func.jvp(fn, (x,), (v,))
                else:
                    linear.exact = linear.matches(u, v)
                    linear = linear if linear.exact else None
            else:
                _, u = torch.func.jvp(fn, (x,), (v,))
            new = torch.maximum(gain, _row_norms(u))
            # 2. Convergence test on the rows still running; frozen rows keep their value.
            if step > 0 and tolerance > 0:
                met = ~converged & (new - gain <= tolerance * new)
            else:
                met = torch.zeros_like(converged)
            gain = torch.where(converged, gain, new)
            converged |= met
            if step == iterations - 1 or bool(converged.all()):
                break
            # 3. w = J^T u (reverse mode); 4. v = w / ||w|| on the running rows.
            w = reverse.vjp(u)
            norms = _row_norms(w).reshape(shape)
            running = (~converged).reshape(shape) & (norms > 0)
            v = torch.where(running, w / norms.clamp_min(tiny), v)
    return gain.detach(), converged


def _measure_block(
    index: int,
    info: BlockInfo,
    block: nn.Module,
    modules: Mapping[str, nn.Module],
    bn_names: Sequence[str],
    x: torch.Tensor,
    *,
    eps: float,
    directions: int,
    seed: int,
    power_iterations: int,
    power_tolerance: float,
    batch_size: int | None,
    bounds: tuple[float | None, float | None],
    dtype: torch.dtype,
) -> tuple[BlockStability, list[BatchNormStability]]:
    """Amplification of one block at its real inputs, and the BatchNorms inside it.

    Parameters
    ----------
    index : int
        Position of the block in ``anatomy.blocks``; seeds its directions (``seed + index``).
    info : BlockInfo
        The block's anatomy (name, shapes, shortcut).
    block : nn.Module
        The block itself, run on ``x`` and ``x + d``.
    modules : mapping of str to nn.Module
        Every module of the model by name (for the BatchNorm taps).
    bn_names : sequence of str
        BatchNorms inside the block whose input/output ratios are reported.
    x : Tensor of shape (N, C, H, W)
        The block's clean inputs (activations of the real images).
    eps, directions, seed, power_iterations, power_tolerance, batch_size, dtype
        As in :func:`measure_stability`.
    bounds : (paper kappa, exact linear kappa)
        The block's condition numbers from the conditioning (None where
        unknown); a run is inside a bound when ``1/kappa <= r <= kappa``.

    Returns
    -------
    BlockStability
        The amplification ``r`` of every one of the ``N * K`` runs, summarised, its
        shares inside the bounds, and the worst direction.
    list of BatchNormStability
        One per name in ``bn_names``.

    Notes
    -----
    Steps, numbered as in the body: 1. seeded directions and the power-iteration
    start; 2. clean outputs; 3. perturbed outputs; 4. the ratio per run (zero
    inputs and dead outputs excluded and counted); 5. the worst direction by
    power iteration on ``J^T J``.
    """
    n_samples, k = x.shape[0], directions
    device = x.device
    runs = n_samples * k
    # 1. Seeded directions and the power-iteration start (module docstring).
    x_norms = _row_norms(x)
    generator = torch.Generator().manual_seed(seed + index)
    d = _Directions(generator, x_norms.repeat_interleave(k), x.shape[1:], eps, dtype, device)

    taps = _Taps(modules, [(b, w) for b in bn_names for w in ("in", "out")])
    size = _rows_per_chunk(info.input_shape, info.output_shape)
    size = max(k, size - size % k)  # whole samples: each chunk's references broadcast over its runs
    if batch_size is not None:
        size = batch_size * k
    f_norms: list[float] = []
    inactive: list[float] = []
    deltas: list[float] = []
    with taps, torch.no_grad():
        # A group of `size` samples at a time: its clean outputs and BatchNorm references
        # are held only while its runs compare with them (the same chunks, hence the same
        # numbers, as all clean passes first; a ResNet-50 layer1 block's references for 32
        # samples would take 0.5 GB).
        for group in _chunks(n_samples, size):
            # 2. Clean outputs f(x_l), with BatchNorm references.
            taps.refs = {}
            taps.start("reference")
            fx = block(x[group].clone())
            taps.freeze_reference()
            f_norms.extend(_kept(_row_norms(fx)))
            inactive.extend(_kept((fx == 0).reshape(fx.shape[0], -1).double().mean(dim=1)))
            # 3. Perturbed outputs f(x_l + d), run j = i * K + k.
            for sample in _group_runs(group, k, size, device):
                taps.start("compare", sample)
                out = block(x[group][sample] + d.take(len(sample)))
                deltas.extend(_kept(_distances(out, fx, sample, taps.layout)))
            del fx
    dn = d.finish()
    v0 = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32).to(device, dtype)

    # 4. r per run; zero inputs and dead outputs have none.
    xn = x_norms.double().cpu().numpy()
    fn_ = np.asarray(f_norms, dtype=np.float64)
    sample_of_run = np.arange(runs) // k
    zero_input = xn <= 0
    dead = (~zero_input) & (fn_ <= _DEAD * xn)
    valid_sample = ~(zero_input | dead)
    r = np.full(runs, np.nan)
    ok = valid_sample[sample_of_run]
    r[ok] = (np.asarray(deltas, dtype=np.float64)[ok] / fn_[sample_of_run[ok]]) / (
        dn[ok] / xn[sample_of_run[ok]]
    )
    ok &= np.isfinite(r)
    notes = []
    if zero_input.any():
        notes.append(f"{int(zero_input.sum())} sample(s) with a zero block input: r undefined")
    if dead.any():
        notes.append(f"{int(dead.sum())} sample(s) with a dead (zero) block output: r undefined")
    valid_r = r[ok]
    r_min, r_median, r_max = _stats(valid_r)
    kappa_paper, kappa_linear = bounds
    for kappa, which in ((kappa_paper, "paper"), (kappa_linear, "linear")):
        if kappa is None:
            notes.append(f"no kappa_{which} given: shares inside the {which} bounds are null")

    # 5. Worst direction: power iteration on J^T J at every valid sample.
    worst_gain = worst_r = worst_median = worst_share_paper = worst_share_linear = None
    unconverged = None
    if power_iterations == 0:
        notes.append("power_iterations = 0: worst direction not searched")
    elif valid_sample.any():
        gains: list[float] = []
        flags: list[bool] = []
        jacobian_block = _jacobian_copy(block)
        linearized = _Linearized(jacobian_block)
        per_batch = batch_size if batch_size is not None else max(1, size // 4)
        for rows in _chunks(n_samples, per_batch):
            gain_rows, flag_rows = _power_iteration(
                jacobian_block, x[rows], v0[rows], power_iterations, power_tolerance, linearized
            )
            gains.extend(_kept(gain_rows))
            flags.extend(_kept(flag_rows))
        gain = np.asarray(gains, dtype=np.float64)
        met = np.asarray(flags, dtype=bool)
        unconverged = int((~met[valid_sample]).sum())
        if unconverged:
            notes.append(
                f"power iteration did not converge (relative change > {power_tolerance:g} after "
                f"{power_iterations} products) at {unconverged} of {int(valid_sample.sum())} "
                "sample(s): worst_gain, worst_r are lower bounds there"
            )
        worst = gain[valid_sample] * xn[valid_sample] / fn_[valid_sample]
        worst_gain = float(gain[valid_sample].max())
        worst_r = float(worst.max())
        worst_median = float(np.median(worst))
        worst_share_paper = _share(worst, kappa_paper)
        worst_share_linear = _share(worst, kappa_linear)

    inactive = np.asarray(inactive, dtype=np.float64)
    result = BlockStability(
        name=info.name,
        stage=info.stage,
        shortcut=info.shortcut,
        n=int(ok.sum()),
        excluded=int(runs - ok.sum()),
        r_min=r_min,
        r_median=r_median,
        r_max=r_max,
        share_in_paper_bounds=_share(valid_r, kappa_paper),
        share_in_linear_bounds=_share(valid_r, kappa_linear),
        worst_gain=worst_gain,
        worst_r=worst_r,
        worst_r_median=worst_median,
        worst_share_in_paper_bounds=worst_share_paper,
        worst_share_in_linear_bounds=worst_share_linear,
        inactive_share=float(inactive[valid_sample].mean()) if valid_sample.any() else None,
        worst_unconverged=unconverged,
        ratios=tuple(float(v) if good else None for v, good in zip(r, ok)),
        notes=tuple(notes),
    )
    bns = [_batchnorm_result(name, info.name, taps, "block-local") for name in bn_names]
    return result, bns


def _trajectory(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    anatomy: Anatomy,
    images: torch.Tensor,
    outer_bns: Sequence[str],
    *,
    eps: float,
    directions: int,
    seed: int,
    dtype: torch.dtype,
    batch_size: int | None = None,
) -> tuple[Trajectory, list[BatchNormStability]]:
    n_samples, k = images.shape[0], directions
    runs = n_samples * k
    device = images.device
    blocks = [b.name for b in anatomy.blocks]
    # 1. Input perturbations (module docstring: stream seed + number of blocks).
    x_norms = _row_norms(images)
    generator = torch.Generator().manual_seed(seed + len(blocks))
    d = _Directions(generator, x_norms.repeat_interleave(k), images.shape[1:], eps, dtype, device)

    points = [(b, "out") for b in blocks] + ([(blocks[0], "in")] if blocks else [])
    points += [(b, w) for b in outer_bns for w in ("in", "out")]
    taps = _Taps(modules, points)
    shapes = [tuple(anatomy.input_shape)] + [b.input_shape for b in anatomy.blocks]
    step = _rows_per_chunk(*shapes, *(b.output_shape for b in anatomy.blocks))
    step = max(k, step - step % k)  # whole samples (see _distances)
    # Clean references of a group of samples are held for every tapped point.
    group = max(1, step // (len(points) // 4 + 1) // k)
    if batch_size is not None:
        step, group = batch_size * k, batch_size
    logit_delta, logit_norm, flips = [], [], 0
    logits_ok = True
    with taps, torch.no_grad():
        for samples in _chunks(n_samples, group):
            # 2. Clean pass of the group, keeping every tapped activation.
            taps.refs = {}
            taps.start("reference")
            clean = model(images[samples])
            taps.freeze_reference()
            # 3. Perturbed passes of the group's runs.
            for local in _group_runs(samples, k, step, device):
                taps.start("compare", local)
                out = model(images[samples][local] + d.take(len(local)))
                if (
                    isinstance(clean, torch.Tensor) and clean.dim() == 2
                    and isinstance(out, torch.Tensor) and out.shape[0] == local.shape[0]
                ):
                    ref = clean[local]
                    logit_delta.extend(_kept(_row_norms(out - ref)))
                    logit_norm.extend(_kept(_row_norms(ref)))
                    flips += int((out.argmax(dim=1) != ref.argmax(dim=1)).sum())
                else:
                    logits_ok = False

    def point(name: str, key: tuple[str, str]) -> TrajectoryPoint:
        return _point(name, _ratio(*taps.relative(key)))

    logits = None
    if logits_ok and logit_delta:
        logits = _point(
            "logits",
            _ratio(
                np.asarray(logit_delta, dtype=np.float64),
                np.asarray(logit_norm, dtype=np.float64),
            ),
        )
    trajectory = Trajectory(
        points=tuple(point(b, (b, "out")) for b in blocks),
        stem=point("stem", (blocks[0], "in")) if blocks else None,
        logits=logits,
        flips=flips if logits is not None else None,
        runs=runs,
    )
    bns = [_batchnorm_result(name, None, taps, "trajectory") for name in outer_bns]
    return trajectory, bns


def _capture_groups(anatomy: Anatomy, samples: int) -> list[list[int]]:
    """Block indices whose inputs are captured together within ``_CAPTURE_ELEMENTS``."""
    groups: list[list[int]] = []
    used = 0
    for index, block in enumerate(anatomy.blocks):
        size = samples * int(np.prod(block.input_shape))
        if groups and used + size <= _CAPTURE_ELEMENTS:
            groups[-1].append(index)
            used += size
        else:
            groups.append([index])
            used = size
    return groups


# --------------------------------------------------------------------------- entry point


def measure_stability(
    model: nn.Module,
    anatomy: Anatomy,
    images: torch.Tensor,
    *,
    eps: float = 1e-3,
    directions: int = 4,
    seed: int = 0,
    power_iterations: int = 8,
    power_tolerance: float = 1e-2,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    only_blocks: Collection[int] | None = None,
    with_trajectory: bool = True,
) -> StabilityReport:
    """Measure how blocks amplify small perturbations of real activations.

    Parameters
    ----------
    model : nn.Module
        The network; it is copied (eval mode, ``dtype``, ``device``), never changed.
    anatomy : Anatomy
        From :func:`auditor.models.anatomy.analyze_anatomy` for ``model``.
    images : Tensor of shape (N, C, H, W)
        Preprocessed real images; ``(C, H, W)`` must equal ``anatomy.input_shape``.
    eps : float
        Relative perturbation size ``||d|| / ||x||``, in (0, 1).
    directions : int
        Random directions ``K`` per sample (``N * K`` runs per block).
    seed : int
        Seeds every random stream (see the module docstring for the recipe).
    power_iterations : int
        Most power iterations on ``J^T J`` per block for the worst direction (at most
        ``P`` products ``J v`` and ``P - 1`` products ``J^T u`` per sample); 0 skips it.
        8 is within about 5 % of the converged gain on CIFAR ResNets.
    power_tolerance : float
        A sample's power iteration stops once its gain estimate changes by at most this
        much relatively between two products (module docstring); samples that never do
        are counted in ``worst_unconverged``. 0 runs every sample ``power_iterations``
        times. Power iteration on these Jacobians converges slowly (the top singular
        values lie close together): at 1e-2 most samples need 7 to 10 products.
    bounds : mapping of str to (float or None, float or None), optional
        Block name -> (kappa_paper, kappa_linear): the paper's (residual, or plain for
        plain blocks) and the exact linearized condition number.
    progress : callable (done, total), optional
        Called with ``(done, total)`` after each block and after the trajectory
        (``total = len(anatomy.blocks) + 1``).
    device : str or torch.device
    dtype : torch.dtype
        ``torch.float32`` (default; ``r`` keeps about four digits at ``eps = 1e-3``,
        module docstring) or ``torch.float64``.
    batch_size : int, optional
        Samples per batched block run (``batch_size * directions`` perturbed rows) and per
        batched Jacobian product: the memory bound of the per-block work. Default: as many
        as fit in a budget of ``2**22`` elements per tensor (a quarter for the products).
        The numbers do not depend on it: exactly in float64; in float32 up to rounding
        (oneDNN picks its kernels by batch size), about ``1e-5`` relative in ``r``.
    only_blocks : collection of int, optional
        Measure only these blocks (indices into ``anatomy.blocks``; default all), for
        work split across processes: each block's numbers are those of a full run
        (its random stream depends on its index only).
    with_trajectory : bool
        Measure the end-to-end trajectory and the BatchNorm layers outside blocks;
        when False the report's ``trajectory`` is empty (no points, 0 runs).

    Returns
    -------
    StabilityReport

    Raises
    ------
    InputError
        ``eps`` outside (0, 1), ``directions < 1``, images of the wrong shape or with
        non-finite values, bounds naming unknown blocks or below 1.
    UsageError
        Unknown device or dtype.

    Notes
    -----
    Cost per block, in block forward passes of one sample: ``N (1 + K)`` for the
    random directions and, for the power iteration, one pass with autograd plus per
    step one product ``J v`` (forward mode, about 2 to 4 passes even with BatchNorm as
    an affine map) and one ``J^T u`` (about one pass): at most about ``N (5 P)``,
    less where every sample of a batch converges early; the trajectory adds
    ``N (1 + K)`` whole forward passes. The power iteration dominates. The smallest gain is not searched: a block that ends in a ReLU
    has ``J = D A`` with ``D`` a 0/1 mask, so ``sigma_min(J) = 0`` whenever any output
    unit is inactive (``inactive_share > 0``); random directions measure the typical
    case instead.

    References
    ----------
    .. [1] "Understanding ResNet from a Discrete Dynamical System Perspective",
       ICLR 2022 submission, Lemma 2 (``1/kappa <= r <= kappa``) and Lemma 3 (BatchNorm).
    """
    # 1. Validate.
    _check_options(eps, directions, seed, power_iterations, dtype)
    _check_power(power_tolerance, batch_size)
    images = _check_images(images, anatomy)
    checked_bounds = _check_bounds(bounds, anatomy)
    target = _device(device)
    eps, directions, seed = float(eps), int(directions), int(seed)
    power_iterations = int(power_iterations)
    batch_size = None if batch_size is None else int(batch_size)

    # 2. A private copy in eval mode and the working precision.
    work = copy.deepcopy(model).eval().to(device=target, dtype=dtype)
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    modules = dict(work.named_modules())
    missing = [b.name for b in anatomy.blocks if b.name not in modules]
    if missing:
        raise InputError(
            f"the anatomy names block(s) not in the model: {', '.join(missing[:5])}",
            hint="build the anatomy from the same model",
        )
    x = images.to(device=target, dtype=dtype)
    if target.type == "cpu" and dtype == torch.float32 and x.dim() == 4:
        # oneDNN's float32 convolutions run 1.3-1.6x faster on channels-last
        # (NHWC) tensors on CPU (ResNet-50 at 224 px); the same function, with
        # float32 rounding in another order
        work = work.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bns = _bn_modules(work)
    block_names = [b.name for b in anatomy.blocks]
    inner = {b: [n for n in bns if _inside(n, b)] for b in block_names}
    outer = [n for n in bns if not any(_inside(n, b) for b in block_names)]

    chosen = set(range(len(anatomy.blocks)) if only_blocks is None else only_blocks)
    total = len(chosen) + int(with_trajectory)
    done = 0
    block_results: list[BlockStability] = []
    bn_results: list[BatchNormStability] = []
    # 3. Block by block, capturing inputs in groups that fit in memory.
    for group in _capture_groups(anatomy, x.shape[0]):
        group = [index for index in group if index in chosen]
        if not group:
            continue
        inputs = _capture(work, modules, x, [anatomy.blocks[i].name for i in group], batch_size)
        for index in group:
            info = anatomy.blocks[index]
            result, bn = _measure_block(
                index, info, modules[info.name], modules, inner[info.name], inputs.pop(info.name),
                eps=eps, directions=directions, seed=seed,
                power_iterations=power_iterations, power_tolerance=float(power_tolerance),
                batch_size=batch_size,
                bounds=checked_bounds.get(info.name, (None, None)), dtype=dtype,
            )
            block_results.append(result)
            bn_results.extend(bn)
            done += 1
            if progress is not None:
                progress(done, total)

    # 4. The trajectory of one input perturbation through the whole network.
    trajectory, outer_results = Trajectory((), None, None, None, 0), []
    if with_trajectory:
        trajectory, outer_results = _trajectory(
            work, modules, anatomy, x, outer, eps=eps, directions=directions, seed=seed, dtype=dtype,
            batch_size=batch_size,
        )
        done += 1
        if progress is not None:
            progress(done, total)

    notes = []
    if not anatomy.blocks:
        notes.append("no blocks found: only the trajectory's logits were measured")
    if bounds is None:
        notes.append("no kappa bounds given: shares inside the bounds are null")
    return StabilityReport(
        eps=eps,
        directions=directions,
        samples=int(x.shape[0]),
        seed=seed,
        power_iterations=power_iterations,
        dtype=str(dtype).removeprefix("torch."),
        blocks=tuple(block_results),
        batchnorm=tuple(outer_results + bn_results),
        trajectory=trajectory,
        notes=tuple(notes),
        power_tolerance=float(power_tolerance),
        batch_size=batch_size,
    )
