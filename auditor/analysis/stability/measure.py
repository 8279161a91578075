"""The measurement's phases: the blocks one by one, the trajectory, and :func:`measure_stability`.

Each block (:func:`_measure_block`): its random runs (:func:`_random_runs`),
the ratio ``r`` of every run (:func:`_ratios`), the worst direction
(:func:`_worst_direction`). The trajectory (:func:`_trajectory`): one input
perturbation per run through the whole network (:func:`_trajectory_runs`).
:func:`measure_stability` checks its arguments, makes the private working
copy (:func:`_working_copy`) and runs both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ...errors import InputError
from ...models.anatomy import Anatomy, BlockInfo
from .capture import Taps, capture, capture_groups
from .checks import check_bounds, check_device, check_images, check_options, check_power
from .chunks import distances, group_runs, kept, ratio_or_nan, row_norms, row_slices, rows_per_chunk, share, stats
from .directions import Directions
from .krylov import GolubKahan, plan_rounds
from .linearized import BlockProducts, Linearized, jacobian_copy
from .options import STABILITY_DEFAULTS, StabilityOptions
from .results import BatchNormStability, BlockStability, StabilityReport, Trajectory, TrajectoryPoint

__all__ = ["measure_stability"]

# A block output with ||f(x)|| <= _DEAD * ||x|| counts as dead: r is undefined there.
_DEAD = 1e-12

Progress = Callable[[int, int], None]
Bounds = tuple[float | None, float | None]


# --------------------------------------------------------------------------- BatchNorm summaries


def _bn_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".")


def _point(name: str, relative: np.ndarray) -> TrajectoryPoint:
    """Median / min / max of the finite relative errors; the rest counted as excluded."""
    good = np.isfinite(relative)
    lo, mid, hi = stats(relative[good])
    return TrajectoryPoint(name, mid, lo, hi, int(good.sum()), int(relative.size - good.sum()))


def _batchnorm_result(
    name: str, block: str | None, taps: Taps, context: str
) -> BatchNormStability:
    before = ratio_or_nan(*taps.relative((name, "in")))
    after = ratio_or_nan(*taps.relative((name, "out")))
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
    lo, mid, hi = stats(ratio[ok])
    return BatchNormStability(
        name, block, int(ok.sum()), excluded,
        stats(before[ok])[1], stats(after[ok])[1], lo, mid, hi, tuple(notes),
    )


# --------------------------------------------------------------------------- one block


def _working_dtype(options: StabilityOptions) -> torch.dtype:
    return getattr(torch, options.dtype)


@dataclass
class _BlockRuns:
    """What the random runs of one block left (steps 1-3 of :func:`_measure_block`).

    Norms per sample (``x_norms``, ``f_norms``, ``inactive``) and per run
    (``deltas``, ``d_norms``), the power iteration's ``start`` vectors, the
    BatchNorm ``taps`` and the runs per chunk (``size``).
    """

    x_norms: np.ndarray
    f_norms: np.ndarray
    inactive: np.ndarray
    deltas: np.ndarray
    d_norms: np.ndarray
    start: torch.Tensor
    taps: Taps
    size: int


def _random_runs(
    index: int, info: BlockInfo, block: nn.Module, modules: Mapping[str, nn.Module], bn_names: Sequence[str],
    x: torch.Tensor, options: StabilityOptions, batch_size: int | None,
) -> _BlockRuns:
    """Steps 1-3: the block on its clean inputs and on every perturbed one, in groups of samples."""
    n_samples, k = x.shape[0], options.directions
    device = x.device
    # 1. Seeded directions and the power-iteration start (package docstring).
    x_norms = row_norms(x)
    generator = torch.Generator().manual_seed(options.seed + index)
    dtype = _working_dtype(options)
    d = Directions(generator, x_norms.repeat_interleave(k), x.shape[1:], options.eps, dtype, device)

    taps = Taps(modules, [(b, w) for b in bn_names for w in ("in", "out")])
    size = rows_per_chunk(info.input_shape, info.output_shape)
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
        for group in row_slices(n_samples, size):
            # 2. Clean outputs f(x_l), with BatchNorm references.
            taps.refs = {}
            taps.start("reference")
            fx = block(x[group].clone())
            taps.freeze_reference()
            f_norms.extend(kept(row_norms(fx)))
            inactive.extend(kept((fx == 0).reshape(fx.shape[0], -1).double().mean(dim=1)))
            # 3. Perturbed outputs f(x_l + d), run j = i * K + k.
            for sample in group_runs(group, k, size, device):
                taps.start("compare", sample)
                out = block(x[group][sample] + d.take(len(sample)))
                deltas.extend(kept(distances(out, fx, sample, taps.layout)))
            del fx
    d_norms = d.finish()
    start = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32).to(device, dtype)
    return _BlockRuns(
        x_norms.double().cpu().numpy(), np.asarray(f_norms, dtype=np.float64),
        np.asarray(inactive, dtype=np.float64), np.asarray(deltas, dtype=np.float64), d_norms, start, taps, size,
    )


class _Ratios(NamedTuple):
    """``r`` of every run (NaN where undefined), the runs and samples where it is defined, and why not."""

    r: np.ndarray
    ok: np.ndarray
    valid_sample: np.ndarray
    notes: list[str]


def _ratios(runs: _BlockRuns, k: int) -> _Ratios:
    """Step 4: ``r`` per run; zero inputs and dead outputs have none."""
    xn, fn_ = runs.x_norms, runs.f_norms
    count = xn.size * k
    sample_of_run = np.arange(count) // k
    zero_input = xn <= 0
    dead = (~zero_input) & (fn_ <= _DEAD * xn)
    valid_sample = ~(zero_input | dead)
    r = np.full(count, np.nan)
    ok = valid_sample[sample_of_run]
    r[ok] = (runs.deltas[ok] / fn_[sample_of_run[ok]]) / (runs.d_norms[ok] / xn[sample_of_run[ok]])
    ok &= np.isfinite(r)
    notes = []
    if zero_input.any():
        notes.append(f"{int(zero_input.sum())} sample(s) with a zero block input: r undefined")
    if dead.any():
        notes.append(f"{int(dead.sum())} sample(s) with a dead (zero) block output: r undefined")
    return _Ratios(r, ok, valid_sample, notes)


@dataclass
class _Worst:
    """The worst direction's fields of :class:`BlockStability` (None where not searched), and notes."""

    gain: float | None = None
    gain_converged: bool | None = None
    gain_residual: float | None = None
    r: float | None = None
    r_converged: bool | None = None
    r_median: float | None = None
    share_paper: float | None = None
    share_linear: float | None = None
    unconverged: int | None = None
    notes: list[str] = field(default_factory=list)


