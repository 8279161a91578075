"""torchvision ResNets with the paper's variants: without BatchNorm, and plain.

The standard models are torchvision's classes as rebuilt in
:mod:`.resnet_layout` (same keys, same forward, same seeded initialisation,
without importing torchvision), so torchvision checkpoints load unchanged.
``batchnorm=False`` replaces every BatchNorm with an identity
and gives each convolution a bias; ``residual=False`` drops every shortcut
(including the projection of down-sampling blocks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import resnet_layout as tv
from .catalog import TORCHVISION_CONFIGS

__all__ = ["TORCHVISION_CONFIGS", "torchvision_resnet"]


class _NoNorm(nn.Identity):
    """Stands where BatchNorm was; takes (and ignores) the channel count."""

    def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
        super().__init__()


class PlainBasicBlock(tv.BasicBlock):
    """torchvision BasicBlock without its shortcut."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)))


class PlainBottleneck(tv.Bottleneck):
    """torchvision Bottleneck without its shortcut."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)))


def torchvision_resnet(
    name: str, *, num_classes: int = 1000, batchnorm: bool = True, residual: bool = True
) -> tv.ResNet:
    """Build torchvision ResNet ``name`` (see ``TORCHVISION_CONFIGS``) or one of its variants."""
    kind, layers, extra = TORCHVISION_CONFIGS[name]
    if residual:
        block: type[nn.Module] = tv.BasicBlock if kind == "basic" else tv.Bottleneck
    else:
        block = PlainBasicBlock if kind == "basic" else PlainBottleneck
    kwargs: dict[str, Any] = dict(extra, num_classes=num_classes)
    if not batchnorm:
        kwargs["norm_layer"] = _NoNorm
    model = tv.ResNet(block, layers, **kwargs)  # type: ignore[arg-type]
    if not batchnorm:
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_channels))
    return model
