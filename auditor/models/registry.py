"""Architecture registry: names -> builders, with helpful errors.

Names: every torchvision ResNet (``resnet18`` ... ``resnext101_64x4d``) and
the CIFAR ResNets ``resnet8`` ... ``resnet1202``, each with the paper's
variants as suffixes: ``_nobn`` (no BatchNorm), ``_plain`` (no shortcuts),
``_plain_nobn``; CIFAR names also take ``_optb`` (projection shortcuts).
timm's ``resnet26`` and ``resnet18d`` ... ``resnet152d`` (deep stem, average-pool
shortcuts) are registered with timm's key names.
The paper's Figure 1 modules on torchvision's stem and stages are ``paper_plainN``
(a), ``paper_resN`` (b) and ``paper_resbnN`` (c), N in 18, 34, 50, 101 (family
``"paper"``); the CIFAR pre-activation ResNets are ``preactresnet18/34/50/101``
(family ``"cifar-preact"``). Their specs carry the block's equation.
``path/to/file.py:factory`` builds a user's own model.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArchitectureError, Remedy
from .catalog import BLOCK_EQUATIONS, CIFAR_DEPTHS, PAPER_DEPTHS, PAPER_FORMS, TIMM_CONFIGS, TORCHVISION_CONFIGS

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ArchSpec", "register_model", "list_models", "get_arch", "build_model"]


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture.

    Attributes
    ----------
    name : str
        Registry name.
    family : str
        ``"torchvision"``, ``"timm"``, ``"cifar"``, ``"paper"``, ``"cifar-preact"`` or ``"custom"``.
    input_size : int
        Default square input size.
    batchnorm, residual : bool
        Which variant this is.
    builder : callable
        ``builder(num_classes) -> nn.Module``.
    default_classes : int
        Classes when none are given.
    equation : str
        The residual block's map ``x -> x'`` where registered (``""`` otherwise).
    """

    name: str
    family: str
    input_size: int
    batchnorm: bool
    residual: bool
    builder: Callable[[int], nn.Module]
    default_classes: int = 10
    equation: str = ""


_REGISTRY: dict[str, ArchSpec] = {}


def register_model(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(family: str | None = None) -> list[str]:
    """Registered architecture names, sorted, optionally of one family."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get_arch(name: str) -> ArchSpec:
    """Look up a registered name; the error lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = [n for n in list_models() if n.split("_")[0] == name.split("_")[0]]
        known = ", ".join(close or [n for n in list_models() if "_" not in n])
        raise ArchitectureError(
            f"unknown architecture {name!r} (known: {known}, and variants with "
            "_nobn, _plain, _plain_nobn, _optb)",
            hint="see 'resdyn archs' for the names, or pass {remedy}", remedy=Remedy("arch", "path/to/model.py:factory"),
        ) from None


def _variant_suffix(batchnorm: bool, residual: bool) -> str:
    return ("" if residual else "_plain") + ("" if batchnorm else "_nobn")


def _torchvision_builder(name: str, batchnorm: bool, residual: bool) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .torchvision_resnet import torchvision_resnet  # torch only when built

        return torchvision_resnet(name, num_classes=num_classes, batchnorm=batchnorm, residual=residual)

    return build


def _cifar_builder(depth: int, shortcut: str, batchnorm: bool, residual: bool) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .cifar_resnet import cifar_resnet

        return cifar_resnet(depth, num_classes=num_classes, shortcut=shortcut, batchnorm=batchnorm, residual=residual)

    return build


def _timm_builder(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .timm_resnet import timm_resnet

        return timm_resnet(name, num_classes=num_classes)

    return build


def _paper_builder(form: str, depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .paper_modules import paper_resnet

        return paper_resnet(form, depth, num_classes=num_classes)

    return build


def _preact_builder(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .preact_resnet import preact_resnet

        return preact_resnet(depth, num_classes=num_classes)

    return build


def _register_paper_and_preact() -> None:
    """``paper_{plain,res,resbn}N`` (Figure 1 a-c, torchvision layout) and ``preactresnetN`` (CIFAR)."""
    for depth in PAPER_DEPTHS:
        kind = TORCHVISION_CONFIGS[f"resnet{depth}"][0]
        for form in PAPER_FORMS:
            register_model(ArchSpec(
                f"paper_{form}{depth}", "paper", 224, form != "res", form != "plain",
                _paper_builder(form, depth), default_classes=1000, equation=BLOCK_EQUATIONS[form, kind],
            ))
        register_model(ArchSpec(f"preactresnet{depth}", "cifar-preact", 32, True, True, _preact_builder(depth),
                                equation=BLOCK_EQUATIONS["resbn", kind]))


def _register_builtin() -> None:
    # Names only: torch is imported when a model is built.
    for timm_name in TIMM_CONFIGS:
        register_model(ArchSpec(timm_name, "timm", 224, True, True, _timm_builder(timm_name), default_classes=1000))
    for bn in (True, False):
        for res in (True, False):
            suffix = _variant_suffix(bn, res)
            for tv_name in TORCHVISION_CONFIGS:
                register_model(
                    ArchSpec(
                        tv_name + suffix, "torchvision", 224, bn, res,
                        _torchvision_builder(tv_name, bn, res),
                        default_classes=1000,
                    )
                )
            for depth in CIFAR_DEPTHS:
                shortcuts = ("A", "B") if res else ("A",)
                for sc in shortcuts:
                    opt = "_optb" if sc == "B" else ""
                    register_model(
                        ArchSpec(
                            f"resnet{depth}{opt}{suffix}", "cifar", 32, bn, res,
                            _cifar_builder(depth, sc, bn, res),
                        )
                    )
    _register_paper_and_preact()
    from .families import register_families  # RegNet, MobileNet, EfficientNet, ConvNeXt, timm ResNetV2/SE-ResNet

    register_families()


_register_builtin()


def _load_factory(reference: str) -> Callable[..., nn.Module]:
    file_part, _, factory_name = reference.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise ArchitectureError(
            f"model file {str(path)!r} does not exist",
            hint="an architecture is a registered name or path/to/model.py:factory",
        )
    module_name = f"_resdyn_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ArchitectureError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: report, do not crash
        raise ArchitectureError(
            f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ArchitectureError(
            f"{str(path)!r} has no callable {factory_name!r}",
            hint="path/to/model.py:factory names a function returning an nn.Module",
        )
    return factory


def is_factory_reference(name: str) -> bool:
    """True for ``path/to/file.py:factory`` references."""
    return ".py:" in name


def build_model(name: str, num_classes: int | None = None) -> tuple[nn.Module, ArchSpec]:
    """Build an architecture by registry name or ``file.py:factory``.

    Returns
    -------
    model : nn.Module
        Freshly initialised, in eval mode.
    spec : ArchSpec
        What was built (family ``"custom"`` for user factories).
    """
    if is_factory_reference(name):
        from torch import nn

        factory = _load_factory(name)
        try:
            model = factory()
        except Exception as exc:
            raise ArchitectureError(f"calling {name!r} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ArchitectureError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
        spec = ArchSpec(name, "custom", 32, True, True, lambda k: factory())
        return model.eval(), spec
    spec = get_arch(name)
    return spec.builder(num_classes or spec.default_classes).eval(), spec
