"""Infer a RegNet, MobileNet, EfficientNet, ConvNeXt, timm ResNetV2 or SE-ResNet from keys and shapes.

Three steps, cheapest first:

1. the family, from a few marker keys (dictionary look-ups: an ordinary
   ``layerN.M.*`` ResNet without ``se`` keys is answered ``None`` at once);
2. a shortlist, from the blocks per stage and one width, compared with the
   catalogue (:data:`.families.FAMILY_MODELS`), so that at most a handful of models are built;
3. the name: each shortlisted model is built on the meta device (no memory,
   no initialisation; cached per name) and the one whose keys and shapes all
   equal the state dict's wins. ``num_batches_tracked`` buffers may be absent.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import ArchitectureError, Remedy
from .families import FAMILY_MODELS, KIND_TITLES, FamilyModel, family_builder
from .infer import Inference

__all__ = ["infer_family", "family_kind", "signature", "head_classes", "build_on_meta"]

_OPTIONAL = "num_batches_tracked"
_CLASSIFIER = re.compile(r"^classifier\.(\d+)\.weight$")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class _Kind:
    """A key layout: marker keys (any group present in full), block keys, width keys."""

    kind: str
    markers: tuple[tuple[str, ...], ...]
    blocks: re.Pattern[str]
    width: tuple[str, ...]

    def detect(self, keys: Mapping[str, object]) -> bool:
        """Whether ``keys`` holds every key of one marker group (dictionary look-ups only)."""
        return any(all(k in keys for k in group) for group in self.markers)


KINDS: tuple[_Kind, ...] = (
    _Kind("regnet", (("stem.0.weight", "trunk_output.block1.block1-0.f.a.0.weight"),),
          re.compile(r"^trunk_output\.block(\d+)\.block\d+-(\d+)\."),
          ("trunk_output.block1.block1-0.f.c.0.weight",)),
    _Kind("mobilenet", (("features.0.0.weight", "features.1.conv.0.0.weight"),
                        ("features.0.0.weight", "features.1.block.0.0.weight")),
          re.compile(r"^features\.(\d+)\."), ("features.0.0.weight",)),
    _Kind("efficientnet", (("features.0.0.weight", "features.1.0.block.0.0.weight"),),
          re.compile(r"^features\.(\d+)\.(\d+)\.block\."), ("features.0.0.weight",)),
    _Kind("convnext", (("features.0.0.weight", "features.1.0.layer_scale"),),
          re.compile(r"^features\.(\d+)\.(\d+)\.block\."), ("features.0.0.weight",)),
    _Kind("resnetv2", (("stem.conv.weight", "stages.0.blocks.0.norm1.weight"),
                       ("stem.conv1.weight", "stages.0.blocks.0.norm1.weight")),
          re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), ("stem.conv.weight", "stem.conv1.weight")),
    _Kind("timm_convnext", (("stem.0.weight", "stages.0.blocks.0.conv_dw.weight"),),
          re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\."), ("stem.0.weight",)),
    _Kind("seresnet", (("layer1.0.se.fc1.weight",),),
          re.compile(r"^layer(\d+)\.(\d+)\."), ("layer1.0.conv1.weight",)),
)
_BY_KIND = {k.kind: k for k in KINDS}


def family_kind(keys: Mapping[str, object]) -> str | None:
    """The kind (a key of :data:`.families.KIND_TITLES`) whose marker keys ``keys`` has, or None."""
    for kind in KINDS:
        if kind.detect(keys):
            return kind.kind
    return None


def signature(kind: str, shapes: Shapes) -> tuple[tuple[int, ...], int]:
    """Blocks per stage and the width that :data:`.families.FAMILY_MODELS` records for ``kind``.

    A pattern with one group (MobileNet's ``features.N``) counts the entries as one stage.
    """
    spec = _BY_KIND[kind]
    stages: dict[int, set[int]] = {}
    for key in shapes:
        match = spec.blocks.match(key)
        if match:
            stage, block = (0, match[1]) if spec.blocks.groups == 1 else (match[1], match[2])
            stages.setdefault(int(stage), set()).add(int(block))
    depths = tuple(len(blocks) for _, blocks in sorted(stages.items()))
    width = next((shapes[k][0] for k in spec.width if k in shapes and shapes[k]), 0)
    return depths, int(width)


def head_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """Classes of the last linear layer: ``fc``, ``head.fc`` or the last ``classifier.N`` with a matrix."""
    candidates = ["fc.weight", "head.fc.weight"]
    candidates += sorted((k for k in state if _CLASSIFIER.match(k)), key=lambda k: -int(k.split(".")[1]))
    for key in candidates:
        tensor = state.get(key)
        if tensor is not None and tensor.ndim >= 2:
            return int(tensor.shape[0])
    return None


@contextmanager
def _regnet_params_on_cpu() -> Iterator[None]:
    """torchvision's RegNet computes its stage widths with tensors and ``.tolist()``: not on meta."""
    from torchvision.models.regnet import BlockParams

    original = BlockParams.__dict__["from_init_params"]

    def on_cpu(cls: type, *args: object, **kwargs: object) -> object:
        with torch.device("cpu"):
            return original.__func__(cls, *args, **kwargs)

    BlockParams.from_init_params = classmethod(on_cpu)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        BlockParams.from_init_params = original  # type: ignore[method-assign]


# In-place operations that initialize values: on a meta tensor they have no data to change and
# never change a shape, but their Python reference kernels cost most of a model's build (timm's
# trunc_normal_ is erfinv_, mul_, add_ and clamp_ on every weight): about 4x faster builds.
_INIT_OPS = frozenset({"uniform_", "normal_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_", "fill_", "zero_",
                       "mul_", "add_", "sub_", "div_", "copy_", "exponential_", "bernoulli_", "random_",
                       "log_normal_", "geometric_", "cauchy_", "sqrt_", "exp_", "log_"})


class _MetaInitIsFree(torch.overrides.TorchFunctionMode):
    """Skip value-initializing in-place operations on meta tensors (they return the tensor, as they would)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in _INIT_OPS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_on_meta(name: str, num_classes: int) -> nn.Module:
    """Registry model ``name`` of :data:`.families.FAMILY_MODELS` on the meta device: shapes, no memory, no init."""
    model = FAMILY_MODELS[name]
    with torch.device("meta"), _MetaInitIsFree():
        if model.kind == "regnet":
            with _regnet_params_on_cpu():
                return family_builder(name)(num_classes)
        return family_builder(name)(num_classes)


@lru_cache(maxsize=16)
def _meta_shapes(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``build_on_meta(name, num_classes)`` (cached: the inference compares against them)."""
    return {k: tuple(v.shape) for k, v in build_on_meta(name, num_classes).state_dict().items()}


def _fail(found: str) -> ArchitectureError:
    return ArchitectureError(
        f"cannot infer the architecture: {found}",
        hint="pass {remedy}: a name from 'resdyn archs' or path/to/model.py:factory", remedy=Remedy("arch", None),
    )


def _differences(shapes: Shapes, candidate: Shapes) -> tuple[int, str]:
    """How many keys differ between a state dict and a candidate, and the first of each kind, in words."""
    have = {k for k in shapes if not k.endswith(_OPTIONAL)}
    want = {k for k in candidate if not k.endswith(_OPTIONAL)}
    missing, extra = sorted(want - have), sorted(have - want)
    shape = [f"{k} {'x'.join(map(str, shapes[k]))} vs {'x'.join(map(str, candidate[k]))}"
             for k in sorted(have & want) if shapes[k] != candidate[k]]
    parts = [f"{len(missing)} missing keys ({missing[0]}, ...)" if missing else "",
             f"{len(extra)} unexpected keys ({extra[0]}, ...)" if extra else "",
             f"{len(shape)} other shapes ({shape[0]})" if shape else ""]
    return len(missing) + len(extra) + len(shape), ", ".join(p for p in parts if p)


def _equal(shapes: Shapes, candidate: Shapes) -> bool:
    """Same keys (``num_batches_tracked`` optional on the state dict's side) and every shape equal."""
    if any(k not in candidate for k in shapes):
        return False
    return all(shapes.get(k) == s for k, s in candidate.items() if k in shapes or not k.endswith(_OPTIONAL))


def _evidence(kind: str, shapes: Shapes) -> str:
    """What distinguishes the variants of ``kind``, in words."""
    if kind == "regnet":
        grouped = shapes.get("trunk_output.block1.block1-0.f.b.0.weight", (0, 0))
        se = "SE modules f.se (RegNetY)" if "trunk_output.block1.block1-0.f.se.fc1.weight" in shapes \
            else "no SE modules (RegNetX)"
        return f"{se}, group width {grouped[1]}"
    if kind == "mobilenet":
        return ("inverted residuals features.N.conv (MobileNetV2)" if "features.1.conv.0.0.weight" in shapes
                else "blocks features.N.block with SE and hard-swish (MobileNetV3)")
    if kind == "efficientnet":
        return f"MBConv stages features.1..{len(_stage_widths(kind, shapes))} with SE, classifier head"
    if kind == "convnext":
        return f"ConvNeXt blocks with layer_scale, stage widths {_join(_stage_widths(kind, shapes))}"
    if kind == "timm_convnext":
        mlp = "1x1-conv MLP" if len(shapes.get("stages.0.blocks.0.mlp.fc1.weight", ())) == 4 else "linear MLP"
        grn = (", global response normalisation mlp.grn (ConvNeXt V2, not registered)"
               if "stages.0.blocks.0.mlp.grn.weight" in shapes else "")
        return f"conv_dw blocks, {mlp}, stage widths {_join(_stage_widths(kind, shapes))}{grn}"
    if kind == "resnetv2":
        stem = "deep stem stem.conv1/2/3" if "stem.conv1.weight" in shapes else "7x7 stem.conv"
        block = "bottleneck" if "stages.0.blocks.0.conv3.weight" in shapes else "basic"
        norm = ("BatchNorm" if "stages.0.blocks.0.norm1.running_mean" in shapes else
                "norms without running statistics (GroupNorm/EvoNorm: BiT and _gn/_evos, not registered)")
        return f"pre-activation {block} blocks (norm1 before conv1), {norm}, {stem}, final norm, head.fc"
    conv2 = shapes.get("layer1.0.conv2.weight", (1, 1))
    stem = "deep stem conv1.0/3/6" if "conv1.0.weight" in shapes else "7x7 stem conv1"
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    return f"SE modules layerN.M.se.fc1/fc2, {block} blocks, conv2 groups {conv2[0] // max(conv2[1], 1)}, {stem}"


def _stage_widths(kind: str, shapes: Shapes) -> list[int]:
    spec = _BY_KIND[kind]
    widths: dict[int, int] = {}
    for key, shape in shapes.items():
        match = spec.blocks.match(key)
        if match and spec.blocks.groups == 2 and shape and int(match[1]) not in widths:
            if key.endswith(("conv_dw.weight", "block.0.weight", "block.0.0.weight")):
                widths[int(match[1])] = shape[0]
    return [w for _, w in sorted(widths.items())]


def _join(values: tuple[int, ...] | list[int]) -> str:
    return "x".join(map(str, values)) if values else "none"


def _blocks(depths: tuple[int, ...]) -> str:
    """``3x3x9x3 blocks per stage``, or ``19 feature blocks`` for MobileNet's flat ``features.N``."""
    return f"{depths[0]} feature blocks" if len(depths) == 1 else f"{_join(depths)} blocks per stage"


def infer_family(state: Mapping[str, torch.Tensor]) -> Inference | None:
    """Name the registered RegNet / MobileNet / EfficientNet / ConvNeXt / ResNetV2 / SE-ResNet of ``state``.

    Parameters
    ----------
    state : mapping of str to Tensor
        A state dict with wrapper prefixes removed.

    Returns
    -------
    Inference or None
        None when ``state`` has none of these families' marker keys (then the
        ResNet inference of :mod:`.infer` decides).

    Raises
    ------
    ArchitectureError
        When the marker keys of a family are there but no registered size fits;
        the message says what was found.
    """
    kind = family_kind(state)
    if kind is None:
        return None
    title = KIND_TITLES[kind]
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    depths, width = signature(kind, shapes)
    classes = head_classes(state)
    found = f"a {title} with {_blocks(depths)}, width {width} ({_evidence(kind, shapes)})"
    if classes is None:
        raise _fail(f"{found} but no classifier head (fc, head.fc or classifier.N weights)")
    siblings = [m for m in FAMILY_MODELS.values() if m.kind == kind]
    shortlist = [m for m in siblings if (m.depths, m.width) == (depths, width)]
    if not shortlist:
        sizes = ", ".join(f"{m.name} {_join(m.depths)}/{m.width}" for m in siblings[:8])
        raise _fail(f"{found}, which matches no registered size (blocks/width: {sizes}"
                    f"{', ...' if len(siblings) > 8 else ''})")
    if any(m.source == "timm" for m in shortlist) and importlib.util.find_spec("timm") is None:
        if len(shortlist) == 1:
            only = shortlist[0]
            reason = (f"keys of a {title}: {_blocks(depths)}, width {width}, "
                      f"{_evidence(kind, shapes)}, {classes} classes: {only.name} (keys not compared "
                      "one by one: timm is not installed)")
            return Inference(only.name, classes, reason)
        raise ArchitectureError(
            f"cannot infer the architecture: {found} could be {', '.join(m.name for m in shortlist)}, "
            f'and telling them apart needs timm: pip install "resdyn[timm]"'
        )
    matches: list[FamilyModel] = []
    nearest: tuple[int, str] | None = None
    for candidate in shortlist:
        built = _meta_shapes(candidate.name, classes)
        if _equal(shapes, built):
            matches.append(candidate)
            continue
        count, text = _differences(shapes, built)
        if nearest is None or count < nearest[0]:
            nearest = (count, f"{candidate.name}: {text}")
    if len(matches) > 1:
        raise _fail(f"{found}, which fits {' and '.join(m.name for m in matches)} alike, key for key "
                    "(they differ only in layers without weights)")
    if not matches:
        raise _fail(f"{found}, whose keys and shapes differ from every registered model of that size "
                    f"(nearest {nearest[1] if nearest else 'none'})")
    name = matches[0].name
    counted = sum(1 for k in shapes if not k.endswith(_OPTIONAL))
    reason = (f"keys of a {title}: {_blocks(depths)}, width {width} "
              f"({_evidence(kind, shapes)}), {classes}-class head; all {counted} keys and shapes "
              f"equal those of {matches[0].source}'s {matches[0].upstream}")
    return Inference(name, classes, reason)
