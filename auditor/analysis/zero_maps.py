"""Zero-padded block operators as torch maps: ``x -> A x`` and ``y -> A^T y`` on batches, float64.

A block with factors ``W_1 .. W_k`` (:class:`auditor.analysis.operators.ConvOperator`, every factor of the
linearization folded in) and shortcut ``S`` is, with ReLU taken as the identity, ``A = S + W_k ... W_1``: each
``W_i`` is ``conv2d`` with the layer's own stride, padding and groups, its adjoint ``conv_transpose2d`` (at stride
1, ``conv2d`` with the flipped kernel); ``S`` is the identity, option A (``x[:, ::s, ::s]`` between zero channels)
or a convolution. These are the operators :mod:`auditor.analysis.zero_block_extremes` conditions, and the
reference its matrices (:mod:`auditor.analysis.zero_matrices`) are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .operators import ConvOperator, IdentityShortcut, OptionAShortcut

__all__ = ["BlockMap", "block_map"]


def _conv_forward(op: ConvOperator) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                             Callable[[torch.Tensor], torch.Tensor]]:
    """``conv2d`` and its adjoint, float64: at stride 1 ``conv2d`` with the flipped kernel, each group's channels
    swapped and padding ``k - 1 - p`` (torch's ``conv2d`` takes 0.55-0.9x the time of its ``conv_transpose2d``
    on ResNet-56's maps); else ``conv_transpose2d`` (output padding restores the input size)."""
    weight = op.scaled_weight().detach().to(torch.float64)
    _, h, w = op.input_shape
    _, ho, wo = op.output_shape
    (kh, kw), (sh, sw), (ph, pw) = op.kernel_size, op.stride, op.padding
    extra = (h - ((ho - 1) * sh - 2 * ph + kh), w - ((wo - 1) * sw - 2 * pw + kw))

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight.to(x.device), stride=op.stride, padding=op.padding, groups=op.groups)

    if op.stride != (1, 1) or kh - 1 - ph < 0 or kw - 1 - pw < 0:
        def adjoint(y: torch.Tensor) -> torch.Tensor:
            return F.conv_transpose2d(y, weight.to(y.device), stride=op.stride, padding=op.padding,
                                      output_padding=extra, groups=op.groups)

        return forward, adjoint
    c_out, per_in = weight.shape[:2]
    flipped = (weight.reshape(op.groups, c_out // op.groups, per_in, kh, kw).transpose(1, 2)
               .reshape(per_in * op.groups, c_out // op.groups, kh, kw).flip(2, 3).contiguous())

    def flipped_adjoint(y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(y, flipped.to(y.device), padding=(kh - 1 - ph, kw - 1 - pw), groups=op.groups)

    return forward, flipped_adjoint


def _option_a_maps(shortcut: OptionAShortcut) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                       Callable[[torch.Tensor], torch.Tensor]]:
    c, h, w = shortcut.input_shape
    s, before = shortcut.stride, shortcut.pad_before
    out = shortcut.output_shape

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(x.shape[0], *out)
        y[:, before:before + c] = x[:, :, ::s, ::s]
        return y

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        x = y.new_zeros(y.shape[0], c, h, w)
        x[:, :, ::s, ::s] = y[:, before:before + c]
        return x

    return forward, adjoint


def _shortcut_maps(shortcut: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                           Callable[[torch.Tensor], torch.Tensor]]:
    if isinstance(shortcut, IdentityShortcut):
        return (lambda x: x), (lambda y: y)
    if isinstance(shortcut, OptionAShortcut):
        return _option_a_maps(shortcut)
    return _conv_forward(shortcut)


@dataclass(frozen=True)
class BlockMap:
    """A zero-padded block operator as torch functions on batches ``(N, C, H, W)``, float64.

    Attributes
    ----------
    forward, adjoint : callable
        ``x -> A x`` and ``y -> A^T y``.
    input_shape, output_shape : tuple of int
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    adjoint: Callable[[torch.Tensor], torch.Tensor]
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, int, int]

    @property
    def rows(self) -> int:
        """``C_out H_out W_out``."""
        return math.prod(self.output_shape)

    @property
    def cols(self) -> int:
        """``C_in H W``."""
        return math.prod(self.input_shape)


def block_map(convs: Sequence[ConvOperator], shortcut: Any) -> BlockMap:
    """``A = S + W_k ... W_1`` (``shortcut=None``: the plain branch) with zero padding.

    Parameters
    ----------
    convs : sequence of ConvOperator
        ``W_1 .. W_k``; each one's ``input_shape`` is the previous one's torch output shape.
    shortcut : IdentityShortcut, OptionAShortcut, ConvOperator or None

    Returns
    -------
    BlockMap

    Raises
    ------
    ValueError
        Shapes that do not chain (the anatomy gives chained shapes).
    """
    maps = [_conv_forward(op) for op in convs]
    for before, after in zip(convs, convs[1:]):
        if tuple(before.output_shape) != tuple(after.input_shape):
            raise ValueError(f"{before.name} gives {before.output_shape}, {after.name} takes {after.input_shape}")
    short = None if shortcut is None else _shortcut_maps(shortcut)
    if shortcut is not None and tuple(shortcut.output_shape) != tuple(convs[-1].output_shape):
        raise ValueError(f"shortcut gives {shortcut.output_shape}, the branch {convs[-1].output_shape}")

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x
        for f, _ in maps:
            y = f(y)
        return y if short is None else y + short[0](x)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        x = y
        for _, g in reversed(maps):
            x = g(x)
        return x if short is None else x + short[1](y)

    return BlockMap(forward, adjoint, tuple(convs[0].input_shape), tuple(convs[-1].output_shape))
