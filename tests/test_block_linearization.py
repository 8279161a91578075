"""Every block family's exact extremes against a dense operator built from the module itself.

The reference does not read resdyn's anatomy: it copies the block, applies the
linearization to the copy (activations and squeeze-and-excitation modules
replaced by identities, LayerNorm by its affine part, every convolution padded
circularly, eval mode), and takes the Jacobian of the copy's forward pass as a
dense matrix, column by column. Its singular values must match the extremes
resdyn computes per frequency (relative 1e-6), and every normalization, gate
and scale in the block must be named in the block's ``linearization``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditor.analysis.conditioning import condition_block
from auditor.errors import ArchitectureError
from auditor.models.anatomy import analyze_anatomy
from auditor.tasks.condition import block_operators

torchvision_models = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Normalization statistics, affine parts and layer scales away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.1)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("layer_scale", "gamma"):
                parameter.copy_(torch.rand(parameter.shape, generator=g) * 0.5 + 0.1)
    return model.eval()


class _Affine(nn.Module):
    """A LayerNorm's affine part (the normalization as identity), channels first or last."""

    def __init__(self, norm: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.weight, self.bias, self.channels_last = norm.weight, norm.bias, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) if self.channels_last else (-1, 1, 1)
        out = x * self.weight.reshape(shape)
        return out if self.bias is None else out + self.bias.reshape(shape)


def _is_activation(module: nn.Module) -> bool:
    """torch's activations and timm's own (``timm.layers.activations.GELU`` is not ``nn.GELU``)."""
    return isinstance(module, _ACTIVATIONS) or type(module).__module__.startswith("timm.layers.activations")


def _is_squeeze_excitation(module: nn.Module) -> bool:
    return type(module).__name__ in ("SqueezeExcitation", "SEModule", "SqueezeExcite")


def _linearized_copy(block: nn.Module) -> nn.Module:
    """The block under the documented linearization, written from the module, not from resdyn."""
    copy_ = copy.deepcopy(block).double().eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if _is_squeeze_excitation(child) or _is_activation(child):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.LayerNorm):
                # torch's own LayerNorm normalizes the last axis; the 2-d subclasses of timm and
                # torchvision permute to channels last around it (channels first outside)
                setattr(parent, name, _Affine(child, channels_last=type(child) is nn.LayerNorm
                                              or type(child).__name__ == "LayerNorm"))
            else:
                if isinstance(child, nn.Conv2d) and child.padding != (0, 0):
                    child.padding_mode = "circular"
                if hasattr(child, "act") and isinstance(child, nn.BatchNorm2d):  # timm BatchNormAct2d
                    child.act = nn.Identity()
                swap(child)

    swap(copy_)
    return copy_


def _dense(function, input_shape: tuple[int, int, int]) -> np.ndarray:
    """The affine map's matrix: images of the unit vectors minus the image of zero."""
    n = int(np.prod(input_shape))
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
        zero = function(torch.zeros(1, *input_shape, dtype=torch.float64))
        columns = torch.cat([function(basis[i:i + 256]) for i in range(0, n, 256)]) - zero
    return columns.reshape(n, -1).T.numpy()


def _extremes(matrix: np.ndarray) -> tuple[float, float]:
    values = np.linalg.svd(matrix, compute_uv=False)
    return float(values[0]), float(values[-1])


def _check(model: nn.Module, size: int, names: list[str]) -> None:
    anatomy = analyze_anatomy(model, (3, size, size))
    modules = dict(model.named_modules())
    found = {b.name: b for b in anatomy.blocks}
    for name in names:
        info = found[name]
        convs, shortcut = block_operators(modules, info)
        result = condition_block(convs, shortcut, name=name, shortcut_kind=info.shortcut)
        reference = _linearized_copy(modules[name])
        whole = _dense(reference, info.input_shape)
        if info.shortcut == "none":
            assert result.sigma_linear_plain == pytest.approx(_extremes(whole), rel=1e-6), name
        else:
            assert result.sigma_linear_residual == pytest.approx(_extremes(whole), rel=1e-6), name
            if info.shortcut == "identity":  # the branch alone: the block minus the identity
                branch = whole - np.eye(whole.shape[0])
                assert result.sigma_linear_plain == pytest.approx(_extremes(branch), rel=1e-6), name
        _check_nothing_dropped(modules[name], name, info)


