"""Hugging Face transformers ResNets, read without transformers.

``ResNetForImageClassification.save_pretrained(folder)`` writes
``model.safetensors`` (keys ``resnet.embedder.embedder.convolution.weight``,
``resnet.encoder.stages.S.layers.B.layer.I.convolution.weight``,
``resnet.encoder.stages.S.layers.B.shortcut.convolution.weight``,
``classifier.1.weight``, ...) beside ``config.json`` (``depths``,
``hidden_sizes``, ``layer_type``, ``downsample_in_first_stage``,
``downsample_in_bottleneck``, ``id2label``), and an image processor may add
``preprocessor_config.json``. The model is the torchvision ResNet with other
names: the stem convolution, stage ``S`` block ``B`` convolution ``I`` is
``layer{S+1}.{B}.conv{I+1}``, the shortcut ``layer{S+1}.{B}.downsample.0/1``,
the head ``fc``. The keys are renamed one to one (the tensors are the same
objects), so every number resdyn computes is that of the same weights in
torchvision layout.

Configurations torchvision cannot express (stride in the first 1x1 of a
bottleneck, a down-sampling first stage, other widths or activations) are
refused with the field that differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, Remedy
from .catalog import TORCHVISION_CONFIGS

__all__ = ["HFResNet", "is_hf_resnet_config", "read_hf_resnet", "hf_to_torchvision"]

_STEM = "resnet.embedder.embedder."
_STAGE_KEY = re.compile(
    r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|(shortcut))\.(convolution|normalization)\.(.+)$"
)
_WIDTHS = {"basic": [64, 128, 256, 512], "bottleneck": [256, 512, 1024, 2048]}


@dataclass(frozen=True)
class HFResNet:
    """A Hugging Face ResNet mapped onto torchvision names.

    Attributes
    ----------
    arch : str
        The torchvision name with the same architecture (``resnet50``).
    num_classes : int
    state_dict : dict of str to Tensor
        torchvision keys.
    preprocessing : dict or None
        ``{"size", "resize", "mean", "std"}`` from ``preprocessor_config.json``.
    reason : str
        What ``config.json`` says, for the report.
    files : tuple of str
        The configuration files read.
    """

    arch: str
    num_classes: int
    state_dict: dict[str, torch.Tensor]
    preprocessing: dict[str, Any] | None
    reason: str
    files: tuple[str, ...]


def is_hf_resnet_config(config: dict[str, Any]) -> bool:
    """True for a transformers ``ResNetConfig`` (``model_type: resnet``)."""
    return config.get("model_type") == "resnet"


def _rename(key: str) -> str | None:
    """The torchvision name of one Hugging Face key, or None when it is not part of the model."""
    if key.startswith(_STEM):
        rest = key[len(_STEM):]
        part, _, leaf = rest.partition(".")
        return {"convolution": "conv1", "normalization": "bn1"}.get(part, "?") + "." + leaf
    if key.startswith("classifier.1."):
        return "fc." + key[len("classifier.1."):]
    match = _STAGE_KEY.match(key)
    if match is None:
        return None
    stage, block, index, shortcut, kind, leaf = match.groups()
    prefix = f"layer{int(stage) + 1}.{block}."
    if shortcut:
        return prefix + ("downsample.0." if kind == "convolution" else "downsample.1.") + leaf
    number = int(index) + 1
    return prefix + (f"conv{number}." if kind == "convolution" else f"bn{number}.") + leaf


def hf_to_torchvision(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Rename a ``ResNetForImageClassification`` state dict to torchvision keys.

    Raises
    ------
    CheckpointError
        A key that belongs to no ResNet layer (the weights are of another model).
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _rename(key)
        if name is None or name.startswith("?"):
            raise CheckpointError(
                f"{path}: key {key!r} is not part of a Hugging Face ResNetForImageClassification",
                hint="config.json says model_type 'resnet'; the weights are of another model",
            )
        renamed[name] = tensor
    return renamed


def load_json(path: Path) -> Any:
    """The JSON value in ``path`` (a config file beside a checkpoint)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise CheckpointError(f"{path}: not a readable JSON file (nested too deeply)") from None


def _read_json(path: Path) -> dict[str, Any]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _arch_from_config(config: dict[str, Any], where: Path) -> tuple[str, str]:
    """The torchvision name for a ResNetConfig, or a refusal naming the field."""
    def refuse(field: str, value: Any, want: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: {field} = {value!r}; resdyn reads Hugging Face ResNets that are torchvision ResNets ({want})",
            hint="convert the model to torchvision layout and pass {remedy}",
            remedy=Remedy("arch", "path/to/model.py:factory"),
        )

    layer_type = config.get("layer_type", "bottleneck")
    if layer_type not in _WIDTHS:
        raise refuse("layer_type", layer_type, "basic or bottleneck")
    fixed = {"num_channels": 3, "embedding_size": 64, "hidden_act": "relu",
             "downsample_in_first_stage": False, "downsample_in_bottleneck": False}
    for field, want in fixed.items():
        if config.get(field, want) != want:
            raise refuse(field, config[field], f"{field} {want}")
    widths = config.get("hidden_sizes", _WIDTHS["bottleneck"])
    if list(widths) != _WIDTHS[layer_type]:
        raise refuse("hidden_sizes", widths, f"{_WIDTHS[layer_type]} for {layer_type} layers")
    depths = list(config.get("depths", [3, 4, 6, 3]))
    for name, (kind, layers, extra) in TORCHVISION_CONFIGS.items():
        if kind == layer_type and layers == depths and not extra:
            reason = (f"from {where.name} (Hugging Face transformers ResNet: {layer_type} layers, "
                      f"depths {','.join(map(str, depths))}), keys mapped to torchvision layout")
            return name, reason
    raise refuse("depths", depths, "the depths of resnet18/34/50/101/152")


