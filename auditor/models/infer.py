"""Infer a registered architecture from state-dict keys and shapes.

The inference is explained: it returns the name *and* the evidence, which the
report prints ("found layer1..layer3 with 3 blocks each, 16 stem channels ...").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ArchitectureError, Remedy
from .catalog import CIFAR_DEPTHS, PAPER_DEPTHS, PAPER_FORMS, TIMM_CONFIGS, TORCHVISION_CONFIGS

__all__ = ["Inference", "infer_architecture"]

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")
_BLOCK_SHORTCUT = re.compile(r"^layer\d+\.\d+\.shortcut\.")
_BLOCK_NORM = re.compile(r"^layer\d+\.\d+\.bn\d+\.")


@dataclass(frozen=True)
class Inference:
    """An inferred architecture and why."""

    arch: str
    num_classes: int
    reason: str


def _blocks_per_stage(keys: list[str]) -> dict[int, int]:
    counts: dict[int, set[int]] = {}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            counts.setdefault(int(match[1]), set()).add(int(match[2]))
    return {stage: len(blocks) for stage, blocks in sorted(counts.items())}


def _fail(found: str) -> ArchitectureError:
    return ArchitectureError(
        f"cannot infer the architecture: {found}",
        hint="pass {remedy}: a name from 'resdyn archs' or path/to/model.py:factory", remedy=Remedy("arch", None),
    )


def _timm_match(state: dict[str, torch.Tensor], counts: list[int], bottleneck: bool, layout: str) -> Inference | None:
    """timm's deep-stem / average-pool ResNets and resnet26 (names torchvision does not have)."""
    deep = "conv1.0.weight" in state
    avg_down = any(re.match(r"^layer\d+\.0\.downsample\.2\.", k) for k in state)
    for name, (kind, layers, deep_and_avg) in TIMM_CONFIGS.items():
        if (kind == "bottleneck") == bottleneck and layers == counts and deep_and_avg == deep == avg_down:
            if not deep and counts != [2, 2, 2, 2]:
                continue
            reason = (
                f"keys layer1..layer4 with {layout} {kind} blocks, fc head"
                + (", deep stem conv1.0/3/6 and average-pool shortcuts downsample.1/2 (timm ResNet-D)"
                   if deep else " (timm's resnet26)")
            )
            return Inference(name, state["fc.weight"].shape[0], reason)
    if deep or avg_down:
        raise _fail(f"a timm-style ResNet (deep stem {deep}, average-pool shortcuts {avg_down}) with {layout} "
                    f"{'bottleneck' if bottleneck else 'basic'} blocks that matches no registered name")
    return None


def _has(state: dict[str, torch.Tensor], module: str) -> bool:
    """Whether ``state`` holds a BatchNorm (or conv) ``module`` (affine or not)."""
    return f"{module}.weight" in state or f"{module}.running_mean" in state


def _norm_reads_conv_input(state: dict[str, torch.Tensor]) -> bool:
    """True when ``layer2.0.bn1`` has the channels of ``conv1``'s input, not its output (pre-activation).

    ``layer2.0`` is the first block whose ``conv1`` changes the channel count in
    every registered pre-activation layout (64 -> 128 basic, 256 -> 128 bottleneck),
    so the two orders are told apart by shape.
    """
    bn = state.get("layer2.0.bn1.weight", state.get("layer2.0.bn1.running_mean"))
    conv = state.get("layer2.0.conv1.weight")
    if bn is None or conv is None or conv.ndim != 4 or conv.shape[0] == conv.shape[1]:
        return False
    return bool(bn.shape[0] == conv.shape[1])


def _preactivation_depth(counts: list[int], bottleneck: bool) -> int | None:
    """The depth of torchvision's resnet18/34/50/101 with these blocks per stage, if one."""
    for depth in PAPER_DEPTHS:
        kind, layers, _ = TORCHVISION_CONFIGS[f"resnet{depth}"]
        if (kind == "bottleneck") == bottleneck and layers == counts:
            return depth
    return None


