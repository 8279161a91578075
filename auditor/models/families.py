"""The residual networks people train today: RegNet, MobileNet, EfficientNet, ConvNeXt, timm ResNetV2 and SE-ResNet.

Names and builders, without torch: the registry reads :data:`FAMILY_MODELS` at
start-up, and a builder imports torchvision or timm only when its model is
built (``torchvision.models.<name>(weights=None, num_classes=k)``,
``timm.create_model(name, pretrained=False, num_classes=k)``; no weights are
ever downloaded).

torchvision (family ``"torchvision"``)
    ``regnet_x_{400mf,800mf,1_6gf,3_2gf,8gf,16gf,32gf}``,
    ``regnet_y_{400mf,800mf,1_6gf,3_2gf,8gf,16gf,32gf,128gf}``, ``mobilenet_v2``,
    ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``efficientnet_b0`` ... ``efficientnet_b7``,
    ``convnext_tiny``, ``convnext_small``, ``convnext_base``, ``convnext_large``.
timm (family ``"timm"``, needs ``pip install "resdyn[timm]"``)
    - pre-activation ResNets with BatchNorm: ``resnetv2_18/34/50/101/152``, their
      ``d`` variants (deep stem, average-pool shortcuts) and ``resnetv2_50t`` (tiered stem);
    - squeeze-and-excitation ResNets ``seresnet*`` / ``seresnext*`` of timm's ResNet class,
      the anti-aliased ``seresnetaa50d`` / ``seresnextaa*`` included. Their anti-aliasing
      pool has no weights: ``seresnextaa101d_32x8d`` and ``seresnext101d_32x8d`` have the
      same keys and shapes, so a checkpoint of either needs ``--arch``;
    - timm's ConvNeXt, ``convnext_atto`` ... ``convnext_xxlarge`` with the ``_ols``
      (overlapping stem), ``_rms`` (RMS norm), ``_hnf`` and ``_mlp`` variants. timm's
      ``convnext_tiny/small/base/large`` are registered as ``timm_convnext_tiny`` ...
      ``timm_convnext_large``: torchvision has the plain names (with other keys).

Left out, with the reason:

- ``resnetv2_*_bit`` (Big Transfer): GroupNorm and weight-standardised convolutions
  (``StdConv2d`` normalises its weight in every forward pass), so a stored
  convolution weight is not the operator the network applies; ``resnetv2_50d_gn``,
  ``_evos`` and ``_frn`` normalise with GroupNorm, EvoNorm or FRN, not BatchNorm.
- ``seresnet33ts``, ``seresnext26ts``: timm's ``ByobNet``, another network with other keys.
- ``convnextv2_*``: global response normalisation in every block, not a ConvNeXt block.

Each entry records what :mod:`.infer_families` reads from a state dict to
shortlist it: the blocks per stage and one width (see ``KIND_WIDTH``);
``tests/test_families.py`` checks the table against the built models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ArchitectureError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FamilyModel", "FAMILY_MODELS", "KIND_TITLES", "KIND_WIDTH", "family_builder", "register_families"]

# kind -> what the kind is called in an explanation
KIND_TITLES: dict[str, str] = {
    "regnet": "torchvision RegNet",
    "mobilenet": "torchvision MobileNet",
    "efficientnet": "torchvision EfficientNet",
    "convnext": "torchvision ConvNeXt",
    "resnetv2": "timm pre-activation ResNetV2",
    "seresnet": "timm SE-ResNet/SE-ResNeXt",
    "timm_convnext": "timm ConvNeXt",
}

# kind -> the tensor whose first dimension is the recorded width
KIND_WIDTH: dict[str, str] = {
    "regnet": "trunk_output.block1.block1-0.f.c.0.weight",
    "mobilenet": "features.0.0.weight",
    "efficientnet": "features.0.0.weight",
    "convnext": "features.0.0.weight",
    "resnetv2": "stem.conv.weight or stem.conv1.weight",
    "seresnet": "layer1.0.conv1.weight",
    "timm_convnext": "stem.0.weight",
}


@dataclass(frozen=True)
class FamilyModel:
    """One registered model of these families.

    Attributes
    ----------
    name : str
        Registry name.
    source : str
        ``"torchvision"`` or ``"timm"``: who builds it (and the registry family).
    upstream : str
        The name in ``torchvision.models`` or timm's registry.
    kind : str
        Key layout, a key of :data:`KIND_TITLES`.
    depths : tuple of int
        Blocks per stage as :mod:`.infer_families` counts them.
    width : int
        First dimension of the kind's width tensor (:data:`KIND_WIDTH`).
    batchnorm : bool
        Whether the network normalises with BatchNorm (ConvNeXt: LayerNorm).
    """

    name: str
    source: str
    upstream: str
    kind: str
    depths: tuple[int, ...]
    width: int
    batchnorm: bool = True


# kind -> upstream name -> (blocks per stage, width); generated from the built models
# (torchvision 0.29.1, timm 1.0.31) and checked against them by tests/test_families.py.
_TORCHVISION: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {
    "regnet": {
        "regnet_x_400mf": ((1, 2, 7, 12), 32),
        "regnet_x_800mf": ((1, 3, 7, 5), 64),
        "regnet_x_1_6gf": ((2, 4, 10, 2), 72),
        "regnet_x_3_2gf": ((2, 6, 15, 2), 96),
        "regnet_x_8gf": ((2, 5, 15, 1), 80),
        "regnet_x_16gf": ((2, 6, 13, 1), 256),
        "regnet_x_32gf": ((2, 7, 13, 1), 336),
        "regnet_y_400mf": ((1, 3, 6, 6), 48),
        "regnet_y_800mf": ((1, 3, 8, 2), 64),
        "regnet_y_1_6gf": ((2, 6, 17, 2), 48),
        "regnet_y_3_2gf": ((2, 5, 13, 1), 72),
        "regnet_y_8gf": ((2, 4, 10, 1), 224),
        "regnet_y_16gf": ((2, 4, 11, 1), 224),
        "regnet_y_32gf": ((2, 5, 12, 1), 232),
        "regnet_y_128gf": ((2, 7, 17, 1), 528),
    },
    "mobilenet": {
        "mobilenet_v2": ((19,), 32),
        "mobilenet_v3_small": ((13,), 16),
        "mobilenet_v3_large": ((17,), 16),
    },
    "efficientnet": {
        "efficientnet_b0": ((1, 2, 2, 3, 3, 4, 1), 32),
        "efficientnet_b1": ((2, 3, 3, 4, 4, 5, 2), 32),
        "efficientnet_b2": ((2, 3, 3, 4, 4, 5, 2), 32),
        "efficientnet_b3": ((2, 3, 3, 5, 5, 6, 2), 40),
        "efficientnet_b4": ((2, 4, 4, 6, 6, 8, 2), 48),
        "efficientnet_b5": ((3, 5, 5, 7, 7, 9, 3), 48),
        "efficientnet_b6": ((3, 6, 6, 8, 8, 11, 3), 56),
        "efficientnet_b7": ((4, 7, 7, 10, 10, 13, 4), 64),
    },
    "convnext": {
        "convnext_tiny": ((3, 3, 9, 3), 96),
        "convnext_small": ((3, 3, 27, 3), 96),
        "convnext_base": ((3, 3, 27, 3), 128),
        "convnext_large": ((3, 3, 27, 3), 192),
    },
}
_TIMM: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {
    "resnetv2": {
        "resnetv2_18": ((2, 2, 2, 2), 64),
        "resnetv2_18d": ((2, 2, 2, 2), 32),
        "resnetv2_34": ((3, 4, 6, 3), 64),
        "resnetv2_34d": ((3, 4, 6, 3), 32),
        "resnetv2_50": ((3, 4, 6, 3), 64),
        "resnetv2_50d": ((3, 4, 6, 3), 32),
        "resnetv2_50t": ((3, 4, 6, 3), 24),
        "resnetv2_101": ((3, 4, 23, 3), 64),
        "resnetv2_101d": ((3, 4, 23, 3), 32),
        "resnetv2_152": ((3, 8, 36, 3), 64),
        "resnetv2_152d": ((3, 8, 36, 3), 32),
    },
    "seresnet": {
        "seresnet18": ((2, 2, 2, 2), 64),
        "seresnet34": ((3, 4, 6, 3), 64),
        "seresnet50": ((3, 4, 6, 3), 64),
        "seresnet50t": ((3, 4, 6, 3), 64),
        "seresnet101": ((3, 4, 23, 3), 64),
        "seresnet152": ((3, 8, 36, 3), 64),
        "seresnet152d": ((3, 8, 36, 3), 64),
        "seresnet200d": ((3, 24, 36, 3), 64),
        "seresnet269d": ((3, 30, 48, 8), 64),
        "seresnetaa50d": ((3, 4, 6, 3), 64),
        "seresnext26d_32x4d": ((2, 2, 2, 2), 128),
        "seresnext26t_32x4d": ((2, 2, 2, 2), 128),
        "seresnext50_32x4d": ((3, 4, 6, 3), 128),
        "seresnext101_32x4d": ((3, 4, 23, 3), 128),
        "seresnext101_32x8d": ((3, 4, 23, 3), 256),
        "seresnext101_64x4d": ((3, 4, 23, 3), 256),
        "seresnext101d_32x8d": ((3, 4, 23, 3), 256),
        "seresnextaa101d_32x8d": ((3, 4, 23, 3), 256),
        "seresnextaa201d_32x8d": ((3, 24, 36, 4), 256),
    },
    "timm_convnext": {
        "convnext_atto": ((2, 2, 6, 2), 40),
        "convnext_atto_ols": ((2, 2, 6, 2), 24),
        "convnext_atto_rms": ((2, 2, 6, 2), 40),
        "convnext_base": ((3, 3, 27, 3), 128),
        "convnext_femto": ((2, 2, 6, 2), 48),
        "convnext_femto_ols": ((2, 2, 6, 2), 24),
        "convnext_large": ((3, 3, 27, 3), 192),
        "convnext_large_mlp": ((3, 3, 27, 3), 192),
        "convnext_nano": ((2, 2, 8, 2), 80),
        "convnext_nano_ols": ((2, 2, 8, 2), 80),
        "convnext_pico": ((2, 2, 6, 2), 64),
        "convnext_pico_ols": ((2, 2, 6, 2), 32),
        "convnext_small": ((3, 3, 27, 3), 96),
        "convnext_tiny": ((3, 3, 9, 3), 96),
        "convnext_tiny_hnf": ((3, 3, 9, 3), 96),
        "convnext_xlarge": ((3, 3, 27, 3), 256),
        "convnext_xxlarge": ((3, 4, 30, 3), 384),
        "convnext_zepto_rms": ((2, 2, 4, 2), 32),
        "convnext_zepto_rms_ols": ((2, 2, 4, 2), 32),
    },
}
# timm names that torchvision registers with other keys
_TIMM_CLASHES = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large")


def _catalog() -> dict[str, FamilyModel]:
    models: dict[str, FamilyModel] = {}
    for source, table in (("torchvision", _TORCHVISION), ("timm", _TIMM)):
        for kind, entries in table.items():
            for upstream, (depths, width) in entries.items():
                name = f"timm_{upstream}" if source == "timm" and upstream in _TIMM_CLASHES else upstream
                batchnorm = kind not in ("convnext", "timm_convnext")
                models[name] = FamilyModel(name, source, upstream, kind, depths, width, batchnorm)
    return models


FAMILY_MODELS: dict[str, FamilyModel] = _catalog()


def _needs_timm(name: str) -> ArchitectureError:
    return ArchitectureError(f'architecture {name} needs timm: pip install "resdyn[timm]"')


def family_builder(name: str) -> Callable[[int], nn.Module]:
    """``builder(num_classes) -> nn.Module`` for registry name ``name`` (randomly initialised).

    Raises
    ------
    ArchitectureError
        When built: timm is not installed, or the installed timm or torchvision lacks the model.
    """
    model = FAMILY_MODELS[name]

    def build(num_classes: int) -> nn.Module:
        if model.source == "timm":
            try:
                import timm
            except ImportError:
                raise _needs_timm(name) from None
            if not timm.is_model(model.upstream):
                raise ArchitectureError(
                    f"architecture {name} needs a newer timm: timm {timm.__version__} has no {model.upstream!r}",
                    hint='pip install -U "resdyn[timm]"',
                )
            return timm.create_model(model.upstream, pretrained=False, num_classes=num_classes)
        import torchvision.models  # 1.3 s: only for these families, only when one is built

        factory = getattr(torchvision.models, model.upstream, None)
        if factory is None:
            raise ArchitectureError(
                f"architecture {name} needs a newer torchvision: torchvision.models has no {model.upstream!r}"
            )
        return factory(weights=None, num_classes=num_classes)

    return build


def register_families() -> None:
    """Add every :data:`FAMILY_MODELS` entry to the registry (input 224, 1000 classes by default)."""
    from .registry import ArchSpec, register_model  # the registry calls this while it is imported

    for name, model in FAMILY_MODELS.items():
        register_model(ArchSpec(name, model.source, 224, model.batchnorm, True, family_builder(name),
                                default_classes=1000))