def _check_nothing_dropped(block: nn.Module, name: str, info) -> None:
    """Every normalization, gate and scale of the block is named by a rule of its linearization."""
    named = {path for _, paths in info.linearization for path in paths}
    for sub, module in block.named_modules():
        path = f"{name}.{sub}" if sub else name
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) or _is_squeeze_excitation(module):
            assert path in named or any(path.startswith(p + ".") for p in named if p), (path, named)
    for parameter, _ in block.named_parameters():
        if parameter.rsplit(".", 1)[-1] in ("layer_scale", "gamma"):
            assert f"{name}.{parameter}" in named, (parameter, named)


# Small inputs (or narrow configurations) keep each block's dense matrix at most 2048 wide;
# grids stay at least as wide as a kernel's circular padding.


def test_torchvision_convnext_blocks() -> None:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = _randomize(ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)]))
    _check(model, 32, ["features.1.0", "features.3.1"])


def test_torchvision_mobilenet_blocks() -> None:
    torch.manual_seed(0)
    _check(_randomize(torchvision_models.mobilenet_v2(width_mult=0.25)), 64, ["features.8", "features.14"])
    _check(_randomize(torchvision_models.mobilenet_v3_small(width_mult=0.5)), 64, ["features.5", "features.9"])


def test_torchvision_efficientnet_blocks() -> None:
    torch.manual_seed(0)
    model = _randomize(torchvision_models.efficientnet_b0(weights=None))
    _check(model, 32, ["features.4.0", "features.5.1"])


def test_torchvision_regnet_blocks() -> None:
    torch.manual_seed(0)
    _check(_randomize(torchvision_models.regnet_y_400mf(weights=None)), 32, ["trunk_output.block3.block3-1"])
    _check(_randomize(torchvision_models.regnet_x_400mf(weights=None)), 32, ["trunk_output.block3.block3-1"])


def test_timm_preactivation_resnetv2_blocks() -> None:
    torch.manual_seed(0)
    _check(_randomize(timm.create_model("resnetv2_18", pretrained=False)), 32, ["stages.2.blocks.1"])
    _check(_randomize(timm.create_model("resnetv2_50d", pretrained=False)), 8, ["stages.0.blocks.0", "stages.0.blocks.1"])


def test_timm_squeeze_excitation_blocks() -> None:
    torch.manual_seed(0)
    _check(_randomize(timm.create_model("seresnet18", pretrained=False)), 32, ["layer3.1"])
    _check(_randomize(timm.create_model("seresnext26d_32x4d", pretrained=False)), 8, ["layer1.0"])


def test_timm_convnext_blocks() -> None:
    torch.manual_seed(0)
    model = _randomize(timm.create_model("convnext_atto", pretrained=False))
    _check(model, 32, ["stages.1.blocks.1"])


def test_preactivation_first_norm_is_in_the_operator() -> None:
    """The issue's case: the BatchNorm before a pre-activation block's first convolution is folded in."""
    from auditor.models.registry import build_model

    torch.manual_seed(0)
    model = _randomize(build_model("preactresnet18", 10)[0])
    _check(model, 8, ["layer3.1", "layer4.0"])
    info = next(b for b in analyze_anatomy(model, (3, 8, 8)).blocks if b.name == "layer3.1")
    assert [f.path for f in info.convs[0].pre] == ["layer3.1.bn1"]
    assert info.batchnorm  # a BatchNorm per convolution, before each of them


@pytest.mark.parametrize("name, size, blocks", [
    ("paper_plain18", 16, ["layer2.0", "layer2.1"]),
    ("paper_res18", 16, ["layer2.0", "layer2.1"]),
    ("paper_resbn18", 16, ["layer2.0", "layer2.1"]),
    ("paper_resbn50", 8, ["layer1.0", "layer1.1"]),
])
def test_paper_modules(name: str, size: int, blocks: list[str]) -> None:
    from auditor.models.registry import build_model

    torch.manual_seed(0)
    _check(_randomize(build_model(name, 10)[0]), size, blocks)


