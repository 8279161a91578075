"""Independent references for the spectra tests: circular convolution by rolls, dense matrices, SVD.

One home for the helpers the spectra, conditioning and block-extremes tests
share. Everything here is written from the definitions (DESIGN.md, "Spectra"),
not from auditor's code: the operator's matrix is its action on the identity
basis, and its singular values come from numpy's dense SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from auditor.analysis.spectra import ConvOperator, IdentityShortcut, OptionAShortcut

D = torch.float64

__all__ = ["D", "circular_conv", "branch", "shortcut_map", "dense", "block_matrix", "singular_values"]


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
