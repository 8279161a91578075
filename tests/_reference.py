"""Independent references: circular convolution by rolls, dense matrices, SVD, perturbations.

One home for the helpers the spectra, conditioning, block-extremes, stability
and end-to-end tests share. Everything here is written from the definitions (docs/design.md, "Spectra"),
not from auditor's code: the operator's matrix is its action on the identity
basis, and its singular values come from numpy's dense SVD.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from auditor.analysis.spectra import ConvOperator, IdentityShortcut, OptionAShortcut

D = torch.float64

__all__ = [
    "D", "circular_conv", "branch", "shortcut_map", "dense", "block_matrix", "singular_values",
    "linearized_basic_block", "directions",
]


def circular_conv(x: torch.Tensor, op: ConvOperator) -> torch.Tensor:
    """y[:, i, j] = sum_ab K[:, :, a, b] x[:, (s i + a - p) mod H, (s j + b - p) mod W], i < H / s."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel_size, op.stride, op.padding
    c_out, c_in_g = op.weight.shape[:2]
    per = c_out // op.groups
    outputs = []
    for g in range(op.groups):
        xg = x[:, g * c_in_g:(g + 1) * c_in_g]
        wg = op.weight[g * per:(g + 1) * per].to(D)
        y = sum(
            torch.einsum("oc,nchw->nohw", wg[:, :, a, b], torch.roll(xg, (-(a - ph), -(b - pw)), dims=(2, 3)))
            for a in range(kh) for b in range(kw)
        )
        outputs.append(y)
    y = torch.cat(outputs, dim=1)[:, :, ::sh, ::sw]
    return y if op.out_scale is None else y * op.out_scale.to(D)[None, :, None, None]


def branch(convs: list[ConvOperator]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The residual branch W_k ... W_1 (circular), as a function of a batch."""
    def run(x: torch.Tensor) -> torch.Tensor:
        for op in convs:
            x = circular_conv(x, op)
        return x
    return run


def shortcut_map(shortcut: IdentityShortcut | OptionAShortcut | ConvOperator) -> Callable[[torch.Tensor], torch.Tensor]:
    """The shortcut S as a function of a batch: identity, subsample + zero channels, or a convolution."""
    if isinstance(shortcut, IdentityShortcut):
        return lambda x: x
    if isinstance(shortcut, OptionAShortcut):
        s = shortcut.stride
        extra = shortcut.out_channels - shortcut.pad_before - shortcut.input_shape[0]
        return lambda x: F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, shortcut.pad_before, extra))
    return lambda x: circular_conv(x, shortcut)


def dense(function: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> np.ndarray:
    """The matrix of a linear map on ``shape``, from its action on the identity basis (torch on one
    thread: hundreds of tiny products are slower with OpenMP on a busy machine)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=D).reshape(n, *shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(basis).reshape(n, -1).T.numpy()
    finally:
        torch.set_num_threads(threads)


def block_matrix(convs: list[ConvOperator], shortcut: IdentityShortcut | OptionAShortcut | ConvOperator | None) -> np.ndarray:
    """The dense matrix of ``W_k ... W_1 + S`` (``W_k ... W_1`` without a shortcut)."""
    run = branch(convs)
    if shortcut is None:
        return dense(run, convs[0].input_shape)
    short = shortcut_map(shortcut)
    return dense(lambda x: run(x) + short(x), convs[0].input_shape)


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """All singular values of a dense matrix, descending."""
    return np.linalg.svd(matrix, compute_uv=False)[: min(matrix.shape)]


def linearized_basic_block(block: nn.Module) -> nn.Module:
    """A basic block (``conv1, bn1, conv2, bn2`` and a parameter-free or identity shortcut) as the
    linear operator resdyn conditions: circular padding, BatchNorm as a pure per-channel scale
    (no shift), convolution biases and ReLUs removed, in float64."""
    block = copy.deepcopy(block).double()

    def scale(bn: nn.Module) -> torch.Tensor | None:
        if not isinstance(bn, nn.BatchNorm2d):
            return None
        return bn.weight / torch.sqrt(bn.running_var + bn.eps)

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = block.conv1, block.conv2
            for conv in (self.conv1, self.conv2):
                conv.padding_mode = "circular"
                conv.bias = None
            self.s1, self.s2 = scale(block.bn1), scale(block.bn2)
            self.shortcut = getattr(block, "shortcut", None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv1(x)
            y = y if self.s1 is None else y * self.s1[None, :, None, None]
            y = self.conv2(y)
            y = y if self.s2 is None else y * self.s2[None, :, None, None]
            return y if self.shortcut is None else y + self.shortcut(x)

    return Linear()


def directions(seed: int, rows: int, shape: tuple[int, ...], reference: torch.Tensor, eps: float) -> torch.Tensor:
    """The documented perturbation recipe: Gaussian rows from ``manual_seed(seed)`` (drawn in float32, used in float64),
    each rescaled to ``eps`` times the norm of its sample in ``reference`` (``rows / n`` per sample)."""
    def norms(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1).norm(dim=1)

    g = torch.Generator().manual_seed(seed)
    d = torch.randn((rows, *shape), generator=g, dtype=torch.float32).double()
    k = rows // reference.shape[0]
    scale = eps * norms(reference).repeat_interleave(k) / norms(d)
    return d * scale.view(-1, *([1] * len(shape)))
