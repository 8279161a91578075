"""The three modules of the paper's Figure 1 on torchvision's ResNet stem and stages.

"Understanding ResNet from a Discrete Dynamical System Perspective" compares
three residual-block forms (σ is ReLU, ``Wk`` a convolution, ``BNk`` the
BatchNorm of ``Wk``'s input):

(a) ``paper_plainN``: the plain module, pre-activation order, no shortcut::

        x' = W2 σ(BN2(W1 σ(BN1 x)))                    (bottleneck: W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x))))))

(b) ``paper_resN``: the ResNet block without BN, whose residual branch ends in σ::

        x' = σ(f(x)) + x,  f(x) = W2 σ(W1 x)           (bottleneck: f = W3 σ(W2 σ(W1 x)))

    with biased convolutions (``Wk x`` is ``conv(x) + b``) and no BatchNorm anywhere,
    the stem included (its ``conv1`` has a bias, its ``bn1`` is an identity);

(c) ``paper_resbnN``: the pre-activation ResNet with BN of He et al. (2016b)::

        x' = W2 σ(BN2(W1 σ(BN1 x))) + x                (bottleneck: W3 σ(BN3(...)) + x)

Layout: torchvision's (``conv1`` 7x7/2, ``bn1``, ReLU, 3x3/2 max-pool,
``layer1..layer4`` of 64/128/256/512 channels, ``avgpool``, ``fc``; basic
blocks [2,2,2,2] / [3,4,6,3] for N = 18 / 34, bottlenecks with expansion 4,
stride on the 3x3 convolution, [3,4,6,3] / [3,4,23,3] for N = 50 / 101).
Inside a block the convolutions are ``conv1``, ``conv2`` (``conv3``) and
``bnK`` normalises ``convK``'s input. Where the shape changes, (b) and (c)
add a projection ``shortcut`` (``Sequential(Conv2d 1x1, stride s)``, key
``shortcut.0``) instead of ``x``: (b) applies it to ``x`` (with a bias),
(c) to the pre-activated ``σ(BN1 x)`` that ``conv1`` also reads (He et al.
2016b; timm's ``PreActBasicBlock``). (a) has no shortcut at all.

Final norm: the blocks of (a) and (c) end in a convolution, so, as in
PreActResNet, a final ``bn`` + ReLU precedes the pooling. (b) has none (no
BatchNorm anywhere; its blocks' outputs are already non-negative sums).
The stem keeps torchvision's BN-ReLU for (a) and (c), so ``layer1.0.bn1``
normalises an already activated input (fb.resnet.torch's ``preresnet`` skips
that first pre-activation; these models do not, so every block is the same map).

The (c) blocks are :class:`.preact_resnet.PreActBlock` /
:class:`.preact_resnet.PreActBottleneck`. Initialisation is torchvision's
(Kaiming normal, fan-out, for convolutions, zero conv biases; BN weight 1,
bias 0; PyTorch's default for ``fc``), in ``modules()`` order, so a build under
``torch.manual_seed`` is reproducible. Every block's forward has no
data-dependent control flow (the shortcut is chosen at construction), so
``torch.fx.symbolic_trace`` traces it.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .catalog import PAPER_DEPTHS, PAPER_FORMS, TORCHVISION_CONFIGS
from .preact_resnet import PreActBlock, PreActBottleneck, projection_shortcut, init_like_torchvision

__all__ = [
    "PlainPreActBlock",
    "PlainPreActBottleneck",
    "ResBlockNoBN",
    "ResBottleneckNoBN",
    "PreActBlock",
    "PreActBottleneck",
    "PaperResNet",
    "paper_resnet",
]


class PlainPreActBlock(PreActBlock):
    """Figure 1(a), basic: ``x' = W2 σ(BN2(W1 σ(BN1 x)))``: the pre-activation block without a shortcut.

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int
        Stride of ``conv1``.
    """

    residual = False


class PlainPreActBottleneck(PreActBottleneck):
    """Figure 1(a), bottleneck: ``x' = W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x)))))``, without a shortcut.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Channels of ``conv1`` and ``conv2``; the output has ``4 * planes``.
    stride : int
        Stride of the 3x3 ``conv2``.
    """

    residual = False


class ResBlockNoBN(nn.Module):
    """Figure 1(b), basic: ``x' = σ(W2 σ(W1 x)) + x`` with biased convolutions, no BN.

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int
        Stride of ``conv1`` and of the projection.

    Notes
    -----
    Where the shape changes ``shortcut`` is ``Sequential(Conv2d 1x1, bias)``
    applied to ``x``; otherwise ``None`` (identity).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.shortcut = projection_shortcut(in_planes, planes * self.expansion, stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv2(self.relu(self.conv1(x))))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return out + shortcut


