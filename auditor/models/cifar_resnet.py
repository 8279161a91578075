"""CIFAR ResNets of He et al. (2016), section 4.2, with the paper's variants.

Module names follow the widely used layout (``conv1``, ``bn1``, ``layer1..3``,
``linear``; ``shortcut`` inside blocks) so that public CIFAR checkpoints load
with strict key matching.

Variants
--------
* ``shortcut="A"``: parameter-free shortcut (subsample ``x[:, :, ::2, ::2]`` and
  zero-pad ``planes // 4`` channels on each side); ``"B"``: 1x1 projection + BN.
* ``batchnorm=False``: every BatchNorm removed; convolutions get a bias instead.
* ``residual=False``: the *plain* network, the same layers without shortcuts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "CifarBasicBlock", "ZeroPadShortcut", "cifar_resnet"]


class ZeroPadShortcut(nn.Module):
    """Subsample by ``stride`` and zero-pad channels: the "option A" shortcut module.

    Its operator, for the spectra, is :class:`auditor.analysis.spectra.OptionAShortcut`.

    Parameters
    ----------
    stride : int
        Spatial subsampling factor.
    pad : int
        Zero channels added before *and* after the input channels.
    """

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


class CifarBasicBlock(nn.Module):
    """conv3x3 (stride s) - BN - ReLU - conv3x3 - BN, plus shortcut, then ReLU."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: str = "A",
        batchnorm: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        bias = not batchnorm
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(planes, batchnorm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(planes, batchnorm)
        # a ReLU module (no parameters, no state-dict key), called twice: the stability
        # phase then takes the block's Jacobian products by one forward pass with fixed
        # masks, where a functional ReLU costs forward-mode AD (4-8 passes) per product
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if residual:
            if stride == 1 and in_planes == planes:
                self.shortcut = nn.Identity()
            elif shortcut == "A":
                self.shortcut = ZeroPadShortcut(stride, planes // 4)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias),
                    _norm(planes, batchnorm),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """A CIFAR ResNet of depth ``6 n + 2`` with three stages of ``n`` blocks.

    Parameters
    ----------
    blocks_per_stage : int
        ``n``; depth is ``6 n + 2``.
    num_classes : int
        Output classes.
    width : int
        Channels of the first stage (16 in the paper); doubled per stage.
    shortcut : {"A", "B"}
        Shortcut of down-sampling blocks.
    batchnorm : bool
        Keep BatchNorm (``False``: conv biases instead).
    residual : bool
        ``False`` builds the plain network.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        width: int = 16,
        shortcut: str = "A",
        batchnorm: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        opts = dict(shortcut=shortcut, batchnorm=batchnorm, residual=residual)
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=not batchnorm)
        self.bn1 = _norm(width, batchnorm)
        stages = []
        in_planes = width
        for index, planes in enumerate((width, 2 * width, 4 * width)):
            layers = []
            for b in range(blocks_per_stage):
                stride = 2 if (index > 0 and b == 0) else 1
                layers.append(CifarBasicBlock(in_planes, planes, stride, **opts))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    width: int = 16,
    shortcut: str = "A",
    batchnorm: bool = True,
    residual: bool = True,
) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth (``6 n + 2``: 8, 14, 20, 32, 44, 56, 110, 1202)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    return CifarResNet(
        (depth - 2) // 6,
        num_classes=num_classes,
        width=width,
        shortcut=shortcut,
        batchnorm=batchnorm,
        residual=residual,
    )