def _preactivation_match(state: dict[str, torch.Tensor], stages: dict[int, int], layout: str) -> Inference | None:
    """The CIFAR pre-activation ResNets (``linear`` head) and the paper's Figure 1 modules (``fc`` head).

    ``None`` when the keys are none of these (a torchvision, timm or CIFAR ResNet
    is decided by the caller as before); an error when they have the marks of one
    (``shortcut`` keys, or BatchNorm before the convolution) but fit no registered name.
    """
    if list(stages) != [1, 2, 3, 4]:
        return None
    keys = list(state)
    shortcut = any(_BLOCK_SHORTCUT.match(k) for k in keys)
    block_norm = any(_BLOCK_NORM.match(k) for k in keys)
    pre = block_norm and _norm_reads_conv_input(state)
    final_norm = _has(state, "bn")
    bottleneck = "layer1.0.conv3.weight" in state
    kind = "bottleneck" if bottleneck else "basic"
    depth = _preactivation_depth(list(stages.values()), bottleneck)
    blocks = f"layer1..layer4 with {layout} {kind} blocks"
    order = "BatchNorm bnK before convK (layer2.0.bn1 has conv1's {} input channels)"
    if "linear.weight" in state and "fc.weight" not in state:
        if not pre:
            return None
        found = f"a CIFAR pre-activation ResNet ({blocks}, linear head)"
        stem = state.get("conv1.weight")
        if depth is None:
            raise _fail(f"{found} of no registered depth (preactresnet18/34: basic 2x2x2x2, 3x4x6x3; "
                        "50/101: bottleneck 3x4x6x3, 3x4x23x3)")
        if stem is None or tuple(stem.shape) != (64, 3, 3, 3):
            shape = "absent" if stem is None else "x".join(map(str, stem.shape))
            raise _fail(f"{found} whose stem conv1.weight is {shape} (64x3x3x3 expected)")
        if not shortcut:
            raise _fail(f"{found} without shortcut keys (a plain network); the registered preactresnetN have "
                        "projection shortcuts shortcut.0")
        if not final_norm:
            raise _fail(f"{found} without a final BatchNorm 'bn' before the pooling (kuangliu's original "
                        "PreActResNet); the registered preactresnetN have one")
        reason = (f"keys {blocks} (depth {depth}), linear head, 3x3 stem conv1 of 64 channels, "
                  + order.format(int(state["layer2.0.conv1.weight"].shape[1]))
                  + ", projection shortcuts shortcut.0 on the pre-activated input, final BatchNorm 'bn': "
                  "CIFAR pre-activation ResNet")
        return Inference(f"preactresnet{depth}", state["linear.weight"].shape[0], reason)
    if "fc.weight" not in state or not (shortcut or pre):
        return None
    found = f"a pre-activation or 'shortcut'-keyed ResNet ({blocks}, fc head)"
    if any(".downsample." in k for k in keys):
        raise _fail(f"{found} with both 'shortcut' and 'downsample' keys")
    if depth is None:
        raise _fail(f"{found} of no registered depth (paper_*18/34: basic 2x2x2x2, 3x4x6x3; "
                    "50/101: bottleneck 3x4x6x3, 3x4x23x3)")
    stem = state.get("conv1.weight")
    if stem is None or tuple(stem.shape) != (64, 3, 7, 7):
        shape = "absent" if stem is None else "x".join(map(str, stem.shape))
        raise _fail(f"{found} whose stem conv1.weight is {shape} (64x3x7x7 expected)")
    if shortcut and not block_norm:
        form = "res"
        if _has(state, "bn1") or final_norm:
            raise _fail(f"{found} without BatchNorm in the blocks but with one in the stem (bn1) or at the "
                        "end (bn); paper_resN has none")
        if "layer1.0.conv1.bias" not in state:
            raise _fail(f"{found} without BatchNorm or convolution biases; paper_resN's convolutions have biases")
        evidence = ("no BatchNorm (blocks, stem or final), biased convolutions, projection shortcuts shortcut.0 "
                    "where the shape changes")
    elif pre:
        form = "resbn" if shortcut else "plain"
        if not final_norm:
            raise _fail(f"{found} with BatchNorm before the convolutions but no final BatchNorm 'bn'; "
                        f"paper_{form}N has one")
        evidence = (order.format(int(state["layer2.0.conv1.weight"].shape[1])) + ", final BatchNorm 'bn', "
                    + ("projection shortcuts shortcut.0 on the pre-activated input" if shortcut
                       else "no shortcut keys at all (plain)"))
    else:
        raise _fail(f"{found} whose blocks have 'shortcut' keys and BatchNorm after the convolutions "
                    "(torchvision names the projection 'downsample')")
    reason = (f"keys {blocks} (depth {depth}), fc head, 7x7 stem conv1, {evidence}: "
              f"the paper's Figure 1({PAPER_FORMS[form]}) module")
    return Inference(f"paper_{form}{depth}", state["fc.weight"].shape[0], reason)


