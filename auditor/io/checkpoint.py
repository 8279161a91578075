"""Read checkpoint files safely: safetensors, or torch files with ``weights_only=True``.

A pickle that wants to run code is refused by torch's restricted unpickler and
never executed. This module reads one file and knows nothing of model layouts:
a saved-model folder and the ``config.json`` beside the weights are
:func:`auditor.models.load.load_checkpoint`'s business (:mod:`auditor.models.layouts`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .safe_output import note_input

__all__ = ["Checkpoint", "read_checkpoint", "file_sha256"]

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes
    ----------
    path : Path
        The file read.
    sha256 : str
        Hex digest of the file's bytes.
    format : str
        ``"safetensors"`` or ``"torch"``.
    state_dict : dict of str to Tensor
        Weights with wrapper prefixes (``module.``) removed.
    metadata : dict of str to str
        safetensors metadata, or scalar entries found beside a torch state dict.
    notes : list of str
        What was unwrapped or stripped, for the report.
    arch_reason : str or None
        Set when the architecture in ``metadata`` comes from a ``config.json``
        beside the weights (Hugging Face, timm): which file and what it says.
    """

    path: Path
    sha256: str
    format: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    arch_reason: str | None = None

    @property
    def converted_from(self) -> str | None:
        """The weights' stored floating dtype(s) when not float32 (the model runs in float32)."""
        return _converted_dtypes(self.state_dict)

    def meta_json(self, key: str) -> Any:
        """A metadata value decoded as JSON (``None`` when absent or not JSON)."""
        raw = self.metadata.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _sniff(path: Path) -> str | None:
    """Guess the format from the first bytes: safetensors, zip (torch) or pickle."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    return None


_MAGIC = ((b"GGUF", "a GGUF file (llama.cpp)"), (b"\x89HDF", "an HDF5 file"), (b"\x93NUMPY", "a NumPy array file"),
          (b"\x08\x01\x12", "possibly an ONNX model"), (b"ggml", "a GGML file"), (b"\x1f\x8b", "a gzip file"))


def _what_it_is(path: Path) -> str:
    """What the first bytes of a file that is no checkpoint say it is (a known format, else its bytes)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not head:
        return "an empty file"
    found = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    return found or f"unknown format (first bytes {head.hex(' ')})"


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError and friends: header or data are broken
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({first})",
            hint="the file may be truncated or corrupted; re-download or re-export it",
        ) from exc
    return tensors, metadata


def _load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).replace("\n", " ")
        if "weights_only" in detail or "Unsupported global" in detail or "GLOBAL" in detail:
            raise CheckpointError(
                f"{path}: refused, the pickle wants to run code or build objects that plain "
                "weights do not need",
                hint="resdyn never executes pickles; export the weights with "
                "safetensors or torch.save(model.state_dict())",
            ) from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({detail[:160]})") from exc
    except Exception as exc:  # truncated zip, garbage bytes, broken pickle opcodes
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({first[:160]})",
            hint="the file may be truncated or corrupted",
        ) from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: Any, path: Path, notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Find the state dict inside a torch checkpoint; keep scalar siblings as metadata."""
    metadata: dict[str, str] = {}
    depth = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, dict) or depth > 3:
            kind = type(obj).__name__
            raise CheckpointError(
                f"{path}: holds a {kind}, not a state dict of tensors",
                hint="save model.state_dict() (or a dict with a 'state_dict' entry)",
            )
        for key, value in obj.items():
            if isinstance(value, (int, float, str, bool)):
                metadata[str(key)] = str(value)
        nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors and all(isinstance(k, str) for k in tensors):
                notes.append(f"ignored {len(obj) - len(tensors)} non-tensor entries")
                obj = tensors
                break
            raise CheckpointError(
                f"{path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))})",
                hint="save model.state_dict() (or a dict with a 'state_dict' entry)",
            )
        notes.append(f"weights taken from the nested '{nested}' entry")
        obj = obj[nested]
        depth += 1
    return dict(obj), metadata


def _strip_prefixes(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                notes.append(f"stripped the '{prefix}' prefix")
                changed = True
    return state


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint file without executing code.

    Parameters
    ----------
    path : str or Path
        ``.safetensors``, or ``.pt`` / ``.pth`` / ``.th`` / ``.bin`` / ``.ckpt``
        (read with ``torch.load(weights_only=True)``). Other names are
        recognised by their first bytes.

    Returns
    -------
    Checkpoint
        The file's tensors and metadata as stored (wrapper prefixes removed);
        no ``config.json`` beside it is read (:func:`auditor.models.load.load_checkpoint` does).

    Raises
    ------
    CheckpointError
        Missing, not a regular file, unreadable, truncated, unsafe, or not a state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file", hint="check the checkpoint path")
    note_input(path)  # no output of this run may replace it (-o, --save-spectra, plots)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file, not a checkpoint file")
    suffix = path.suffix.lower()
    fmt = "safetensors" if suffix == ".safetensors" else "torch" if suffix in TORCH_SUFFIXES else None
    fmt = fmt or _sniff(path)
    if fmt is None:
        raise CheckpointError(
            f"{path}: not a checkpoint ({_what_it_is(path)}: neither safetensors nor a torch file)",
            hint="resdyn reads .safetensors, .pt, .pth, .th, .bin",
        )
    if fmt == "torch" and _sniff(path) != "torch":  # a torch file is a zip or a pickle: say what it is instead
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({_what_it_is(path)}, neither a zip nor a pickle)",
            hint="resdyn reads .safetensors, .pt, .pth, .th, .bin",
        )
    notes: list[str] = []
    if fmt == "safetensors":
        state, metadata = _load_safetensors(path)
    else:
        state, metadata = _unwrap(_load_torch(path), path, notes)
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    state = _strip_prefixes(state, notes)
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path}: tensor '{key}' holds NaN or inf values",
                hint="the training run diverged or the file is corrupted",
            )
        if key.endswith("running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
            raise CheckpointError(  # a variance is never negative: BatchNorm would take a square root of it
                f"{path}: tensor '{key}' holds negative variances ({int((tensor < 0).sum())} of {tensor.numel()})",
                hint="the file is corrupted or was edited; export the weights again",
            )
    converted = _converted_dtypes(state)
    if converted:
        notes.append(f"weights stored as {converted} were converted to float32 for the analysis "
                     "(the report describes the float32 copy)")
    return Checkpoint(path, file_sha256(path), fmt, state, metadata, tuple(notes))


def _converted_dtypes(state: dict[str, torch.Tensor]) -> str | None:
    """The stored dtypes of weights other than float32 (``"float16"``, ``"bfloat16, float64"``), or None.

    Integer weights and biases (a quantized export: ``int8``) are named as
    ``"int8 (quantized: raw integers, scales not applied)"``: the model
    copies them into float32 as they are.
    """
    names = {str(t.dtype).removeprefix("torch.") for t in state.values()
             if t.is_floating_point() and t.dtype != torch.float32}
    quantized = {str(t.dtype).removeprefix("torch.") for key, t in state.items()
                 if (t.is_quantized or not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool))
                 and key.rsplit(".", 1)[-1] in ("weight", "bias")}
    parts = sorted(names) + [f"{name} (quantized: raw integers, scales not applied)" for name in sorted(quantized)]
    return ", ".join(parts) or None