class _Dilated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()  # a module: the reference replaces modules, not functions
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn1(self.conv1(x)))) + x


class _Net(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = block
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_dilated_and_grouped_convolutions() -> None:
    torch.manual_seed(0)
    _check(_randomize(_Net(_Dilated())), 8, ["block"])


_ATTENTION_FACTORY = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        n, c, h, w = y.shape
        tokens = y.flatten(2).transpose(1, 2)
        y = self.attention(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(n, c, h, w)
        return self.conv2(y) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def build():
    torch.manual_seed(0)
    return Net()
"""

_FACTORY_NAMESPACE: dict = {}
exec(_ATTENTION_FACTORY, _FACTORY_NAMESPACE)  # the attention block, as a user's model file holds it
_Attention = _FACTORY_NAMESPACE["Block"]


class _InstanceNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm(self.conv1(x))) + x


@pytest.mark.parametrize("block, named", [(_Attention, "block.attention"), (_InstanceNormed, "block.norm")])
def test_a_part_no_rule_covers_is_named(block, named: str) -> None:
    model = _Net(block()).eval()
    anatomy = analyze_anatomy(model, (3, 8, 8))
    info = anatomy.blocks[0]
    assert info.uncovered and info.uncovered[0].startswith(named)
    with pytest.raises(ArchitectureError, match=f"block block: {named}.*not covered"):
        block_operators(dict(model.named_modules()), info)


@pytest.mark.slow
@pytest.mark.parametrize("build, arch", [
    (lambda: torchvision_models.mobilenet_v3_small(weights=None), "mobilenet_v3_small"),
    (lambda: timm.create_model("convnext_atto", pretrained=False), "convnext_atto"),
])
def test_audit_of_a_family_inferred_from_its_weights(tmp_path, capsys, build, arch: str) -> None:
    """A plain state dict of a new family: inferred, audited end to end (stability on the real
    network with its gates and LayerNorms), every block's rules in the schema-valid report."""
    from pathlib import Path

    from conftest import run_json, save_safetensors

    torch.manual_seed(0)
    path = save_safetensors(_randomize(build()), tmp_path / "model.safetensors")
    digits = Path(__file__).resolve().parent.parent / "fixtures" / "digits"
    document = run_json(["audit", path, "--data", digits, "--input-size", "32", "--per-class", "2",
                         "--samples", "2", "--directions", "2"], capsys)
    assert document["checkpoint"]["arch"] == arch
    rules = {entry["rule"] for block in document["blocks"] for entry in block["linearization"]}
    assert {"activation", "gate"} <= rules if arch.startswith("mobilenet") else {"layernorm", "scale"} <= rules
    assert len(document["stability"]["blocks"]) == len(document["blocks"])
    assert all(b["kappa_linear_plain"] is not None or b["kappa_linear_plain_reason"] for b in document["blocks"])
    assert [s["name"] for s in document["stages"]][0] == "stem"




@pytest.mark.slow
def test_an_uncovered_block_is_refused_by_condition_and_measured_by_stability(tmp_path, capsys) -> None:
    from pathlib import Path

    from conftest import run_cli, run_json, save_safetensors

    factory = tmp_path / "net.py"
    factory.write_text(_ATTENTION_FACTORY)
    path = save_safetensors(_FACTORY_NAMESPACE["build"](), tmp_path / "net.safetensors")
    arch = f"{factory}:build"
    code, _, err = run_cli(["condition", path, "--arch", arch, "--input-size", "8"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "block block: block.attention (MultiheadAttention) is not covered" in err
    digits = Path(__file__).resolve().parent.parent / "fixtures" / "digits"
    document = run_json(["stability", path, "--arch", arch, "--data", digits, "--input-size", "8", "--size", "8",
                         "--samples", "2", "--directions", "2"], capsys)
    assert [b["name"] for b in document["stability"]["blocks"]] == ["block"]
