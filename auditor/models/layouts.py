"""Checkpoints saved by other libraries: a ``config.json`` beside the weights says which.

- Hugging Face transformers (``model_type: resnet``): the keys are renamed to
  torchvision's (:mod:`.huggingface`), the architecture and the preprocessing
  come from ``config.json`` and ``preprocessor_config.json``;
- timm (``architecture`` and ``pretrained_cfg``): the keys are timm's own,
  which the registered models use (:mod:`.timm_resnet`); the architecture and
  the preprocessing come from ``config.json``.

What is taken from these files is written into the checkpoint's metadata
(``arch``, ``num_classes``, ``preprocessing``, ``layout``, ``layout_files``),
so the rest of resdyn reads it as it reads safetensors metadata, and the
report shows where it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .catalog import TIMM_CONFIGS, TORCHVISION_CONFIGS

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint

__all__ = ["weights_in_folder", "apply_layout"]

_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt", "model.pt", "model.pth")


def weights_in_folder(folder: Path) -> Path:
    """The weights file of a saved-model folder (``model.safetensors`` first).

    Raises
    ------
    CheckpointError
        A folder without one of the known weight file names.
    """
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder}: is a directory without model.safetensors or pytorch_model.bin",
        hint="pass the checkpoint file, or a folder written by save_pretrained / timm",
    )


def _config(path: Path) -> dict[str, Any] | None:
    candidate = path.with_name("config.json")
    if not candidate.is_file():
        return None
    from .huggingface import load_json

    data = load_json(candidate)
    return data if isinstance(data, dict) else None


def timm_preprocessing(pretrained: dict[str, Any]) -> dict[str, Any] | None:
    """``{"size", "resize", "mean", "std"}`` from timm's ``pretrained_cfg``.

    timm's eval transform resizes the shorter side to ``floor(size / crop_pct)``
    and center-crops ``size`` (``input_size`` is ``[3, H, W]``, square here).
    """
    out: dict[str, Any] = {}
    shape = pretrained.get("input_size")
    if isinstance(shape, list) and len(shape) == 3 and shape[1] == shape[2] and isinstance(shape[1], int):
        size = int(shape[1])
        crop = pretrained.get("crop_pct", 0.875)
        resize = int(math.floor(size / crop)) if isinstance(crop, (int, float)) and 0 < crop <= 1 else size
        out.update(size=size, resize=max(size, resize))
    mean, std = pretrained.get("mean"), pretrained.get("std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3:
        out.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
    return out or None


def _is_timm(config: dict[str, Any]) -> bool:
    return isinstance(config.get("architecture"), str) and "model_type" not in config


def _apply_timm(checkpoint: Checkpoint, config: dict[str, Any]) -> Checkpoint:
    arch = str(config["architecture"]).split(".")[0]
    metadata = dict(checkpoint.metadata)
    files = ["config.json"]
    if arch in TIMM_CONFIGS or arch in TORCHVISION_CONFIGS:
        metadata.setdefault("arch", arch)
    if isinstance(config.get("num_classes"), int):
        metadata.setdefault("num_classes", str(config["num_classes"]))
    pretrained = config.get("pretrained_cfg")
    preprocessing = timm_preprocessing(pretrained) if isinstance(pretrained, dict) else None
    if preprocessing and "preprocessing" not in metadata:
        metadata["preprocessing"] = json.dumps(preprocessing, sort_keys=True)
    metadata.update(layout="timm", layout_files=", ".join(files))
    reason = (f"from config.json (timm architecture {config['architecture']!r})"
              if metadata.get("arch") == arch else None)
    notes = (*checkpoint.notes, f"timm config.json read beside {checkpoint.path.name}"
             + ("" if metadata.get("arch") == arch else f" (architecture {arch!r} is not registered; inferred from keys)"))
    return replace(checkpoint, metadata=metadata, notes=notes, arch_reason=reason)


def _apply_huggingface(checkpoint: Checkpoint, config_path: Path) -> Checkpoint:
    from .huggingface import read_hf_resnet

    model = read_hf_resnet(checkpoint.path, checkpoint.state_dict, config_path)
    metadata = dict(checkpoint.metadata)
    metadata.update(arch=model.arch, num_classes=str(model.num_classes), layout="huggingface-transformers",
                    layout_files=", ".join(model.files))
    if model.preprocessing:
        metadata["preprocessing"] = json.dumps(model.preprocessing, sort_keys=True)
    notes = (*checkpoint.notes, f"Hugging Face transformers keys renamed to torchvision layout "
                                f"({len(model.state_dict)} tensors; {', '.join(model.files)} read)")
    return replace(checkpoint, state_dict=model.state_dict, metadata=metadata, notes=notes, arch_reason=model.reason)


def apply_layout(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` in resdyn's layout, using the ``config.json`` beside it when there is one.

    Without a ``config.json``, or with one of another kind, the checkpoint is returned unchanged.

    Raises
    ------
    CheckpointError
        A Hugging Face configuration torchvision cannot express, or config and weights that disagree.
    """
    from .huggingface import is_hf_resnet_config

    config = _config(checkpoint.path)
    if config is None:
        return checkpoint
    hf_keys = any(k.startswith(("resnet.embedder.", "resnet.encoder.")) for k in checkpoint.state_dict)
    if is_hf_resnet_config(config):
        if not hf_keys:
            raise CheckpointError(
                f"{checkpoint.path.with_name('config.json')}: config.json and the weights disagree: "
                "config.json describes a Hugging Face ResNet, the weights have no resnet.embedder / "
                "resnet.encoder keys",
                hint="config.json belongs to another checkpoint; move it away or save the model again",
            )
        return _apply_huggingface(checkpoint, checkpoint.path.with_name("config.json"))
    if _is_timm(config):
        return _apply_timm(checkpoint, config)
    return checkpoint
