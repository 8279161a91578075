"""The numbers resdyn prints for real third-party checkpoints, checked independently."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.tasks.condition import condition
from auditor.subject import open_subject

from _reference import directions, linearized_basic_block
from conftest import CHECKPOINTS, CIFAR_IMAGES, needs_shared, run_json

pytestmark = [needs_shared, pytest.mark.slow]
IMAGENET = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def test_real_resnet20_block_matches_the_dense_operator() -> None:
    # At 16x16 input layer3 works on 4x4 maps: a 1024 x 1024 dense operator.
    subject = open_subject(CHECKPOINTS / "cifar10-resnet20-akamaster.th", input_size=(16, 16))
    report = condition(subject)
    entry = next(b for b in report.block_entries() if b["name"] == "layer3.1")
    linear = linearized_basic_block(subject.loaded.model.layer3[1])
    n = 64 * 4 * 4
    with torch.no_grad():
        matrix = linear(torch.eye(n, dtype=torch.float64).reshape(n, 64, 4, 4)).reshape(n, n).T
    values = np.linalg.svd(matrix.numpy(), compute_uv=False)
    assert entry["kappa_linear_residual"] == pytest.approx(values[0] / values[-1], rel=1e-6)
    assert entry["sigma_linear_residual"][0] == pytest.approx(values[0], rel=1e-8)


def test_real_checkpoints_conditioning_is_sane() -> None:
    for name in ("cifar10-resnet20-akamaster.th", "cifar10-resnet56-akamaster.th"):
        report = condition(open_subject(CHECKPOINTS / name))
        for block in report.blocks:
            assert block.lemma1_upper_holds is True
            for kappa in (block.kappa_linear_residual, block.kappa_paper_residual):
                assert kappa is None or kappa >= 1
        for layer in report.layers:
            assert layer.sigma_max >= layer.sigma_min >= 0


def test_real_resnet4b_without_batchnorm(resnet4b_file: Path, capsys) -> None:
    doc = run_json(["condition", CHECKPOINTS / "cifar10-resnet4b-nobn-abcrown.pth", "--arch", f"{resnet4b_file}:resnet4b"], capsys)
    assert [b["shortcut"] for b in doc["blocks"]] == ["projection", "identity", "projection", "identity"]
    assert all(layer["batchnorm_folded"] is None for layer in doc["layers"])


def test_real_resnet20_audit_with_cifar_images(capsys) -> None:
    doc = run_json(["audit", CHECKPOINTS / "cifar10-resnet20-akamaster.th", "--data", CIFAR_IMAGES, *IMAGENET,
                    "--per-class", "6", "--samples", "8", "--directions", "2", "--power-iterations", "2"], capsys)
    stages = {s["name"]: s for s in doc["stages"]}
    # Classes separate with depth on a trained network: the final features beat the stem.
    assert stages["penultimate"]["separation"] > stages["stem"]["separation"]
    # The predicted classes that the perturbations flip, recounted by a plain forward pass
    # (float64) of the same images with the documented perturbation recipe.
    from auditor.tasks.images import open_images, sample_images

    subject = open_subject(CHECKPOINTS / "cifar10-resnet20-akamaster.th")
    images = open_images(CIFAR_IMAGES, subject, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), per_class=6)
    x = sample_images(images, 8).images.double()
    k, eps = 2, doc["stability"]["eps"]
    d = directions(len(subject.anatomy.blocks), len(x) * k, tuple(x.shape[1:]), x, eps)  # seed 0 + blocks
    model = copy.deepcopy(subject.loaded.model).double().eval()
    with torch.no_grad():
        clean = model(x.repeat_interleave(k, 0)).argmax(1)
        noisy = model(x.repeat_interleave(k, 0) + d).argmax(1)
    trajectory = doc["stability"]["trajectory"]
    assert trajectory["runs"] == len(x) * k == 16
    assert trajectory["flips"] == int((clean != noisy).sum())


def _gram(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.double()
    return matrix.T @ matrix


def test_real_resnet20_worst_gain_is_certified_against_dense_jacobians_and_long_power_runs() -> None:
    """The default worst-direction search on trained blocks: within 1 % of the true largest gain, never above.

    At 16x16 input a layer3 block acts on 64 x 4 x 4 = 1024 numbers: their Jacobians at each sample are
    formed densely (``torch.func.jacfwd``) and ``J^T J`` decomposed. layer1.0 (4096 numbers) is checked
    against 150 steps of plain power iteration on ``J^T J`` (torch.func products), a lower bound of the truth.
    """
    from auditor.analysis.stability import measure_stability
    from auditor.tasks.images import open_images, sample_images

    subject = open_subject(CHECKPOINTS / "cifar10-resnet20-akamaster.th", input_size=(16, 16))
    images = open_images(CIFAR_IMAGES, subject, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), per_class=4,
                         size=16)
    x = sample_images(images, 8).images
    model = subject.loaded.model.eval()
    names = [b.name for b in subject.anatomy.blocks]
    chosen = [names.index("layer1.0"), names.index("layer3.2")]
    report = measure_stability(model, subject.anatomy, x, directions=1, only_blocks=chosen, with_trajectory=False)
    inputs = {}
    modules = dict(model.named_modules())
    hooks = [modules[names[i]].register_forward_pre_hook(
        lambda _m, args, name=names[i]: inputs.__setitem__(name, args[0].detach())) for i in chosen]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for result in report.blocks:
        block, points = modules[result.name], inputs[result.name]
        fn = lambda t: block(t.clone())  # noqa: E731
        if result.name.startswith("layer3"):
            truth = max(
                float(torch.linalg.eigvalsh(_gram(torch.func.jacfwd(fn)(p[None]).reshape(1024, 1024)))[-1]) ** 0.5
                for p in points
            )
        else:
            v = torch.randn(points.shape, generator=torch.Generator().manual_seed(1))
            for _ in range(150):
                v = v / torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
                _, u = torch.func.jvp(fn, (points,), (v,))
                v = torch.func.vjp(fn, points)[1](u)[0]
            truth = float(torch.linalg.vector_norm(u, dim=(1, 2, 3)).max())
        assert result.worst_gain_converged is True
        assert result.worst_gain <= truth * (1 + 1e-5) or result.name == "layer1.0"
        assert result.worst_gain >= 0.99 * truth
