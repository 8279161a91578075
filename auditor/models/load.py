"""Load a checkpoint in resdyn's layout and turn it into an ``nn.Module`` in eval mode, with strict key matching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ArchitectureError, CheckpointError, Remedy
from ..io.checkpoint import Checkpoint, read_checkpoint
from .infer import infer_architecture
from .layouts import apply_layout, weights_in_folder
from .registry import ArchSpec, build_model, is_factory_reference

__all__ = ["LoadedModel", "load_checkpoint", "load_model"]

# Buffers that older checkpoints omit and eval mode never reads.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


@dataclass(frozen=True)
class LoadedModel:
    """A model with its weights and how its architecture was determined.

    Attributes
    ----------
    model : nn.Module
        In eval mode, on the CPU, float32.
    arch : str
        Registry name or ``file.py:factory``.
    arch_source : str
        ``"--arch"``, ``"metadata"``, ``"config"`` (a ``config.json`` beside the
        weights) or ``"inferred"``.
    arch_reason : str
        Evidence for the choice (for inferred architectures).
    spec : ArchSpec
    num_classes : int
    parameters : int
        Number of trainable parameters.
    """

    model: nn.Module
    arch: str
    arch_source: str
    arch_reason: str
    spec: ArchSpec
    num_classes: int
    parameters: int


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint without executing code, in resdyn's layout.

    Parameters
    ----------
    path : str or Path
        A checkpoint file (:func:`auditor.io.checkpoint.read_checkpoint` reads
        it), or a folder written by Hugging Face ``save_pretrained`` or timm,
        which stands for its ``model.safetensors``. A ``config.json`` beside
        the weights is read (:mod:`auditor.models.layouts`).

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        Missing, unreadable, truncated, unsafe, not a state dict, or a
        ``config.json`` that disagrees with the weights.
    """
    path = Path(path)
    if path.is_dir():
        path = weights_in_folder(path)  # a save_pretrained / timm folder
    return apply_layout(read_checkpoint(path))


def _num_classes(checkpoint: Checkpoint) -> int | None:
    value = checkpoint.metadata.get("num_classes")
    if value is not None:
        try:
            return int(value)
        except ValueError:
            raise CheckpointError(
                f"{checkpoint.path}: metadata num_classes={value!r} is not an integer"
            ) from None
    for key in ("fc.weight", "linear.weight"):
        if key in checkpoint.state_dict:
            return int(checkpoint.state_dict[key].shape[0])
    from .infer_families import head_classes  # head.fc (timm), classifier.N (MobileNet, EfficientNet, ConvNeXt)

    return head_classes(checkpoint.state_dict)


def _list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_weights(model: nn.Module, checkpoint: Checkpoint, arch: str) -> None:
    expected = model.state_dict()
    state = {k: v for k, v in checkpoint.state_dict.items()}
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        raise CheckpointError(
            f"{checkpoint.path}: weights do not match architecture {arch!r}; " + "; ".join(parts),
            hint="pass the right {remedy} (a _nobn, _plain or _optb variant?) or check the checkpoint",
            remedy=Remedy("arch", None),
        )
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{checkpoint.path}: weights do not match architecture {arch!r}; "
            f"shape mismatches (checkpoint vs model): {_list(mismatched, 4)}",
            hint="pass the right {remedy} (depth, width, number of classes)", remedy=Remedy("arch", None),
        )
    for key in list(state):
        if expected[key].is_floating_point():
            state[key] = state[key].to(expected[key].dtype)
    model.load_state_dict(state, strict=False)


def load_model(checkpoint: Checkpoint, arch: str | None = None) -> LoadedModel:
    """Build the architecture of ``checkpoint`` and load its weights strictly.

    Parameters
    ----------
    checkpoint : Checkpoint
    arch : str, optional
        Registry name or ``path/to/file.py:factory``. Without it the
        checkpoint's ``arch`` metadata is used, else the keys are inspected.

    Raises
    ------
    ArchitectureError, CheckpointError
    """
    num_classes = _num_classes(checkpoint)
    if arch:
        source, reason = "--arch", "given on the command line"
    elif checkpoint.metadata.get("arch"):
        arch = checkpoint.metadata["arch"]
        source, reason = "metadata", "from the checkpoint's 'arch' metadata"
        if checkpoint.arch_reason:  # config.json beside the weights (Hugging Face, timm)
            source, reason = "config", checkpoint.arch_reason
        if is_factory_reference(arch):
            raise ArchitectureError(
                f"{checkpoint.path}: metadata names a model file ({arch!r}); "
                "resdyn does not import code named by a checkpoint",
                hint="pass {remedy} explicitly", remedy=Remedy("arch", "path/to/model.py:factory"),
            )
    else:
        inference = infer_architecture(checkpoint.state_dict)
        arch, source, reason = inference.arch, "inferred", inference.reason
        num_classes = inference.num_classes
    model, spec = build_model(arch, num_classes)
    _load_weights(model, checkpoint, arch)
    model = model.float().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classes = num_classes or (heads[-1].out_features if heads else 0)
    count = sum(p.numel() for p in model.parameters())
    return LoadedModel(model, arch, source, reason, spec, int(classes), int(count))