def infer_architecture(state: dict[str, torch.Tensor]) -> Inference:
    """Name the registered architecture whose keys and shapes fit ``state``.

    Parameters
    ----------
    state : dict of str to Tensor
        A state dict with wrapper prefixes removed.

    Raises
    ------
    ArchitectureError
        When the keys fit no registered family; the message says what was found.
    """
    from .infer_families import infer_family  # RegNet, MobileNet, ...: a few key look-ups, None for ResNets

    found = infer_family(state)
    if found is not None:
        return found
    keys = list(state)
    stages = _blocks_per_stage(keys)
    has_bn = "bn1.weight" in state or "bn1.running_mean" in state
    variant = "" if has_bn else "_nobn"
    if not stages:
        sample = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise _fail(f"no residual stages 'layerN.M.*' among {len(keys)} keys ({sample})")
    layout = "x".join(str(n) for n in stages.values())
    preactivation = _preactivation_match(state, stages, layout)
    if preactivation is not None:
        return preactivation
    if list(stages) == [1, 2, 3, 4] and "fc.weight" in state:
        bottleneck = "layer1.0.conv3.weight" in state
        counts = list(stages.values())
        timm = _timm_match(state, counts, bottleneck, layout)
        if timm is not None:
            return timm
        width = state["layer1.0.conv1.weight"].shape[0]
        conv2 = state["layer1.0.conv2.weight"]
        groups = conv2.shape[0] // conv2.shape[1]
        projection = any(".downsample." in k for k in keys)
        for name, (kind, layers, extra) in TORCHVISION_CONFIGS.items():
            want_width = (64 * extra.get("width_per_group", 64) // 64) * extra.get("groups", 1)
            if (
                (kind == "bottleneck") == bottleneck
                and layers == counts
                and groups == extra.get("groups", 1)
                and width == (want_width if bottleneck else 64)
            ):
                plain = "" if projection else "_plain"
                reason = (
                    f"keys layer1..layer4 with {layout} "
                    f"{'bottleneck' if bottleneck else 'basic'} blocks, fc head, "
                    f"{width} channels in layer1.0.conv1, groups={groups}, "
                    f"{'BatchNorm' if has_bn else 'no BatchNorm'}, "
                    f"{'projection shortcuts' if projection else 'no shortcut weights (plain)'}"
                )
                return Inference(name + plain + variant, state["fc.weight"].shape[0], reason)
        raise _fail(f"a torchvision-style ResNet with {layout} blocks that matches no registered depth")
    if list(stages) == [1, 2, 3] and "linear.weight" in state and "conv1.weight" in state:
        counts = set(stages.values())
        if len(counts) != 1:
            raise _fail(f"a CIFAR-style ResNet with unequal stages ({layout})")
        n = counts.pop()
        depth = 6 * n + 2
        if depth not in CIFAR_DEPTHS:
            raise _fail(f"a CIFAR-style ResNet of depth {depth}, which is not registered")
        width = state["conv1.weight"].shape[0]
        if width != 16:
            raise _fail(f"a CIFAR-style ResNet-{depth} with {width} stem channels (16 expected)")
        option_b = "layer2.0.shortcut.0.weight" in state
        shortcut = "option B (projection)" if option_b else "option A (parameter-free; a plain network has the same keys, pass --arch resnetN_plain for one)"
        reason = (
            f"keys layer1..layer3 with {n} basic blocks each (depth 6*{n}+2 = {depth}), "
            f"linear head, {width} stem channels, "
            f"{'BatchNorm' if has_bn else 'no BatchNorm'}, shortcut {shortcut}"
        )
        name = f"resnet{depth}{'_optb' if option_b else ''}{variant}"
        return Inference(name, state["linear.weight"].shape[0], reason)
    raise _fail(
        f"stages {', '.join(f'layer{s}' for s in stages)} with {layout} blocks and "
        f"head keys {', '.join(k for k in keys if not k.startswith('layer'))[:120]}"
    )