class ResBottleneckNoBN(nn.Module):
    """Figure 1(b), bottleneck: ``x' = σ(W3 σ(W2 σ(W1 x))) + x`` with biased convolutions, no BN.

    Parameters
    ----------
    in_planes : int
        Input channels.
    planes : int
        Channels of ``conv1`` and ``conv2``; the output has ``4 * planes``.
    stride : int
        Stride of the 3x3 ``conv2`` and of the projection.

    Notes
    -----
    The shortcut is as in :class:`ResBlockNoBN`.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=True)
        self.relu = nn.ReLU()
        self.shortcut = projection_shortcut(in_planes, planes * self.expansion, stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv2(self.relu(self.conv1(x))))
        out = self.relu(self.conv3(out))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return out + shortcut


PaperBlock = Union[
    type[PlainPreActBlock], type[PlainPreActBottleneck], type[ResBlockNoBN], type[ResBottleneckNoBN],
    type[PreActBlock], type[PreActBottleneck],
]

# form -> (basic block, bottleneck block, BatchNorm in the stem and a final bn)
_BLOCKS: dict[str, tuple[PaperBlock, PaperBlock, bool]] = {
    "plain": (PlainPreActBlock, PlainPreActBottleneck, True),
    "res": (ResBlockNoBN, ResBottleneckNoBN, False),
    "resbn": (PreActBlock, PreActBottleneck, True),
}


class PaperResNet(nn.Module):
    """torchvision's stem and stages with one of the paper's block forms.

    Parameters
    ----------
    block : type
        A block class of this module (or :class:`PreActBlock` / :class:`PreActBottleneck`).
    layers : list of int
        Blocks per stage (four stages).
    num_classes : int
        Output classes.
    batchnorm : bool
        ``True``: the stem has ``bn1`` and a final ``bn`` + ReLU precedes the
        pooling (pre-activation forms (a), (c)); ``False``: neither, and the
        stem convolution has a bias (form (b)).
    """

    def __init__(self, block: PaperBlock, layers: list[int], num_classes: int = 1000,
                 *, batchnorm: bool = True) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"four stages expected, got {layers}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=not batchnorm)
        self.bn1: nn.Module = nn.BatchNorm2d(64) if batchnorm else nn.Identity()
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.bn = nn.BatchNorm2d(512 * block.expansion) if batchnorm else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_like_torchvision(self)

    def _make_layer(self, block: PaperBlock, planes: int, blocks: int, stride: int) -> nn.Sequential:
        stage = []
        for s in [stride] + [1] * (blocks - 1):
            stage.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.bn is not None:
            x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def paper_resnet(form: str, depth: int, *, num_classes: int = 1000) -> PaperResNet:
    """Build ``paper_{form}{depth}``.

    Parameters
    ----------
    form : {"plain", "res", "resbn"}
        Figure 1 (a), (b) or (c).
    depth : {18, 34, 50, 101}
        torchvision's depth (block type and counts).
    num_classes : int
        Output classes.

    Raises
    ------
    ValueError
        For another form or depth.
    """
    if form not in PAPER_FORMS:
        raise ValueError(f"form must be one of {sorted(PAPER_FORMS)}, got {form!r}")
    if depth not in PAPER_DEPTHS:
        raise ValueError(f"depth must be one of {list(PAPER_DEPTHS)}, got {depth}")
    kind, layers, _ = TORCHVISION_CONFIGS[f"resnet{depth}"]
    basic, bottleneck, batchnorm = _BLOCKS[form]
    return PaperResNet(basic if kind == "basic" else bottleneck, layers, num_classes, batchnorm=batchnorm)
