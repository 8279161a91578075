"""Tests of auditor.analysis.stability (Lemmas 2, 3 and the trajectory).

Every reference value is recomputed here independently: the perturbations from the
documented generator recipe, the blocks by explicit code, Jacobians densely.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor.analysis.stability import StabilityReport, measure_stability
from auditor.analysis.stability import capture as capture_module
from auditor.analysis.stability import chunks as chunks_module
from auditor.analysis.stability.chunks import concatenate, distances, kept, repeats
from auditor.analysis.stability.directions import Directions
from auditor.analysis.stability.krylov import GolubKahan, Round, largest_gain, plan_rounds
from auditor.analysis.stability.linearized import BlockProducts, Linearized, Reverse, jacobian_copy
from auditor.errors import InputError, UsageError
from auditor.models.anatomy import analyze_anatomy
from auditor.models.registry import build_model
from _reference import directions as _directions

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHECKPOINT = DATA / "checkpoints" / "cifar10-resnet20-akamaster.th"
IMAGES = DATA / "images" / "cifar10-test-200"


# --------------------------------------------------------------------------- helpers


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _close(actual: float | None, expected: float, rel: float = 1e-6) -> bool:
    return actual is not None and math.isclose(actual, expected, rel_tol=rel, abs_tol=0.0)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    """A CIFAR ResNet-20 with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model, _ = build_model("resnet20")
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            module.running_var.copy_(0.5 + torch.rand(c, generator=g))
            module.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            module.bias.data.copy_(0.2 * torch.randn(c, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def anatomy20(resnet20):
    return analyze_anatomy(resnet20, (3, 32, 32))


def _images(n: int, seed: int = 3, shape=(3, 32, 32)) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


class LinearBlock(nn.Module):
    """x -> W2 W1 x + x with no nonlinearity: the block is exactly A = W2 W1 + I."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x


class ReluBlock(nn.Module):
    """relu(conv2(relu(conv1 x)) + x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + x)


class TinyNet(nn.Module):
    def __init__(self, block: nn.Module, channels: int = 2, size: int = 3) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(channels * size * size, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).flatten(1))


def _tiny(block_cls, seed: int = 0, channels: int = 2, size: int = 3):
    torch.manual_seed(seed)
    net = TinyNet(block_cls(channels), channels, size).eval()
    return net, analyze_anatomy(net, (channels, size, size))


# --------------------------------------------------------------------------- Lemma 2


@pytest.mark.slow
def test_block_ratios_match_a_hand_run_block(resnet20, anatomy20):
    """r of every run of layer2.0 (option-A shortcut) against explicit code."""
    n, k, seed, eps = 3, 2, 5, 1e-3
    x = _images(n)
    report = measure_stability(
        resnet20, anatomy20, x, eps=eps, directions=k, seed=seed, power_iterations=0, dtype=torch.float64
    )
    index = [b.name for b in anatomy20.blocks].index("layer2.0")
    assert index == 3
    m = copy.deepcopy(resnet20).double()
    with torch.no_grad():
        h = F.relu(m.bn1(m.conv1(x.double())))
        for blk in m.layer1:
            h = blk(h)
        b = m.layer2[0]

        def block(t: torch.Tensor) -> torch.Tensor:
            branch = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(t)))))
            shortcut = F.pad(t[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
            return F.relu(branch + shortcut)

        d = _directions(seed + index, n * k, h.shape[1:], h, eps)
        xs = h.repeat_interleave(k, 0)
        fx = block(xs)
        r = (_norms(block(xs + d) - fx) / _norms(fx)) / (_norms(d) / _norms(xs))
    result = report.blocks[index]
    assert result.name == "layer2.0" and result.stage == "layer2"
    assert result.n == n * k and result.excluded == 0
    for got, want in zip(result.ratios, r.tolist()):
        assert _close(got, want), (got, want)
    assert _close(result.r_min, min(r.tolist()))
    assert _close(result.r_max, max(r.tolist()))
    assert _close(result.r_median, float(np.median(r.numpy())))


@pytest.mark.slow
def test_linear_block_matches_closed_form_and_dense_jacobian():
    net, anatomy = _tiny(LinearBlock)
    assert [b.name for b in anatomy.blocks] == ["block"]
    n, k, seed, eps = 4, 3, 7, 1e-3
    x = _images(n, shape=(2, 3, 3))
    block = copy.deepcopy(net.block).double()
    a = torch.autograd.functional.jacobian(block, x[:1].double()).reshape(18, 18)
    singular = torch.linalg.svdvals(a)
    kappa = float(singular[0] / singular[-1])
    report = measure_stability(
        net, anatomy, x, eps=eps, directions=k, seed=seed, power_iterations=300,
        power_tolerance=0.0, bounds={"block": (1.0, kappa)}, dtype=torch.float64,
    )
    result = report.blocks[0]
    xd = x.double().reshape(n, 18)
    d = _directions(seed + 0, n * k, (2, 3, 3), x.double(), eps).reshape(n * k, 18)
    xs = xd.repeat_interleave(k, 0)
    r = ((d @ a.T).norm(dim=1) / (xs @ a.T).norm(dim=1)) / (d.norm(dim=1) / xs.norm(dim=1))
    for got, want in zip(result.ratios, r.tolist()):
        assert _close(got, want, 1e-9)
    assert _close(result.worst_gain, float(singular[0]), 1e-4)
    worst = float(singular[0]) * xd.norm(dim=1) / (xd @ a.T).norm(dim=1)
    assert _close(result.worst_r, float(worst.max()), 1e-4)
    # Lemma 2 holds exactly for a linear operator with its exact condition number ...
    assert result.share_in_linear_bounds == 1.0
    assert result.worst_share_in_linear_bounds == 1.0
    # ... and no r of a generic direction equals exactly 1.
    assert result.share_in_paper_bounds == 0.0
    assert all(1 / kappa <= v <= kappa for v in result.ratios)


@pytest.mark.slow
def test_relu_block_worst_gain_matches_dense_jacobian_per_sample():
    net, anatomy = _tiny(ReluBlock, seed=2, channels=2, size=4)
    n = 3
    x = _images(n, seed=11, shape=(2, 4, 4))
    report = measure_stability(
        net, anatomy, x, directions=1, power_iterations=300, power_tolerance=0.0, dtype=torch.float64
    )
    block = copy.deepcopy(net.block).double()
    gains, worst = [], []
    for i in range(n):
        xi = x[i : i + 1].double()
        j = torch.autograd.functional.jacobian(block, xi).reshape(32, 32)
        sigma = float(torch.linalg.svdvals(j)[0])
        gains.append(sigma)
        with torch.no_grad():
            worst.append(sigma * float(xi.norm() / block(xi).norm()))
    result = report.blocks[0]
    assert _close(result.worst_gain, max(gains), 1e-4)
    assert _close(result.worst_r, max(worst), 1e-4)
    assert _close(result.worst_r_median, float(np.median(worst)), 1e-4)


def test_dead_outputs_are_excluded_not_nan():
    net, anatomy = _tiny(ReluBlock, channels=2, size=3)
    with torch.no_grad():
        for conv in (net.block.conv1, net.block.conv2):
            conv.weight.zero_()
            conv.bias.zero_()
    x = torch.stack([torch.ones(2, 3, 3), -torch.ones(2, 3, 3)])  # second: relu(x) = 0
    report = measure_stability(net, anatomy, x, directions=3, power_iterations=2, dtype=torch.float64)
    result = report.blocks[0]
    assert (result.n, result.excluded) == (3, 3)
    assert result.ratios[3:] == (None, None, None)
    assert _close(result.r_median, 1.0, 1e-9)  # identity on the positive sample
    assert any("dead" in note for note in result.notes)
    json.dumps(report.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- Lemma 3


def test_batchnorm_ratio_matches_direct_computation(resnet20, anatomy20):
    n, k, seed, eps = 3, 2, 4, 1e-3
    x = _images(n, seed=9)
    report = measure_stability(
        resnet20, anatomy20, x, eps=eps, directions=k, seed=seed, power_iterations=0, dtype=torch.float64
    )
    by_name = {b.name: b for b in report.batchnorm}
    m = copy.deepcopy(resnet20).double()

    def check(name, inp, inp_perturbed, bn, block):
        with torch.no_grad():
            out, out_p = bn(inp), bn(inp_perturbed)
        before = _norms(inp_perturbed - inp) / _norms(inp)
        after = _norms(out_p - out) / _norms(out)
        ratio = (after / before).numpy()
        got = by_name[name]
        assert got.block == block and got.n == n * k and got.excluded == 0
        assert _close(got.ratio_min, float(ratio.min()))
        assert _close(got.ratio_median, float(np.median(ratio)))
        assert _close(got.ratio_max, float(ratio.max()))
        assert _close(got.before_median, float(np.median(before.numpy())))
        assert _close(got.after_median, float(np.median(after.numpy())))

    with torch.no_grad():
        # layer1.0.bn1 in its block's local runs (stream seed + 0).
        xl = F.relu(m.bn1(m.conv1(x.double())))
        d = _directions(seed + 0, n * k, xl.shape[1:], xl, eps)
        xs = xl.repeat_interleave(k, 0)
        conv = m.layer1[0].conv1
        check("layer1.0.bn1", conv(xs), conv(xs + d), m.layer1[0].bn1, "layer1.0")
        # The stem's bn1 in the trajectory runs (stream seed + number of blocks).
        d = _directions(seed + len(anatomy20.blocks), n * k, (3, 32, 32), x.double(), eps)
        xs = x.double().repeat_interleave(k, 0)
        check("bn1", m.conv1(xs), m.conv1(xs + d), m.bn1, None)
    assert {b.name for b in report.batchnorm} == {
        name for name, mod in resnet20.named_modules() if isinstance(mod, nn.BatchNorm2d)
    }


# --------------------------------------------------------------------------- trajectory


def test_trajectory_matches_an_independent_whole_network_run(resnet20, anatomy20):
    n, k, seed, eps = 3, 2, 8, 1e-3
    x = _images(n, seed=5)
    report = measure_stability(
        resnet20, anatomy20, x, eps=eps, directions=k, seed=seed, power_iterations=0, dtype=torch.float64
    )
    m = copy.deepcopy(resnet20).double()
    xs = x.double().repeat_interleave(k, 0)
    d = _directions(seed + len(anatomy20.blocks), n * k, (3, 32, 32), x.double(), eps)

    def run(t: torch.Tensor):
        states = {"stem": F.relu(m.bn1(m.conv1(t)))}
        h = states["stem"]
        for stage in (m.layer1, m.layer2, m.layer3):
            for i, blk in enumerate(stage):
                h = blk(h)
                states[f"layer{(m.layer1, m.layer2, m.layer3).index(stage) + 1}.{i}"] = h
        logits = m.linear(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return states, logits

    with torch.no_grad():
        clean, logits = run(xs)
        noisy, logits_p = run(xs + d)
    trajectory = report.trajectory
    assert [p.name for p in trajectory.points] == [b.name for b in anatomy20.blocks]
    for p in (*trajectory.points, trajectory.stem):
        rel = (_norms(noisy[p.name] - clean[p.name]) / _norms(clean[p.name])).numpy()
        assert p.n == n * k
        assert _close(p.median, float(np.median(rel)))
        assert _close(p.min, float(rel.min())) and _close(p.max, float(rel.max()))
    rel = (_norms(logits_p - logits) / _norms(logits)).numpy()
    assert _close(trajectory.logits.median, float(np.median(rel)))
    assert trajectory.flips == int((logits.argmax(1) != logits_p.argmax(1)).sum())
    assert trajectory.runs == n * k


# --------------------------------------------------------------------------- contract


@pytest.mark.slow
def test_same_seed_same_report_and_other_seed_differs(resnet20, anatomy20):
    x = _images(2, seed=1)
    kwargs = dict(directions=2, power_iterations=1)
    a = measure_stability(resnet20, anatomy20, x, seed=3, **kwargs)
    b = measure_stability(resnet20, anatomy20, x.clone(), seed=3, **kwargs)
    c = measure_stability(resnet20, anatomy20, x, seed=4, **kwargs)
    assert a == b
    assert a.to_dict() == b.to_dict()
    assert [blk.ratios for blk in a.blocks] != [blk.ratios for blk in c.blocks]


@pytest.mark.slow
def test_chunked_runs_equal_one_batch(resnet20, anatomy20, monkeypatch):
    x = _images(2, seed=2)
    kwargs = dict(directions=3, power_iterations=1, seed=1, dtype=torch.float64)
    whole = measure_stability(resnet20, anatomy20, x, **kwargs)
    monkeypatch.setattr(chunks_module, "_CHUNK_ELEMENTS", 20_000)
    monkeypatch.setattr(capture_module, "_CAPTURE_ELEMENTS", 100_000)
    chunked = measure_stability(resnet20, anatomy20, x, **kwargs)
    for u, v in zip(whole.blocks, chunked.blocks):
        assert np.allclose(u.ratios, v.ratios, rtol=1e-9, atol=0)
        assert math.isclose(u.worst_gain, v.worst_gain, rel_tol=1e-9)
    for p, q in zip(whole.trajectory.points, chunked.trajectory.points):
        assert math.isclose(p.median, q.median, rel_tol=1e-9)


@pytest.mark.slow
def test_progress_json_safety_and_model_untouched(resnet20, anatomy20):
    before = {k: v.clone() for k, v in resnet20.state_dict().items()}
    calls = []
    report = measure_stability(
        resnet20, anatomy20, _images(2), directions=np.int64(1), power_iterations=1,
        eps=np.float32(1e-3),
        progress=lambda done, total: calls.append((done, total)),
    )
    total = len(anatomy20.blocks) + 1
    assert calls == [(i, total) for i in range(1, total + 1)]
    after = resnet20.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(resnet20.parameters()).dtype == torch.float32
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in resnet20.modules())
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["samples"] == 2 and data["dtype"] == "float32"
    assert "ratios" not in data["blocks"][0]
    assert data["blocks"][0]["share_in_paper_bounds"] is None
    assert len(report.blocks[0].to_dict(include_ratios=True)["ratios"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(eps=0.0), "eps must be a number in \\(0, 1\\), got 0.0"),
        (dict(eps=2), "eps must be a number in \\(0, 1\\), got 2"),
        (dict(eps=float("nan")), "eps .* got nan"),
        (dict(directions=0), "directions must be an integer >= 1, got 0"),
        (dict(directions=1.5), "directions .* got 1.5"),
        (dict(power_iterations=-1), "power_iterations .* got -1"),
        (dict(seed=-2), "seed .* got -2"),
        (dict(bounds={"layer9.9": (2.0, 2.0)}), "unknown block 'layer9.9'"),
        (dict(bounds={"layer1.0": (0.5, None)}), "0.5; a condition number is >= 1"),
    ],
)
def test_bad_options_raise_input_error(resnet20, anatomy20, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        measure_stability(resnet20, anatomy20, _images(1), **kwargs)


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        (torch.full((1, 3, 32, 32), float("nan")), "3072 non-finite values"),
        (torch.zeros(2, 3, 16, 16), r"shape \(N, 3, 32, 32\) .* got \(2, 3, 16, 16\)"),
        (torch.zeros(3, 32, 32), r"got \(3, 32, 32\)"),
        (torch.zeros(0, 3, 32, 32), r"got \(0, 3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "dtype torch.uint8"),
        ([[1.0]], "got list"),
    ],
)
def test_bad_images_raise_input_error(resnet20, anatomy20, images, pattern):
    with pytest.raises(InputError, match=pattern):
        measure_stability(resnet20, anatomy20, images)


def test_bad_device_raises_usage_error(resnet20, anatomy20):
    with pytest.raises(UsageError, match="unknown device 'nope'"):
        measure_stability(resnet20, anatomy20, _images(1), device="nope")


# --------------------------------------------------------------------------- real data


def _real_images(n: int) -> torch.Tensor:
    from PIL import Image

    paths = sorted(IMAGES.rglob("*.png"))
    paths = paths[:: len(paths) // n][:n]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths]
    return (torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) - mean) / std


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not CHECKPOINT.exists(), reason=f"real checkpoint not found: {CHECKPOINT}")
def test_real_resnet20(capfd):
    from auditor.models.load import load_checkpoint, load_model

    model = load_model(load_checkpoint(CHECKPOINT)).model
    anatomy = analyze_anatomy(model, (3, 32, 32))
    images = _real_images(16)
    bounds = {b.name: (2.0, 4.0) for b in anatomy.blocks}
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = measure_stability(
            model, anatomy, images, directions=2, power_iterations=2, bounds=bounds
        )
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert isinstance(report, StabilityReport) and len(report.blocks) == 9
    for block in report.blocks:
        assert block.n == 32 and block.excluded == 0
        assert 0 < block.r_min <= block.r_median <= block.r_max < 100
        assert block.worst_r >= block.r_median * 0.5
        for share in (
            block.share_in_paper_bounds, block.share_in_linear_bounds,
            block.worst_share_in_paper_bounds, block.worst_share_in_linear_bounds,
            block.inactive_share,
        ):
            assert 0.0 <= share <= 1.0
    for point in (*report.trajectory.points, report.trajectory.logits):
        assert 0 < point.min <= point.median <= point.max < 1
    assert 0 <= report.trajectory.flips <= report.trajectory.runs
    json.dumps(report.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------- precision, convergence, batching


class ChannelScale(nn.Module):
    """x -> s_c x_c per channel: J is diagonal with sigma_max = max |s_c|."""

    def __init__(self, scales) -> None:
        super().__init__()
        self.register_buffer("s", torch.tensor(scales, dtype=torch.float32).view(1, -1, 1, 1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.s


def test_lanczos_stops_once_the_krylov_space_is_invariant(monkeypatch):
    block = ChannelScale([3.0, 1.0]).double()
    x = _images(3, shape=(2, 3, 3)).double()
    v = _images(3, seed=4, shape=(2, 3, 3)).double()
    linear_calls = []  # products by the linearized copy (a deep copy: its calls are not block.calls)
    original = Linearized.__call__
    monkeypatch.setattr(Linearized, "__call__", lambda self, t: linear_calls.append(1) or original(self, t))
    found = largest_gain(block, x, v, 100, 1e-8)
    # two distinct singular values (3 and 1): the Krylov space is invariant after two steps,
    # the residual is zero there, and the 100 allowed steps are never used
    assert found.converged.all() and (found.steps == 2).all()
    assert block.calls + len(linear_calls) < 10
    assert np.allclose(found.gain.numpy(), 3.0, rtol=1e-12)
    assert (found.residual < 1e-12).all()
    # a block without that structure and no tolerance: every step is made
    net, _ = _tiny(ReluBlock, seed=2, channels=2, size=4)
    x, v = _images(2, seed=11, shape=(2, 4, 4)), _images(2, seed=12, shape=(2, 4, 4))
    found = largest_gain(jacobian_copy(net.block), x, v, 6, 0.0)
    assert not found.converged.any() and (found.steps == 6).all()


def test_the_step_budget_goes_to_the_samples_that_may_hold_the_maximum():
    """Survey steps everywhere, then the better half continues round by round; never more work in all."""
    for samples in (1, 2, 3, 5, 8, 32, 61):
        for steps in (1, 3, 4, 8, 20):
            rounds = plan_rounds(samples, steps)
            assert rounds[0].keep == samples
            # the power iteration's work in forward passes (steps J v at 1, steps - 1 J^T u at 2): a Lanczos
            # step costs 3, each row of a round records its forward pass (1)
            used = sum(r.keep * (1 + 3 * r.steps) for r in rounds)
            assert used <= samples * (3 * steps - 2) or rounds == (Round(samples, steps),)
            assert all(a.keep > b.keep for a, b in zip(rounds, rounds[1:]))  # halving, never a round twice
            if len(rounds) > 1:
                assert rounds[-1].keep == 1 and sum(r.steps for r in rounds) >= steps
    assert [r.keep for r in plan_rounds(32, 8)] == [32, 8, 4, 2, 1]  # the cut to 16 gets no step: it only halves
    assert sum(r.steps for r in plan_rounds(32, 8)) == 37
    assert plan_rounds(1, 8) == (Round(1, 8),)


def test_a_run_continued_is_the_run_made_at_once():
    """GolubKahan.advance in parts, on a subset, equals one run of as many steps (the racing rounds rely on it)."""
    net, _ = _tiny(ReluBlock, seed=2, channels=2, size=4)
    block = jacobian_copy(net.block)
    x, v = _images(3, seed=11, shape=(2, 4, 4)), _images(3, seed=12, shape=(2, 4, 4))
    x, v = x.double(), v.double()
    block = block.double()
    at_once = largest_gain(block, x, v, 7, 0.0)
    runs = GolubKahan(v)
    runs.advance(BlockProducts(block, x), torch.arange(3), 3, 0.0)
    rows = torch.tensor([0, 2])
    runs.advance(BlockProducts(block, x[rows]), rows, 4, 0.0)
    parts = runs.result()
    assert parts.steps.tolist() == [7, 3, 7]
    assert torch.allclose(parts.gain[rows], at_once.gain[rows], rtol=1e-12, atol=0)
    assert torch.allclose(parts.residual[rows], at_once.residual[rows], rtol=1e-9, atol=1e-15)
    # the row left behind kept its 3-step value: a lower bound of the 7-step one (interlacing)
    assert parts.gain[1] <= at_once.gain[1] + 1e-12
    with pytest.raises(ValueError, match="different steps"):
        runs.advance(BlockProducts(block, x), torch.arange(3), 1, 0.0)


def test_unconverged_power_iteration_is_reported():
    net, anatomy = _tiny(ReluBlock, seed=2, channels=2, size=4)
    x = _images(3, seed=11, shape=(2, 4, 4))
    report = measure_stability(net, anatomy, x, directions=1, power_iterations=2, power_tolerance=1e-12)
    result = report.blocks[0]
    assert result.worst_unconverged == 3 and result.worst_gain_converged is False
    assert result.worst_gain_residual > 1e-12
    assert any("did not meet the residual test" in note and "3 of 3" in note for note in result.notes)
    assert any("worst_gain is a lower bound" in note for note in result.notes)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["blocks"][0]["worst_unconverged"] == 3 and data["power_tolerance"] == 1e-12
    assert data["blocks"][0]["worst_gain_converged"] is False
    # Still a lower bound of the true gain.
    block = copy.deepcopy(net.block).double()
    sigmas = [
        float(torch.linalg.svdvals(
            torch.autograd.functional.jacobian(block, x[i : i + 1].double()).reshape(32, 32)
        )[0])
        for i in range(3)
    ]
    assert result.worst_gain <= max(sigmas) * (1 + 1e-6)
    converged = measure_stability(net, anatomy, x, directions=1, power_iterations=300)
    assert converged.blocks[0].worst_unconverged == 0 and converged.blocks[0].worst_gain_converged
    # converged: the certificate holds (a singular value within rho of the gain: here the largest
    # one, to far better than rho), and the gain is never above it
    best = converged.blocks[0]
    assert abs(best.worst_gain - max(sigmas)) <= best.worst_gain_residual * best.worst_gain
    assert best.worst_gain == pytest.approx(max(sigmas), rel=1e-3)
    assert best.worst_gain <= max(sigmas) * (1 + 1e-6)
    assert not any("did not converge" in note for note in converged.blocks[0].notes)


@pytest.mark.slow
def test_float32_agrees_with_float64_within_the_stated_precision(resnet20, anatomy20):
    """The module docstring: r keeps about four digits in float32 at eps = 1e-3."""
    x = _images(3, seed=6)
    kwargs = dict(directions=2, power_iterations=4, power_tolerance=0.0, seed=2)
    single = measure_stability(resnet20, anatomy20, x, **kwargs)
    double = measure_stability(resnet20, anatomy20, x, dtype=torch.float64, **kwargs)
    assert single.dtype == "float32" and double.dtype == "float64"
    for a, b in zip(single.blocks, double.blocks):
        assert np.allclose(a.ratios, b.ratios, rtol=1e-3, atol=0), a.name
        assert math.isclose(a.worst_gain, b.worst_gain, rel_tol=1e-4), a.name
    for p, q in zip(single.trajectory.points, double.trajectory.points):
        assert math.isclose(p.median, q.median, rel_tol=1e-3), p.name
    # ... and it is not float64 in disguise.
    assert any(a.ratios != b.ratios for a, b in zip(single.blocks, double.blocks))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_size_does_not_change_the_numbers(resnet20, anatomy20, dtype):
    x = _images(3, seed=2)
    kwargs = dict(directions=2, power_iterations=3, seed=1, dtype=dtype)
    whole = measure_stability(resnet20, anatomy20, x, **kwargs)
    one = measure_stability(resnet20, anatomy20, x, batch_size=1, **kwargs)
    assert one.batch_size == 1 and whole.batch_size is None
    # float32: oneDNN's kernels depend on the batch size, so rounding differs (~1e-5).
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for u, v in zip(whole.blocks, one.blocks):
        assert np.allclose(u.ratios, v.ratios, rtol=rtol, atol=0), u.name
        assert math.isclose(u.worst_gain, v.worst_gain, rel_tol=rtol), u.name
        assert math.isclose(u.worst_r_median, v.worst_r_median, rel_tol=rtol), u.name
        assert u.worst_unconverged == v.worst_unconverged
    for p, q in zip(whole.trajectory.points, one.trajectory.points):
        assert math.isclose(p.median, q.median, rel_tol=rtol)
    # the BatchNorm references are held per group of samples: the same ratios
    assert [b.name for b in whole.batchnorm] == [b.name for b in one.batchnorm] and whole.batchnorm
    for p, q in zip(whole.batchnorm, one.batchnorm):
        assert (p.n, p.excluded) == (q.n, q.excluded)
        for key in ("ratio_min", "ratio_median", "ratio_max", "before_median", "after_median"):
            assert math.isclose(getattr(p, key), getattr(q, key), rel_tol=rtol), (p.name, key)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(power_tolerance=1.0), "power_tolerance must be a number in \\[0, 1\\), got 1.0"),
        (dict(power_tolerance=-1e-3), "power_tolerance .* got -0.001"),
        (dict(batch_size=0), "batch_size must be an integer >= 1 or None, got 0"),
        (dict(batch_size=2.5), "batch_size .* got 2.5"),
    ],
)
def test_bad_power_options_raise_input_error(resnet20, anatomy20, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        measure_stability(resnet20, anatomy20, _images(1), **kwargs)


def _bottleneck_block() -> nn.Module:
    """A torchvision Bottleneck with a projection (its ReLU module is called three times), BN statistics drawn."""
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    block = Bottleneck(4, 2, stride=2, downsample=down)
    for module in block.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return jacobian_copy(block.eval().double())


def test_linearized_block_equals_forward_mode_ad():
    block = _bottleneck_block()
    x, v = _images(3, shape=(4, 6, 6)).double(), _images(3, seed=5, shape=(4, 6, 6)).double()
    linear = Linearized(block).at(x)
    _, reference = torch.func.jvp(lambda t: block(t.clone()), (x,), (v,))
    torch.testing.assert_close(linear(v), reference, rtol=1e-12, atol=1e-12)
    assert linear.matches(reference, v)
    assert len(linear.relus) == 1 and len(linear.relus[0].masks) == 3  # one module, three calls


def test_lanczos_reaches_the_dense_jacobian_norm():
    block = _bottleneck_block()
    x = _images(2, shape=(4, 6, 6)).double()
    v = _images(2, seed=6, shape=(4, 6, 6)).double()
    found = largest_gain(block, x, v, 80, 1e-10)
    gain = found.gain
    assert found.converged.all()
    for i in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda t: block(t.clone()), x[i : i + 1])
        sigma = float(torch.linalg.svdvals(jacobian.reshape(8 * 3 * 3, 4 * 6 * 6))[0])
        # a lower bound that Lanczos drives to the norm (exactness of J v: the test above)
        assert float(gain[i]) <= sigma * (1 + 1e-12)
        assert float(gain[i]) == pytest.approx(sigma, rel=1e-5)


def test_blocks_with_functional_relu_fall_back_to_forward_mode_ad():
    torch.manual_seed(0)
    block = ReluBlock(2).double().eval()
    x, v = _images(2, shape=(2, 4, 4)).double(), _images(2, seed=7, shape=(2, 4, 4)).double()
    _, reference = torch.func.jvp(lambda t: block(t.clone()), (x,), (v,))
    # F.relu is invisible to the module swap: the product is the affine part only, and is refused
    assert not Linearized(block).at(x).matches(reference, v)


def test_the_linearization_verdict_holds_for_every_later_batch(monkeypatch):
    """One comparison with autograd per block: later batches use (or refuse) the linearization unchecked."""
    jvp_calls, checks = [], []
    original, original_check = torch.func.jvp, Reverse.jvp
    monkeypatch.setattr(torch.func, "jvp", lambda *a, **k: jvp_calls.append(1) or original(*a, **k))
    monkeypatch.setattr(Reverse, "jvp", lambda self, v: checks.append(1) or original_check(self, v))
    block = _bottleneck_block()
    x, v = _images(4, shape=(4, 6, 6)).double(), _images(4, seed=8, shape=(4, 6, 6)).double()
    linearized = Linearized(block)
    together = largest_gain(block, x, v, 5, 0.0).gain
    checks.clear()
    parts = [largest_gain(block, x[i:i + 2], v[i:i + 2], 5, 0.0, linearized).gain for i in (0, 2)]
    assert linearized.exact is True and len(checks) == 1 and not jvp_calls
    torch.testing.assert_close(torch.cat(parts), together, rtol=1e-12, atol=0)
    # a block the linearization does not fit: refused once, forward-mode AD for every product after
    torch.manual_seed(0)
    relu_block = ReluBlock(2).double().eval()
    x, v = _images(4, shape=(2, 4, 4)).double(), _images(4, seed=9, shape=(2, 4, 4)).double()
    linearized = Linearized(relu_block)
    checks.clear()
    for i in (0, 2):
        largest_gain(relu_block, x[i:i + 2], v[i:i + 2], 3, 0.0, linearized)
    assert linearized.exact is False and len(checks) == 1 and len(jvp_calls) == 5


@pytest.mark.parametrize("make", ["bottleneck", "functional_relu"])
def test_autograd_products_equal_torch_func(make):
    """J v by reverse mode twice and J^T u by one reverse pass, against torch.func's jvp and vjp."""
    torch.manual_seed(0)
    block = _bottleneck_block() if make == "bottleneck" else ReluBlock(2).double().eval()
    shape = (4, 6, 6) if make == "bottleneck" else (2, 4, 4)
    x, v = _images(3, shape=shape).double(), _images(3, seed=12, shape=shape).double()

    def fn(t):
        return block(t.clone())

    out, reference = torch.func.jvp(fn, (x,), (v,))
    reverse = Reverse(fn, x)
    torch.testing.assert_close(reverse.jvp(v), reference, rtol=1e-12, atol=1e-12)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    _, vjp_reference = torch.func.vjp(fn, x)
    torch.testing.assert_close(reverse.vjp(u), vjp_reference(u)[0], rtol=0, atol=0)
    torch.testing.assert_close(reverse.vjp(2 * u), vjp_reference(2 * u)[0], rtol=0, atol=0)  # reusable
    # an output that does not depend on the input: zero products, no autograd error
    constant = Reverse(lambda t: torch.ones(3, 2), x)
    assert not constant.jvp(v).any()
    assert not constant.vjp(torch.ones(3, 2)).any()


def test_worst_direction_does_not_import_torch_dynamo():
    """The stability of a bottleneck network in a fresh interpreter never loads torch._dynamo (1.5 s, 150 MB)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from auditor.analysis.stability.krylov import largest_gain\n"
        "from auditor.analysis.stability.linearized import Linearized, jacobian_copy\n"
        "from auditor.models.resnet_layout import Bottleneck\n"
        "torch.manual_seed(0)\n"
        "block = jacobian_copy(Bottleneck(8, 2).eval())\n"
        "x, v = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)\n"
        "gain = largest_gain(block, x, v, 4, 0.0).gain\n"
        "assert Linearized(block).exact is None and gain.gt(0).all()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]


@pytest.mark.parametrize("shape", [(4, 6, 6), (3, 5, 5)])  # 144 = 9 * 16 elements per row; 75 (drawn at once)
def test_directions_drawn_in_chunks_equal_one_draw(shape):
    """The perturbation stream does not depend on how the runs are chunked (module docstring recipe)."""
    rows, eps = 11, 1e-3
    reference = torch.rand(rows, dtype=torch.float64) + 0.5
    reference[3] = 0.0  # a zero reference gives a zero row
    generator = torch.Generator().manual_seed(7)
    want = torch.randn((rows, *shape), generator=generator, dtype=torch.float32).double()
    want = want * (eps * reference / want.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    after = torch.randn(5, generator=generator, dtype=torch.float32)  # what the caller draws next
    directions = Directions(
        torch.Generator().manual_seed(7), reference, shape, eps, torch.float64, torch.device("cpu")
    )
    got = torch.cat([directions.take(count) for count in (1, 4, 3)])  # 8 of 11 taken
    norms = directions.finish()
    assert torch.equal(got, want[:8])
    np.testing.assert_array_equal(norms, want.flatten(1).norm(dim=1).numpy())
    assert torch.equal(torch.randn(5, generator=directions.generator, dtype=torch.float32), after)


def test_concatenate_equals_cat_keeps_the_memory_format_and_frees_the_chunks():
    g = torch.Generator().manual_seed(0)
    for memory_format in (torch.channels_last, torch.contiguous_format):
        chunks = [torch.randn(rows, 3, 4, 5, generator=g).contiguous(memory_format=memory_format) for rows in (2, 1, 3)]
        want = torch.cat(chunks)
        got = concatenate(chunks)
        assert torch.equal(got, want) and chunks == []
        assert got.is_contiguous(memory_format=memory_format)


def test_capture_stops_the_forward_pass_after_the_last_needed_block(resnet20, anatomy20):
    """Inputs of the first stage's blocks need no layer after them: the head never runs."""
    modules = dict(resnet20.named_modules())
    names = [b.name for b in anatomy20.blocks if b.stage == "layer1"]
    x = _images(5)
    calls = []
    head = modules["layer3"].register_forward_hook(lambda *args: calls.append(1))
    try:
        inputs = capture_module.capture(resnet20, modules, x, names, batch_size=2)
    finally:
        head.remove()
    assert calls == []
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # those of full forward passes, same batches
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].clone())) for n in names]
    try:
        with torch.no_grad():
            for rows in (slice(0, 2), slice(2, 4), slice(4, 5)):
                resnet20(x[rows])
    finally:
        for hook in hooks:
            hook.remove()
    for name in names:
        assert torch.equal(inputs[name], torch.cat(seen[name]))


