"""auditor.models.resnet_layout is torchvision's ResNet without torchvision (issue 11).

torchvision's own classes are the reference: same keys and shapes, the same
random draws under a seed, the same forward pass to the bit, on every
configuration the registry builds and on the constructor options.
"""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models import resnet as tv

from auditor.models import resnet_layout as ours
from auditor.models.catalog import TORCHVISION_CONFIGS

from test_cli_startup import _child


def _pair(kind: str, layers: list[int], seed: int = 3, **kwargs):
    torch.manual_seed(seed)
    theirs = tv.ResNet(tv.BasicBlock if kind == "basic" else tv.Bottleneck, layers, **kwargs).eval()
    torch.manual_seed(seed)
    mine = ours.ResNet(ours.BasicBlock if kind == "basic" else ours.Bottleneck, layers, **kwargs).eval()
    return theirs, mine


def _assert_same(theirs: torch.nn.Module, mine: torch.nn.Module, size: int = 64) -> None:
    expected, got = theirs.state_dict(), mine.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_seeded_build_and_forward_equal_torchvision(name: str) -> None:
    kind, layers, extra = TORCHVISION_CONFIGS[name]
    theirs, mine = _pair(kind, [1, 1, 1, 1], num_classes=7, **extra)
    _assert_same(theirs, mine)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_constructor_options_equal_torchvision(kind: str) -> None:
    theirs, mine = _pair(kind, [2, 1, 1, 1], num_classes=5, zero_init_residual=True)
    blocks = [m for m in mine.modules() if isinstance(m, (ours.BasicBlock, ours.Bottleneck))]
    assert blocks and all(not (m.bn2 if kind == "basic" else m.bn3).weight.detach().any() for m in blocks)
    _assert_same(theirs, mine)
    if kind == "bottleneck":  # dilation instead of stride in the last stages
        theirs, mine = _pair(kind, [1, 1, 1, 1], replace_stride_with_dilation=[False, True, True])
        _assert_same(theirs, mine)


def test_option_errors_match_torchvision() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        ours.BasicBlock(8, 8, groups=2)
    with pytest.raises(ValueError, match="3 booleans"):
        ours.ResNet(ours.Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[True])


def test_a_torchvision_checkpoint_needs_no_torchvision(tmp_path) -> None:
    from safetensors.torch import save_file

    kind, layers, extra = TORCHVISION_CONFIGS["resnet18"]
    torch.manual_seed(0)
    model = tv.ResNet(tv.BasicBlock, layers, num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    save_file(model.state_dict(), str(path))
    code, heavy, out, err = _child(["inspect", str(path), "--format", "json"])
    assert code == 0, err
    assert json.loads(out)["checkpoint"]["family"] == "torchvision"
    assert "torch" in heavy and "torchvision" not in heavy
