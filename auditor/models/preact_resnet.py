"""CIFAR pre-activation ResNets (He et al. 2016b) in the common PyTorch layout.

The layout is kuangliu's ``pytorch-cifar`` ``PreActResNet`` with the final
BatchNorm of the widely used variant that has one (the adversarial-training
code of Wong et al. 2020 and Rice et al. 2020): a 3x3 stem convolution
``conv1`` (3 -> 64, stride 1, no bias, no norm), four stages ``layer1..layer4``
of 64/128/256/512 channels (strides 1, 2, 2, 2), the final ``bn`` and ReLU,
global average pooling and ``linear``. Keys, block by block::

    layerN.M.bn1  layerN.M.conv1  layerN.M.bn2  layerN.M.conv2  [layerN.M.bn3  layerN.M.conv3]
    layerN.M.shortcut.0                 (1x1 projection, only where the shape changes)

Each block computes ``x' = W2 σ(BN2(W1 σ(BN1 x))) + x`` (bottleneck:
``W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x))))) + x``), BNk normalising the *input* of
convolution k; the projection shortcut takes the same pre-activated input
``σ(BN1 x)`` as ``conv1``.

Parameters: ``preactresnet18`` with 10 classes has 11,172,170, which is
kuangliu's 11,171,146 plus the 2 x 512 of the final ``bn``; build kuangliu's
model exactly with ``PreActResNet(..., final_norm=False)``.

Initialisation is torchvision's (Kaiming normal, fan-out, for convolutions;
BatchNorm weight 1, bias 0; PyTorch's default for ``linear``), so a build under
``torch.manual_seed`` is reproducible.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PREACT_CONFIGS", "PreActBlock", "PreActBottleneck", "PreActResNet", "init_like_torchvision", "preact_resnet",
    "projection_shortcut",
]

# depth -> (block type, blocks per stage)
PREACT_CONFIGS: dict[int, tuple[str, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}


def projection_shortcut(in_planes: int, out_planes: int, stride: int, bias: bool = False) -> nn.Sequential | None:
    """``Sequential(1x1 conv, stride)`` where the shape changes, else ``None`` (identity shortcut)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=bias))


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``x' = W2 σ(BN2(W1 σ(BN1 x))) + x``.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Output channels.
    stride : int
        Stride of ``conv1`` (and of the projection shortcut).

    Notes
    -----
    ``shortcut`` is ``Sequential(Conv2d 1x1)`` (key ``shortcut.0``) when the
    shape changes, applied to ``σ(BN1 x)``; otherwise ``None`` and the block
    adds ``x``. Which one is decided here, so ``torch.fx`` traces the block.
    """

    expansion = 1
    residual = True  # False: the paper's plain module (a), no shortcut and no add

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU()  # a module, called twice (no state-dict key)
        self.shortcut = projection_shortcut(in_planes, planes * self.expansion, stride) if self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        branch = self.conv2(self.relu(self.bn2(self.conv1(out))))
        if not self.residual:
            return branch
        return branch + (self.shortcut(out) if self.shortcut is not None else x)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: ``x' = W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x))))) + x``.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Channels of the 1x1 reduction and the 3x3 convolution; the block
        outputs ``4 * planes``.
    stride : int
        Stride of the 3x3 ``conv2`` (and of the projection shortcut).

    Notes
    -----
    The shortcut is as in :class:`PreActBlock`.
    """

    expansion = 4
    residual = True  # False: the paper's plain module (a), no shortcut and no add

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = projection_shortcut(in_planes, planes * self.expansion, stride) if self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        branch = self.conv2(self.relu(self.bn2(self.conv1(out))))
        branch = self.conv3(self.relu(self.bn3(branch)))
        if not self.residual:
            return branch
        return branch + (self.shortcut(out) if self.shortcut is not None else x)


PreActBlockType = Union[type[PreActBlock], type[PreActBottleneck]]


def init_like_torchvision(model: nn.Module) -> None:
    """Kaiming normal (fan-out, ReLU) convolutions with zero bias; BatchNorm weight 1, bias 0.

    The modules are visited in ``model.modules()`` order, so a build under
    ``torch.manual_seed`` draws the same numbers every time.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet: 3x3 stem, four pre-activation stages, final BN-ReLU, pool, ``linear``.

    Parameters
    ----------
    block : PreActBlock or PreActBottleneck
        Block class.
    num_blocks : list of int
        Blocks per stage (four stages).
    num_classes : int
        Output classes.
    final_norm : bool
        Keep the final ``bn`` + ReLU before pooling (the default; kuangliu's
        original ``PreActResNet`` has none: ``final_norm=False``).
    """

    def __init__(self, block: PreActBlockType, num_blocks: list[int], num_classes: int = 10,
                 *, final_norm: bool = True) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"a PreActResNet has four stages, got {num_blocks}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512 * block.expansion) if final_norm else None
        self.relu = nn.ReLU()
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        init_like_torchvision(self)

    def _make_layer(self, block: PreActBlockType, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn is not None:
            out = self.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet(depth: int, *, num_classes: int = 10, final_norm: bool = True) -> PreActResNet:
    """Build ``preactresnet{depth}`` (18, 34: basic blocks; 50, 101: bottlenecks).

    Raises
    ------
    ValueError
        For another depth.
    """
    if depth not in PREACT_CONFIGS:
        raise ValueError(f"pre-activation ResNet depth must be one of {sorted(PREACT_CONFIGS)}, got {depth}")
    kind, layers = PREACT_CONFIGS[depth]
    block: PreActBlockType = PreActBlock if kind == "basic" else PreActBottleneck
    return PreActResNet(block, layers, num_classes, final_norm=final_norm)
