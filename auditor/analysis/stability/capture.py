"""Taps on module inputs and outputs, and the capture pass of the blocks' inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import InputError
from ...models.anatomy import Anatomy
from .chunks import concatenate, distances, kept, repeats, row_norms, row_slices, rows_per_chunk

__all__ = ["Taps", "capture", "capture_groups"]

# Elements of captured block inputs held at once; more blocks need more forward passes.
_CAPTURE_ELEMENTS = 1 << 26


class Taps:
    """Hooks on module inputs / outputs.

    In *reference* mode they keep a copy of every tapped tensor; in *compare* mode
    they record, per row, ``||t - ref[index]||`` and ``||ref[index]||``. Only the
    first call of a module per forward pass counts. Copies guard against in-place
    operations after the tap.
    """

    def __init__(self, modules: Mapping[str, nn.Module], points: Sequence[tuple[str, str]]) -> None:
        self._modules = modules
        self.points = list(points)
        self.mode = "off"
        self.index: torch.Tensor | None = None
        self.layout: tuple[int, int, int] | None = None
        self.refs: dict[tuple[str, str], Any] = {}
        self.ref_norms: dict[tuple[str, str], torch.Tensor | None] = {}
        self.delta: dict[tuple[str, str], list[float]] = {p: [] for p in self.points}
        self.norm: dict[tuple[str, str], list[float]] = {p: [] for p in self.points}
        self._seen: set[tuple[str, str]] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> Taps:
        for name, where in self.points:
            module = self._modules[name]
            if where == "in":
                handle = module.register_forward_pre_hook(self._pre_hook(name))
            else:
                handle = module.register_forward_hook(self._hook(name))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._record((name, "in"), args[0])

        return pre

    def _hook(self, name: str) -> Callable[..., None]:
        def post(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._record((name, "out"), output)

        return post

    def start(self, mode: str, index: torch.Tensor | None = None) -> None:
        """Prepare one forward pass in ``mode`` ("reference" or "compare")."""
        self.mode, self.index = mode, index
        self.layout = None if index is None else repeats(index)
        self._seen.clear()
        if mode == "reference":
            for point in self.points:
                if not isinstance(self.refs.get(point), list):
                    self.refs[point] = []

    def recorded_all(self) -> bool:
        """Whether every tapped point has recorded its tensor in the current forward pass."""
        return len(self._seen) == len(self.points)

    def freeze_reference(self) -> None:
        """Concatenate the reference chunks, each freed once copied (not ``torch.cat``,
        which holds every chunk and the result at once: twice the references)."""
        self.refs = {k: concatenate(v) if v else None for k, v in self.refs.items()}
        self.ref_norms = {k: None if v is None else row_norms(v) for k, v in self.refs.items()}
        self.mode = "off"

    def reset(self) -> None:
        """Forget references and comparisons."""
        self.refs, self.ref_norms = {}, {}
        self.delta = {p: [] for p in self.points}
        self.norm = {p: [] for p in self.points}

    def _record(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        if self.mode == "off" or key in self._seen:
            return
        self._seen.add(key)
        if self.mode == "reference":
            self.refs[key].append(tensor.detach().clone())
            return
        ref = self.refs.get(key)
        if ref is None or self.index is None:
            return
        if (len(self.index), *ref.shape[1:]) != tensor.shape:
            return
        self.delta[key].extend(kept(distances(tensor.detach(), ref, self.index, self.layout)))
        self.norm[key].extend(kept(self.ref_norms[key][self.index]))

    def relative(self, key: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
        """(||Δ||, ||ref||) per compared row, as float64 arrays."""
        if not self.delta[key]:
            return np.zeros(0), np.zeros(0)
        return (
            np.asarray(self.delta[key], dtype=np.float64),
            np.asarray(self.norm[key], dtype=np.float64),
        )


class _StopForward(Exception):
    """Raised by a hook to end a forward pass whose remaining layers are not needed."""


def capture(
    model: nn.Module, modules: Mapping[str, nn.Module], images: torch.Tensor, names: Sequence[str],
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Input of each named block for all images (one forward pass in chunks)."""
    taps = Taps(modules, [(n, "in") for n in names])
    size = rows_per_chunk(images.shape[1:]) if batch_size is None else batch_size

    def stop_when_all_seen(module: nn.Module, args: tuple) -> None:
        # registered after the taps' own hooks, so this block's input is already kept
        if taps.recorded_all():
            raise _StopForward

    with taps, torch.no_grad():
        # The forward pass stops once every named block has its input: the
        # layers after the group's last block are never run.
        stops = [modules[n].register_forward_pre_hook(stop_when_all_seen) for n in names]
        try:
            for rows in row_slices(images.shape[0], size):
                taps.start("reference")
                try:
                    model(images[rows])
                except _StopForward:
                    pass
        finally:
            for handle in stops:
                handle.remove()
        taps.freeze_reference()
    missing = [n for n in names if taps.refs.get((n, "in")) is None]
    if missing:
        raise InputError(
            f"block(s) {', '.join(missing)} never received a tensor input in a forward pass",
            hint="the anatomy does not match this model",
        )
    return {n: taps.refs[(n, "in")] for n in names}


def capture_groups(anatomy: Anatomy, samples: int) -> list[list[int]]:
    """Block indices whose inputs are captured together within ``_CAPTURE_ELEMENTS``."""
    groups: list[list[int]] = []
    used = 0
    for index, block in enumerate(anatomy.blocks):
        size = samples * int(np.prod(block.input_shape))
        if groups and used + size <= _CAPTURE_ELEMENTS:
            groups[-1].append(index)
            used += size
        else:
            groups.append([index])
            used = size
    return groups