def _num_labels(config: dict[str, Any]) -> int | None:
    if isinstance(config.get("num_labels"), int):
        return int(config["num_labels"])
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else None


def _check_weights(state: dict[str, torch.Tensor], config: dict[str, Any], arch: str, where: Path) -> None:
    """Compare the weights' depths, widths, block type and classes with what config.json says."""
    kind, depths, _ = TORCHVISION_CONFIGS[arch]
    found: dict[int, set[int]] = {}
    for key in state:
        match = re.match(r"^layer(\d+)\.(\d+)\.", key)
        if match:
            found.setdefault(int(match[1]), set()).add(int(match[2]))
    have = [len(found.get(stage, ())) for stage in range(1, max([4, *found]) + 1)]

    def disagree(what: str, said: Any, weights: Any) -> CheckpointError:
        return CheckpointError(
            f"{where}: config.json and the weights disagree: {what} {said} in config.json, {weights} in the weights",
            hint="config.json belongs to another checkpoint; save the model again with save_pretrained",
        )

    if have != depths:
        raise disagree("depths", depths, have)
    bottleneck = "layer1.0.conv3.weight" in state
    if bottleneck != (kind == "bottleneck"):
        raise disagree("layer_type", kind, "bottleneck" if bottleneck else "basic")
    last = state.get(f"layer4.{depths[3] - 1}.conv{3 if bottleneck else 2}.weight")
    width = _WIDTHS[kind][-1]
    if last is not None and last.shape[0] != width:
        raise disagree("hidden_sizes[-1]", width, int(last.shape[0]))
    labels = _num_labels(config)
    head = state.get("fc.weight")
    if head is None:
        raise CheckpointError(
            f"{where}: no classifier weights (classifier.1.weight): a ResNetModel without its head",
            hint="save a ResNetForImageClassification (resdyn audits the classifier too)",
        )
    if labels is not None and head.shape[0] != labels:
        raise disagree("num_labels", labels, int(head.shape[0]))


def _size_of(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("shortest_edge"), int):
            return int(value["shortest_edge"])
        height, width = value.get("height"), value.get("width")
        if isinstance(height, int) and height == width:
            return height
    return None


def hf_preprocessing(config: dict[str, Any]) -> dict[str, Any] | None:
    """``{"size", "resize", "mean", "std"}`` from a ``preprocessor_config.json``.

    ``size`` (an int, ``shortest_edge`` or a square ``height``/``width``) with
    ``crop_size`` gives resize = size, crop = crop_size; with ``crop_pct``
    (ConvNext / ResNet processors) resize = int(size / crop_pct), crop = size;
    otherwise the image is resized to ``size`` and center-cropped to it.
    """
    size = _size_of(config.get("size"))
    out: dict[str, Any] = {}
    if size is not None and config.get("do_resize", True):
        crop = _size_of(config.get("crop_size")) if config.get("do_center_crop", True) else None
        if crop is not None:
            out.update(size=crop, resize=max(size, crop))
        elif isinstance(config.get("crop_pct"), (int, float)) and 0 < config["crop_pct"] <= 1 and size < 384:
            out.update(size=size, resize=int(size / config["crop_pct"]))
        else:
            out.update(size=size, resize=size)
    mean, std = config.get("image_mean"), config.get("image_std")
    if config.get("do_normalize", True) and isinstance(mean, list) and isinstance(std, list):
        out.update(mean=mean, std=std)  # checked (3 finite numbers, std > 0) with the other preprocessing
    return out or None


def read_hf_resnet(weights: Path, state: dict[str, torch.Tensor], config_path: Path) -> HFResNet:
    """Map ``state`` (from ``weights``) onto torchvision names using ``config_path``.

    Raises
    ------
    CheckpointError
        A configuration torchvision cannot express, or config and weights that disagree.
    """
    config = _read_json(config_path)
    arch, reason = _arch_from_config(config, config_path)
    renamed = hf_to_torchvision(state, weights)
    _check_weights(renamed, config, arch, config_path)
    files = [config_path.name]
    preprocessing = None
    processor = config_path.with_name("preprocessor_config.json")
    if processor.is_file():
        preprocessing = hf_preprocessing(_read_json(processor))
        files.append(processor.name)
    return HFResNet(arch, int(renamed["fc.weight"].shape[0]), renamed, preprocessing, reason, tuple(files))
