"""Names and shapes of the built-in architectures, without torch.

The registry and the architecture inference read these; the builders
(:mod:`.torchvision_resnet`, :mod:`.cifar_resnet`) import torch only when a
model is actually built (and never torchvision: see :mod:`.resnet_layout`).
"""

from __future__ import annotations

__all__ = ["TORCHVISION_CONFIGS", "CIFAR_DEPTHS", "TIMM_CONFIGS", "PAPER_DEPTHS", "PAPER_FORMS", "BLOCK_EQUATIONS"]

# name -> (block type, blocks per stage, extra ResNet kwargs)
TORCHVISION_CONFIGS: dict[str, tuple[str, list[int], dict[str, int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2], {}),
    "resnet34": ("basic", [3, 4, 6, 3], {}),
    "resnet50": ("bottleneck", [3, 4, 6, 3], {}),
    "resnet101": ("bottleneck", [3, 4, 23, 3], {}),
    "resnet152": ("bottleneck", [3, 8, 36, 3], {}),
    "wide_resnet50_2": ("bottleneck", [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": ("bottleneck", [3, 4, 23, 3], {"width_per_group": 128}),
    "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": ("bottleneck", [3, 4, 23, 3], {"groups": 64, "width_per_group": 4}),
}

CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110, 1202)

# timm names that torchvision does not have -> (block type, blocks per stage, deep stem and
# average-pool shortcuts). timm's resnet18/34/50/101/152 are torchvision's models with the
# same keys; the ``d`` variants have a deep stem (three 3x3 convolutions, ``conv1.0/3/6``)
# and average-pool down-sampling shortcuts (``downsample.0`` pool, ``.1`` 1x1 conv, ``.2`` BN).
TIMM_CONFIGS: dict[str, tuple[str, list[int], bool]] = {
    "resnet26": ("bottleneck", [2, 2, 2, 2], False),
    "resnet18d": ("basic", [2, 2, 2, 2], True),
    "resnet26d": ("bottleneck", [2, 2, 2, 2], True),
    "resnet34d": ("basic", [3, 4, 6, 3], True),
    "resnet50d": ("bottleneck", [3, 4, 6, 3], True),
    "resnet101d": ("bottleneck", [3, 4, 23, 3], True),
    "resnet152d": ("bottleneck", [3, 8, 36, 3], True),
}

# The paper's Figure 1 modules (paper_plainN, paper_resN, paper_resbnN; .paper_modules) and the
# CIFAR pre-activation ResNets (preactresnetN; .preact_resnet) have the depths of torchvision's
# resnet18/34/50/101, whose block type and blocks per stage (TORCHVISION_CONFIGS) they share.
PAPER_DEPTHS = (18, 34, 50, 101)
# form -> Figure 1 panel: (a) plain pre-activation, (b) ResNet without BN, (c) pre-activation ResNet
PAPER_FORMS = {"plain": "a", "res": "b", "resbn": "c"}
# (form, block type) -> the block's map x -> x' (W: a convolution; in "res" it has a bias; σ: ReLU;
# BNk normalises the input of Wk). A block that changes the shape adds Ws x instead of x (Ws: the
# 1x1 strided projection "shortcut"; in "resbn" it is applied to σ(BN1 x)). preactresnetN: "resbn".
BLOCK_EQUATIONS: dict[tuple[str, str], str] = {
    ("plain", "basic"): "x' = W2 σ(BN2(W1 σ(BN1 x)))",
    ("plain", "bottleneck"): "x' = W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x)))))",
    ("res", "basic"): "x' = σ(W2 σ(W1 x)) + x",
    ("res", "bottleneck"): "x' = σ(W3 σ(W2 σ(W1 x))) + x",
    ("resbn", "basic"): "x' = W2 σ(BN2(W1 σ(BN1 x))) + x",
    ("resbn", "bottleneck"): "x' = W3 σ(BN3(W2 σ(BN2(W1 σ(BN1 x))))) + x",
}
