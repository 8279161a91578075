"""Names and shapes of the built-in architectures, without torch or torchvision.

The registry and the architecture inference read these; the builders
(:mod:`.torchvision_resnet`, :mod:`.cifar_resnet`) import torch and torchvision
only when a model is actually built.
"""

from __future__ import annotations

__all__ = ["TORCHVISION_CONFIGS", "CIFAR_DEPTHS"]

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
