"""timm ResNets (resnet26, the ``d`` variants): keys, inference, and the average-pool shortcut's exact operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from auditor.analysis.pooled_projection import pooled_projection
from auditor.analysis.spectra import conv_singular_values
from auditor.errors import InputError
from auditor.models.infer import infer_architecture
from auditor.models.registry import build_model

from conftest import run_cli, run_json, save_safetensors

# Parameter counts timm 1.0.31 reports for timm.create_model(name, num_classes=1000)
# (an independent source: computed once with timm installed, not with resdyn).
TIMM_PARAMETERS = {
    "resnet18d": 11708744, "resnet26": 15995176, "resnet26d": 16014408, "resnet34d": 21816904,
    "resnet50d": 25576264, "resnet101d": 44568392, "resnet152d": 60212040,
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, so that folding BN matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in**0.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name", sorted(TIMM_PARAMETERS))
def test_parameter_counts_match_timm(name: str) -> None:
    model, spec = build_model(name, 1000)
    assert spec.family == "timm"
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMETERS[name]


def test_resnet50d_has_timm_key_names() -> None:
    keys = set(build_model("resnet50d", 10)[0].state_dict())
    # timm's deep stem: 3x3 convs at conv1.0/3/6, BN at conv1.1/4, then bn1
    for key in ("conv1.0.weight", "conv1.1.running_var", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight",
                "bn1.weight", "layer1.0.downsample.1.weight", "layer1.0.downsample.2.running_mean",
                "layer2.0.downsample.1.weight", "layer4.0.downsample.2.weight", "fc.weight"):
        assert key in keys, key
    assert not any(k.startswith(("conv1.2", "conv1.5", "conv1.weight")) for k in keys)
    assert not any(".downsample.0." in k for k in keys)  # the pool has no parameters


@pytest.mark.parametrize("name", ["resnet26", "resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d"])
def test_inference_names_timm_models(name: str) -> None:
    state = build_model(name, 7)[0].state_dict()
    found = infer_architecture(state)
    assert (found.arch, found.num_classes) == (name, 7)


def test_timm_forward_is_the_same_when_timm_is_installed() -> None:
    timm = pytest.importorskip("timm")
    for name in ("resnet18d", "resnet26", "resnet50d"):
        reference = _randomize(timm.create_model(name, pretrained=False, num_classes=5))
        ours = build_model(name, 5)[0].eval()
        ours.load_state_dict(reference.state_dict())
        for size in (64, 72):
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
            with torch.no_grad():
                assert torch.equal(ours(x), reference(x))


def _dense(function, shape: tuple[int, ...]) -> np.ndarray:
    """The matrix of a linear map, column j = function(e_j)."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        columns = function(basis).reshape(n, -1)
    return columns.T.numpy()


def test_pooled_projection_equals_the_dense_pool_then_conv() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 3, 1, 1, generator=generator, dtype=torch.float64)
    scale = 0.5 + torch.rand(5, generator=generator, dtype=torch.float64)
    shape = (3, 6, 8)
    op = pooled_projection(weight, 2, shape, out_scale=scale, name="s")

    def shortcut(x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)(x)
        return F.conv2d(pooled, weight) * scale[None, :, None, None]

    matrix = _dense(shortcut, shape)
    assert matrix.shape == (5 * 3 * 4, 3 * 6 * 8)
    expected = np.linalg.svd(matrix, compute_uv=False)
    ours = np.sort(conv_singular_values(op))[::-1]
    np.testing.assert_allclose(ours[: expected.size], expected, rtol=1e-10, atol=1e-12)
    # and it is the same operator: the conv applies exactly like pool + 1x1
    x = torch.randn(1, *shape, generator=generator, dtype=torch.float64)
    direct = F.conv2d(x, op.scaled_weight(), stride=2)
    torch.testing.assert_close(direct, shortcut(x), rtol=1e-12, atol=1e-12)


def test_pooled_projection_refuses_odd_sizes() -> None:
    with pytest.raises(InputError, match="ceil_mode"):
        pooled_projection(torch.ones(4, 2, 1, 1), 2, (2, 7, 8), name="layer2.0.downsample")


def _circular(x: torch.Tensor, conv: torch.nn.Conv2d, scale: torch.Tensor) -> torch.Tensor:
    """A convolution with circular boundary and its BatchNorm as a pure scale (the linearized layer)."""
    p = conv.padding[0]
    padded = F.pad(x, (p, p, p, p), mode="circular") if p else x
    return F.conv2d(padded, conv.weight.double(), stride=conv.stride) * scale[None, :, None, None]


def _bn(module: torch.nn.BatchNorm2d) -> torch.Tensor:
    return module.weight.double() / torch.sqrt(module.running_var.double() + module.eps)


def test_average_pool_block_kappas_equal_the_dense_operator(tmp_path) -> None:
    from auditor.tasks.condition import condition
    from auditor.subject import open_subject

    model = _randomize(build_model("resnet18d", 10)[0], seed=1)
    path = save_safetensors(model, tmp_path / "resnet18d.safetensors")
    subject = open_subject(path, input_size=(32, 32))
    assert subject.loaded.arch == "resnet18d"
    report = condition(subject)
    modules = dict(model.named_modules())
    for block_path in ("layer3.0", "layer4.0"):  # average-pool shortcuts, 2048 and 1024 inputs
        info = next(b for b in report.block_info if b.name == block_path)
        result = next(b for b in report.blocks if b.name == block_path)
        assert info.shortcut == "projection"
        block = modules[block_path]
        pool, projection, norm = block.downsample
        assert isinstance(pool, torch.nn.AvgPool2d)

        def branch(x: torch.Tensor, block=block) -> torch.Tensor:
            out = _circular(x, block.conv1, _bn(block.bn1))
            return _circular(out, block.conv2, _bn(block.bn2))

        def residual(x: torch.Tensor, branch=branch, pool=pool, projection=projection, norm=norm) -> torch.Tensor:
            return branch(x) + F.conv2d(pool(x), projection.weight.double()) * _bn(norm)[None, :, None, None]

        for function, kappa in ((residual, result.kappa_linear_residual), (branch, result.kappa_linear_plain)):
            values = np.linalg.svd(_dense(function, info.input_shape), compute_uv=False)
            assert kappa == pytest.approx(values[0] / values[-1], rel=1e-8)


def test_condition_cli_on_a_timm_checkpoint(tmp_path, capsys) -> None:
    model = _randomize(build_model("resnet18d", 10)[0])
    path = save_safetensors(model, tmp_path / "r18d.safetensors")
    document = run_json(["condition", path, "--input-size", "32"], capsys)
    assert document["checkpoint"]["arch"] == "resnet18d"
    assert document["checkpoint"]["family"] == "timm"
    assert all(b["kappa_linear_residual"] is not None for b in document["blocks"])
    code, out, err = run_cli(["condition", path, "--input-size", "48"], capsys)
    assert code == 2 and out == ""
    # an odd size: refused in one line (the strided layers' circular model refuses it first)
    assert len(err.strip().splitlines()) == 1 and "(256, 3, 3)" in err
