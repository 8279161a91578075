"""Anatomy sections of the JSON report: ``layers``, ``blocks``, ``stages``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..models.anatomy import Anatomy, BlockInfo, ConvInfo, LayerInfo, StageSpec
from ..models.block_graph import RULES

if TYPE_CHECKING:
    from ..subject import Subject

__all__ = ["layer_entry", "linearization_entries", "block_entry", "anatomy_stage_entry", "anatomy_sections", "inspect_document"]


def layer_entry(layer: LayerInfo) -> dict[str, Any]:
    """One ``layers`` entry (shapes without the batch axis)."""
    return {
        "name": layer.name,
        "kind": layer.kind,
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel": list(layer.kernel),
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "groups": layer.groups,
        "bias": layer.bias,
        "input_shape": list(layer.input_shape),
        "output_shape": list(layer.output_shape),
    }


def _conv_entry(conv: ConvInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": conv.name,
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel": list(conv.kernel),
        "stride": list(conv.stride),
        "padding": list(conv.padding),
        "groups": conv.groups,
        "batchnorm": conv.bn,
        "input_shape": list(conv.input_shape),
    }
    if conv.dilation != (1, 1):
        entry["dilation"] = list(conv.dilation)
    if conv.linear:
        entry["per_position_linear"] = True
    if conv.pre or conv.post:
        entry["factors"] = {
            "input": [{"kind": f.kind, "path": f.path} for f in conv.pre],
            "output": [{"kind": f.kind, "path": f.path} for f in conv.post],
        }
    return entry


def linearization_entries(block: BlockInfo) -> list[dict[str, Any]]:
    """The block's ``linearization``: each rule applied, what it does, and where."""
    return [{"rule": rule, "does": RULES[rule], "modules": list(paths)} for rule, paths in block.linearization]


def block_entry(block: BlockInfo) -> dict[str, Any]:
    """One ``blocks`` entry of the anatomy."""
    entry: dict[str, Any] = {
        "name": block.name,
        "stage": block.stage,
        "shortcut": block.shortcut,
        "batchnorm": block.batchnorm,
        "input_shape": list(block.input_shape),
        "output_shape": list(block.output_shape),
        "convs": [_conv_entry(c) for c in block.convs],
        "linearization": linearization_entries(block),
    }
    if block.uncovered:
        entry["uncovered"] = list(block.uncovered)
    if block.shortcut_convs:
        entry["shortcut_convs"] = [_conv_entry(c) for c in block.shortcut_convs]
    if block.option_a is not None:
        entry["option_a"] = {
            "stride": block.option_a.stride,
            "pad_before": block.option_a.pad_before,
            "out_channels": block.option_a.out_channels,
        }
    return entry


def anatomy_stage_entry(stage: StageSpec) -> dict[str, Any]:
    """One ``stages`` entry of the anatomy."""
    return {"name": stage.name, "module_path": stage.location, "shape": list(stage.shape)}


def anatomy_sections(anatomy: Anatomy) -> dict[str, Any]:
    """``input_shape``, ``layers``, ``blocks``, ``stages`` (+ ``penultimate``)."""
    stages = [anatomy_stage_entry(s) for s in anatomy.stages]
    return {
        "input_shape": list(anatomy.input_shape),
        "layers": [layer_entry(layer) for layer in anatomy.layers],
        "blocks": [block_entry(b) for b in anatomy.blocks],
        "stages": stages,
        "penultimate": anatomy_stage_entry(anatomy.penultimate) if anatomy.penultimate else None,
        "notes": list(anatomy.notes),
    }


def inspect_document(subject: Subject) -> dict[str, Any]:
    """The ``inspect`` report: the header, where the input size came from, and the anatomy."""
    from .document import report_header

    return {
        **report_header("inspect", subject, input_shape=False),  # input_shape comes with the anatomy
        "input_size_source": subject.input_size_source,
        **anatomy_sections(subject.anatomy),
    }