def _worst_direction(
    block: nn.Module, x: torch.Tensor, runs: _BlockRuns, valid_sample: np.ndarray, options: StabilityOptions,
    batch_size: int | None, bounds: Bounds,
) -> _Worst:
    """Step 5: the largest singular value of ``J`` at every valid sample (:mod:`.krylov`)."""
    worst = _Worst()
    steps, tolerance = options.power_iterations, options.power_tolerance
    if steps == 0:
        worst.notes.append("power_iterations = 0: worst direction not searched")
        return worst
    valid = np.flatnonzero(valid_sample)
    if not len(valid):
        return worst
    jacobian_block = jacobian_copy(block)
    linearized = Linearized(jacobian_block)
    per_batch = batch_size if batch_size is not None else max(1, runs.size // 4)
    rounds = plan_rounds(len(valid), steps)
    valid_rows = torch.as_tensor(valid)
    runs_gk = GolubKahan(runs.start[valid_rows])
    alive = np.arange(len(valid))
    for race in rounds:
        # the race's best `keep` by gain so far (ties: the earlier sample) continue their own runs
        gains = runs_gk.gain.numpy()
        alive = alive[np.lexsort((alive, -gains[alive]))][: race.keep]
        active = alive[~runs_gk.converged.numpy()[alive]]  # converged here: an invariant Krylov space, exact
        for chunk in row_slices(len(active), per_batch):
            rows = torch.as_tensor(active[chunk])
            products = BlockProducts(jacobian_block, x[valid_rows[rows]], linearized)
            # no freezing at `tolerance` in the race: a frozen sample's steps would be lost, not given to
            # another, and a residual of 1e-2 can still sit 1-2 % below sigma_max (a lower singular value)
            runs_gk.advance(products, rows, race.steps, 0.0)
            del products
    found = runs_gk.result()
    del runs_gk
    gain, residual = found.gain.numpy(), found.residual.numpy()
    met = found.converged.numpy() | (residual <= tolerance)
    worst.unconverged = int((~met).sum())
    top = int(np.argmax(gain))
    worst.gain, worst.gain_converged, worst.gain_residual = float(gain[top]), bool(met[top]), float(residual[top])
    if not worst.gain_converged:
        worst.notes.append(
            f"worst_gain is a lower bound: its Lanczos run stopped at relative residual {residual[top]:.2g} "
            f"> {tolerance:g} (raise power_iterations)"
        )
    if worst.unconverged:
        raced = (f"; the better half continued round by round, up to {int(found.steps.max())} steps"
                 if len(rounds) > 1 else "")
        worst.notes.append(
            f"{worst.unconverged} of {len(valid)} sample(s) did not meet the residual test ({rounds[0].steps} steps"
            f"{raced}): their worst-direction r is a lower bound, and so are worst_r_median and the worst shares"
        )
    ratios = gain * runs.x_norms[valid] / runs.f_norms[valid]
    worst.r, worst.r_converged = float(ratios.max()), bool(met[int(np.argmax(ratios))])
    worst.r_median = float(np.median(ratios))
    worst.share_paper = share(ratios, bounds[0])
    worst.share_linear = share(ratios, bounds[1])
    return worst


def _measure_block(
    index: int,
    info: BlockInfo,
    block: nn.Module,
    modules: Mapping[str, nn.Module],
    bn_names: Sequence[str],
    x: torch.Tensor,
    options: StabilityOptions,
    batch_size: int | None,
    bounds: Bounds,
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
        The block's clean inputs (activations of the real images), in the working dtype.
    options : StabilityOptions
        eps, directions, seed, power_iterations and power_tolerance as in
        :func:`measure_stability`.
    batch_size : int or None
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
    Steps: 1. seeded directions and the power-iteration start; 2. clean outputs;
    3. perturbed outputs (these three: :func:`_random_runs`); 4. the ratio per run
    (zero inputs and dead outputs excluded and counted: :func:`_ratios`); 5. the
    worst direction by Golub-Kahan-Lanczos runs raced across the samples (:func:`_worst_direction`).
    """
    runs = _random_runs(index, info, block, modules, bn_names, x, options, batch_size)
    ratios = _ratios(runs, options.directions)
    valid_r, valid_sample = ratios.r[ratios.ok], ratios.valid_sample
    r_min, r_median, r_max = stats(valid_r)
    notes = ratios.notes
    for kappa, which in ((bounds[0], "paper"), (bounds[1], "linear")):
        if kappa is None:
            notes.append(f"no kappa_{which} given: shares inside the {which} bounds are null")
    worst = _worst_direction(block, x, runs, valid_sample, options, batch_size, bounds)
    notes.extend(worst.notes)
    count = int(ratios.ok.sum())
    result = BlockStability(
        name=info.name,
        stage=info.stage,
        shortcut=info.shortcut,
        n=count,
        excluded=int(ratios.r.size - count),
        r_min=r_min,
        r_median=r_median,
        r_max=r_max,
        share_in_paper_bounds=share(valid_r, bounds[0]),
        share_in_linear_bounds=share(valid_r, bounds[1]),
        worst_gain=worst.gain,
        worst_r=worst.r,
        worst_r_median=worst.r_median,
        worst_share_in_paper_bounds=worst.share_paper,
        worst_share_in_linear_bounds=worst.share_linear,
        inactive_share=float(runs.inactive[valid_sample].mean()) if valid_sample.any() else None,
        worst_unconverged=worst.unconverged,
        worst_gain_converged=worst.gain_converged,
        worst_gain_residual=worst.gain_residual,
        worst_r_converged=worst.r_converged,
        ratios=tuple(float(v) if good else None for v, good in zip(ratios.r, ratios.ok)),
        notes=tuple(notes),
    )
    bns = [_batchnorm_result(name, info.name, runs.taps, "block-local") for name in bn_names]
    return result, bns


# --------------------------------------------------------------------------- the trajectory


@dataclass
class _LogitRuns:
    """``||Δ logits||`` and ``||logits||`` per run, the runs whose predicted class changed, and whether
    every output was a tensor of shape (N, classes)."""

    delta: list[float] = field(default_factory=list)
    norm: list[float] = field(default_factory=list)
    flips: int = 0
    ok: bool = True


def _trajectory_runs(
    model: nn.Module, taps: Taps, anatomy: Anatomy, images: torch.Tensor, options: StabilityOptions,
    batch_size: int | None,
) -> _LogitRuns:
    """The whole network on the images and on every perturbed image, in groups; ``taps`` compare the points."""
    n_samples, k = images.shape[0], options.directions
    device = images.device
    # 1. Input perturbations (package docstring: stream seed + number of blocks).
    x_norms = row_norms(images)
    generator = torch.Generator().manual_seed(options.seed + len(anatomy.blocks))
    d = Directions(generator, x_norms.repeat_interleave(k), images.shape[1:], options.eps, _working_dtype(options),
                   device)

    shapes = [tuple(anatomy.input_shape)] + [b.input_shape for b in anatomy.blocks]
    step = rows_per_chunk(*shapes, *(b.output_shape for b in anatomy.blocks))
    step = max(k, step - step % k)  # whole samples (see distances)
    # Clean references of a group of samples are held for every tapped point.
    group = max(1, step // (len(taps.points) // 4 + 1) // k)
    if batch_size is not None:
        step, group = batch_size * k, batch_size
    logits = _LogitRuns()
    with taps, torch.no_grad():
        for samples in row_slices(n_samples, group):
            # 2. Clean pass of the group, keeping every tapped activation.
            taps.refs = {}
            taps.start("reference")
            clean = model(images[samples])
            taps.freeze_reference()
            # 3. Perturbed passes of the group's runs.
            for local in group_runs(samples, k, step, device):
                taps.start("compare", local)
                out = model(images[samples][local] + d.take(len(local)))
                if (
                    isinstance(clean, torch.Tensor) and clean.dim() == 2
                    and isinstance(out, torch.Tensor) and out.shape[0] == local.shape[0]
                ):
                    ref = clean[local]
                    logits.delta.extend(kept(row_norms(out - ref)))
                    logits.norm.extend(kept(row_norms(ref)))
                    logits.flips += int((out.argmax(dim=1) != ref.argmax(dim=1)).sum())
                else:
                    logits.ok = False
    return logits


def _trajectory(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    anatomy: Anatomy,
    images: torch.Tensor,
    outer_bns: Sequence[str],
    options: StabilityOptions,
    batch_size: int | None = None,
) -> tuple[Trajectory, list[BatchNormStability]]:
    """One input perturbation per run followed through the whole network, and the BatchNorms outside blocks."""
    blocks = [b.name for b in anatomy.blocks]
    points = [(b, "out") for b in blocks] + ([(blocks[0], "in")] if blocks else [])
    points += [(b, w) for b in outer_bns for w in ("in", "out")]
    taps = Taps(modules, points)
    runs = _trajectory_runs(model, taps, anatomy, images, options, batch_size)

    def point(name: str, key: tuple[str, str]) -> TrajectoryPoint:
        return _point(name, ratio_or_nan(*taps.relative(key)))

    logits = None
    if runs.ok and runs.delta:
        logits = _point(
            "logits",
            ratio_or_nan(
                np.asarray(runs.delta, dtype=np.float64),
                np.asarray(runs.norm, dtype=np.float64),
            ),
        )
    trajectory = Trajectory(
        points=tuple(point(b, (b, "out")) for b in blocks),
        stem=point("stem", (blocks[0], "in")) if blocks else None,
        logits=logits,
        flips=runs.flips if logits is not None else None,
        runs=images.shape[0] * options.directions,
    )
    bns = [_batchnorm_result(name, None, taps, "trajectory") for name in outer_bns]
    return trajectory, bns


# --------------------------------------------------------------------------- entry point


def _working_copy(
    model: nn.Module, anatomy: Anatomy, images: torch.Tensor, target: torch.device, dtype: torch.dtype,
) -> tuple[nn.Module, dict[str, nn.Module], torch.Tensor]:
    """A private copy of ``model`` in eval mode and the working precision, its modules by name, and the images."""
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
    return work, modules, x


def _batchnorms(work: nn.Module, anatomy: Anatomy) -> tuple[dict[str, list[str]], list[str]]:
    """The BatchNorm layers inside each block (by block name), and those outside every block."""
    bns = _bn_modules(work)
    block_names = [b.name for b in anatomy.blocks]
    inner = {b: [n for n in bns if _inside(n, b)] for b in block_names}
    outer = [n for n in bns if not any(_inside(n, b) for b in block_names)]
    return inner, outer


def _measure_blocks(
    work: nn.Module, modules: Mapping[str, nn.Module], anatomy: Anatomy, x: torch.Tensor, chosen: Collection[int],
    inner: Mapping[str, Sequence[str]], options: StabilityOptions, batch_size: int | None,
    bounds: Mapping[str, Bounds], tick: Callable[[], None],
) -> tuple[list[BlockStability], list[BatchNormStability]]:
    """The ``chosen`` blocks one by one, their inputs captured in groups that fit in memory."""
    block_results: list[BlockStability] = []
    bn_results: list[BatchNormStability] = []
    for group in capture_groups(anatomy, x.shape[0]):
        group = [index for index in group if index in chosen]
        if not group:
            continue
        inputs = capture(work, modules, x, [anatomy.blocks[i].name for i in group], batch_size)
        for index in group:
            info = anatomy.blocks[index]
            result, bn = _measure_block(
                index, info, modules[info.name], modules, inner[info.name], inputs.pop(info.name), options, batch_size,
                bounds.get(info.name, (None, None)),
            )
            block_results.append(result)
            bn_results.extend(bn)
            tick()
    return block_results, bn_results


def measure_stability(
    model: nn.Module,
    anatomy: Anatomy,
    images: torch.Tensor,
    *,
    eps: float = STABILITY_DEFAULTS.eps,
    directions: int = STABILITY_DEFAULTS.directions,
    seed: int = STABILITY_DEFAULTS.seed,
    power_iterations: int = STABILITY_DEFAULTS.power_iterations,
    power_tolerance: float = STABILITY_DEFAULTS.power_tolerance,
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = getattr(torch, STABILITY_DEFAULTS.dtype),
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
        Seeds every random stream (see the package docstring for the recipe).
    power_iterations : int
        The worst direction's budget per block: the work of ``P`` power steps per sample
        (``P`` products ``J v`` and ``P - 1`` products ``J^T u``), spent as Lanczos steps in a
        race among the samples (:func:`~.krylov.plan_rounds`); 0 skips it. At ``P = 8`` and 32
        samples ``worst_gain`` was within 1 % of 100-step runs in 51 of 52 blocks of
        ResNet-20, ResNet-56 and ResNet-50 (docs/method.md).
    power_tolerance : float
        Residual test of the worst direction: a sample's top Ritz value counts as
        converged when its relative Lanczos residual is at most this (package
        docstring); samples whose final residual is larger are counted in
        ``worst_unconverged`` and their values are lower bounds.
    bounds : mapping of str to (float or None, float or None), optional
        Block name -> (kappa_paper, kappa_linear): the paper's (residual, or plain for
        plain blocks) and the exact linearized condition number.
    progress : callable (done, total), optional
        Called with ``(done, total)`` after each block and after the trajectory
        (``total = len(anatomy.blocks) + 1``).
    device : str or torch.device
    dtype : torch.dtype
        ``torch.float32`` (default; ``r`` keeps about four digits at ``eps = 1e-3``,
        package docstring) or ``torch.float64``.
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
    check_options(eps, directions, seed, power_iterations, dtype)
    check_power(power_tolerance, batch_size)
    images = check_images(images, anatomy)
    checked_bounds = check_bounds(bounds, anatomy)
    target = check_device(device)
    batch_size = None if batch_size is None else int(batch_size)

    # 2. A private copy in eval mode and the working precision.
    work, modules, x = _working_copy(model, anatomy, images, target, dtype)
    options = StabilityOptions(
        eps=float(eps), directions=int(directions), samples=int(x.shape[0]), power_iterations=int(power_iterations),
        power_tolerance=float(power_tolerance), seed=int(seed), dtype=str(dtype).removeprefix("torch."),
    )
    inner, outer = _batchnorms(work, anatomy)
    chosen = set(range(len(anatomy.blocks)) if only_blocks is None else only_blocks)
    total = len(chosen) + int(with_trajectory)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # 3. Block by block, capturing inputs in groups that fit in memory.
    block_results, bn_results = _measure_blocks(
        work, modules, anatomy, x, chosen, inner, options, batch_size, checked_bounds, tick
    )

    # 4. The trajectory of one input perturbation through the whole network.
    trajectory, outer_results = Trajectory((), None, None, None, 0), []
    if with_trajectory:
        trajectory, outer_results = _trajectory(work, modules, anatomy, x, outer, options, batch_size)
        tick()

    notes = []
    if not anatomy.blocks:
        notes.append("no blocks found: only the trajectory's logits were measured")
    if bounds is None:
        notes.append("no kappa bounds given: shares inside the bounds are null")
    return StabilityReport(
        eps=options.eps,
        directions=options.directions,
        samples=options.samples,
        seed=options.seed,
        power_iterations=options.power_iterations,
        dtype=options.dtype,
        blocks=tuple(block_results),
        batchnorm=tuple(outer_results + bn_results),
        trajectory=trajectory,
        notes=tuple(notes),
        power_tolerance=options.power_tolerance,
        batch_size=batch_size,
    )
