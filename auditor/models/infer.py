"""Infer a registered architecture from state-dict keys and shapes.

The inference is explained: it returns the name *and* the evidence, which the
report prints ("found layer1..layer3 with 3 blocks each, 16 stem channels ...").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ArchitectureError, Remedy
from .catalog import CIFAR_DEPTHS, TIMM_CONFIGS, TORCHVISION_CONFIGS

__all__ = ["Inference", "infer_architecture"]

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


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
    keys = list(state)
    stages = _blocks_per_stage(keys)
    has_bn = "bn1.weight" in state or "bn1.running_mean" in state
    variant = "" if has_bn else "_nobn"
    if not stages:
        sample = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        raise _fail(f"no residual stages 'layerN.M.*' among {len(keys)} keys ({sample})")
    layout = "x".join(str(n) for n in stages.values())
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