def test_distances_broadcast_repeated_references_as_a_gather_would():
    g = torch.Generator().manual_seed(21)
    reference = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    index = torch.arange(1, 4).repeat_interleave(3)  # samples 1..3, three runs each
    runs = torch.randn(9, 3, 4, 4, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    layout = repeats(index)
    assert layout == (1, 4, 3)
    want = torch.linalg.vector_norm((runs - reference[index]).flatten(1), dim=1)
    torch.testing.assert_close(distances(runs, reference, index, layout), want, rtol=1e-14, atol=0)
    # a chunk that starts inside a sample has no such layout: gathered
    ragged = torch.tensor([1, 2, 2, 2, 3])
    assert repeats(ragged) is None
    torch.testing.assert_close(distances(runs[:5], reference, ragged),
                               torch.linalg.vector_norm((runs[:5] - reference[ragged]).flatten(1), dim=1))


def test_kept_values_are_exact_python_floats():
    values = torch.tensor([1 / 3, 2.0 ** -30, 7.25], dtype=torch.float32)
    floats = kept(values)
    assert all(type(v) is float for v in floats)
    assert np.array_equal(np.asarray(floats), values.double().numpy())


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_blocks_take_the_linearized_products(shortcut, monkeypatch):
    """The bundled CIFAR ResNets' blocks call a ReLU module: no forward-mode AD per product, same J v."""
    from auditor.models.cifar_resnet import CifarBasicBlock

    torch.manual_seed(0)
    block = jacobian_copy(CifarBasicBlock(4, 8, 2, shortcut=shortcut).eval().double())
    x, v = _images(3, shape=(4, 6, 6)).double(), _images(3, seed=13, shape=(4, 6, 6)).double()
    linear = Linearized(block).at(x)
    _, reference = torch.func.jvp(lambda t: block(t.clone()), (x,), (v,))
    assert linear.matches(reference, v) and len(linear.relus) == 1 and len(linear.relus[0].masks) == 2
    jvp_calls = []
    original = torch.func.jvp
    monkeypatch.setattr(torch.func, "jvp", lambda *a, **k: jvp_calls.append(1) or original(*a, **k))
    largest_gain(block, x, v, 4, 0.0)
    assert not jvp_calls


def test_every_entry_point_takes_its_defaults_from_stability_options():
    """One home for the defaults: the library, both tasks and both commands read StabilityOptions."""
    import dataclasses
    import inspect

    from auditor.analysis.stability import STABILITY_DEFAULTS
    from auditor.cli.audit import audit_command
    from auditor.cli.stability import stability_command
    from auditor.tasks.audit import AuditOptions
    from auditor.tasks.stability import subject_stability

    def defaults(fn):
        return {name: p.default for name, p in inspect.signature(fn).parameters.items()}

    audit_fields = {f.name: f.default for f in dataclasses.fields(AuditOptions)}
    library = defaults(measure_stability)
    for name in ("eps", "directions", "seed", "power_iterations", "power_tolerance"):
        assert library[name] == getattr(STABILITY_DEFAULTS, name)
    assert library["dtype"] == getattr(torch, STABILITY_DEFAULTS.dtype)
    for name in ("eps", "directions", "samples", "power_iterations", "dtype"):
        expected = getattr(STABILITY_DEFAULTS, name)
        assert audit_fields[name] == expected and defaults(subject_stability)[name] == expected
        for command in (audit_command, stability_command):
            default = defaults(command)[name]
            assert getattr(default, "value", default) == expected
