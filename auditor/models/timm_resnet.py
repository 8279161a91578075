"""timm's ResNets with a deep stem and average-pool shortcuts, without timm.

timm (``pytorch-image-models``) builds ``resnet26`` and the ``d`` variants
(``resnet18d`` ... ``resnet152d``, "ResNet-D" of He et al., *Bag of Tricks*,
2019) from the torchvision blocks (:mod:`.resnet_layout`) with two changes, both reproduced here so
that a timm state dict loads unchanged:

- deep stem: ``conv1`` is ``Sequential(conv3x3(3, 32, stride 2), BN, ReLU,
  conv3x3(32, 32), BN, ReLU, conv3x3(32, 64))``, followed by ``bn1`` as before;
- average-pool shortcut: a down-sampling block's ``downsample`` is
  ``Sequential(AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
  Conv2d 1x1, BN)`` (``Identity`` in place of the pool where the stride is 1).

On even sizes the pool is an exact 2x2 average, so pool + 1x1 convolution is a
2x2 stride-2 convolution with the 1x1 weights / 4 at every tap
(:func:`auditor.models.pooled_shortcut.pooled_projection`).
"""

from __future__ import annotations

from torch import nn
from . import resnet_layout as tv
from .catalog import TIMM_CONFIGS

__all__ = ["TIMM_CONFIGS", "timm_resnet"]

_STEM_WIDTH = 32


def _deep_stem() -> nn.Sequential:
    def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)

    return nn.Sequential(
        conv(3, _STEM_WIDTH, 2), nn.BatchNorm2d(_STEM_WIDTH), nn.ReLU(inplace=True),
        conv(_STEM_WIDTH, _STEM_WIDTH), nn.BatchNorm2d(_STEM_WIDTH), nn.ReLU(inplace=True),
        conv(_STEM_WIDTH, 64),
    )


def _avg_down(projection: nn.Sequential, stride: int) -> nn.Sequential:
    conv = projection[0]
    pool: nn.Module = (
        nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
    )
    return nn.Sequential(
        pool, nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=False), nn.BatchNorm2d(conv.out_channels)
    )


def timm_resnet(name: str, *, num_classes: int = 1000) -> tv.ResNet:
    """Build timm ResNet ``name`` (see ``TIMM_CONFIGS``) with timm's state-dict keys."""
    kind, layers, deep = TIMM_CONFIGS[name]
    block: type[nn.Module] = tv.BasicBlock if kind == "basic" else tv.Bottleneck
    model = tv.ResNet(block, layers, num_classes=num_classes)  # type: ignore[arg-type]
    if deep:
        model.conv1 = _deep_stem()
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            first = stage[0]
            if first.downsample is not None:
                first.downsample = _avg_down(first.downsample, first.stride)
    return model
