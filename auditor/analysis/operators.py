"""The operator types the spectra work on: a convolution on a fixed input shape, the shortcuts, and extremes.

:class:`ConvOperator` (a 2-D convolution with its stride, padding, groups and per-channel
factors on a (C, H, W) input), the two parameter-free shortcuts (:class:`IdentityShortcut`,
:class:`OptionAShortcut`), :class:`Extremes` (a largest and smallest singular value and how
they were found), :func:`linear_operator` (a Linear layer as a 1x1 convolution). No numerics: :mod:`.spectra`,
:mod:`.block_algebra` and :mod:`.conditioning` compute on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

__all__ = ["ConvOperator", "OptionAShortcut", "IdentityShortcut", "Extremes", "linear_operator", "pair_of_ints",
           "shape_of_map"]

def pair_of_ints(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, str):
        raise InputError(f"{what}={value!r} is not supported; give integers", hint="use explicit padding")
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise InputError(f"{what} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def shape_of_map(value: Any, what: str) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in value)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"{what} must be (C, H, W) with positive sizes, got {tuple(value)}")
    return shape  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class ConvOperator:
    """A 2-D convolution as a linear operator on a fixed input shape.

    Attributes
    ----------
    weight : torch.Tensor of shape (C_out, C_in // groups, kh, kw)
        Kernel, any real float dtype.
    input_shape : tuple of int
        ``(C_in, H, W)`` of the real input (without batch axis).
    stride, padding : tuple of int
        As in :class:`torch.nn.Conv2d` (ints are accepted and normalised).
    groups : int
    out_scale : torch.Tensor of shape (C_out,), optional
        Per-output-channel factor; eval BatchNorm folded is
        ``gamma / sqrt(running_var + eps)`` (its shift does not change the
        linear operator). ``None`` means 1.
    name : str
    dilation : tuple of int
        Only ``(1, 1)`` is supported; any other value raises :class:`InputError`.

    Notes
    -----
    A Linear layer is a 1x1 convolution on a 1x1 map, see :func:`linear_operator`.
    """

    weight: torch.Tensor
    input_shape: tuple[int, int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    out_scale: torch.Tensor | None = None
    name: str = ""
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        label = f"layer {self.name!r}: " if self.name else ""
        if not isinstance(self.weight, torch.Tensor) or self.weight.ndim != 4:
            shape = tuple(getattr(self.weight, "shape", ()))
            raise InputError(f"{label}conv weight must have shape (C_out, C_in/groups, kh, kw), got {shape}")
        if not self.weight.is_floating_point():
            raise InputError(f"{label}conv weight must be a real float tensor, got {self.weight.dtype}")
        set_ = object.__setattr__
        set_(self, "input_shape", shape_of_map(self.input_shape, f"{label}input_shape"))
        set_(self, "stride", pair_of_ints(self.stride, "stride"))
        set_(self, "padding", pair_of_ints(self.padding, "padding"))
        set_(self, "dilation", pair_of_ints(self.dilation, "dilation"))
        if self.dilation != (1, 1):
            raise InputError(f"{label}dilation {self.dilation} is not supported (only 1)")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise InputError(f"{label}stride {self.stride} / padding {self.padding} out of range")
        c_out, c_in_g, kh, kw = self.weight.shape
        if self.groups < 1 or c_out % self.groups:
            raise InputError(f"{label}groups={self.groups} does not divide C_out={c_out}")
        if self.input_shape[0] != c_in_g * self.groups:
            raise InputError(
                f"{label}input has {self.input_shape[0]} channels but the weight "
                f"{tuple(self.weight.shape)} with groups={self.groups} expects {c_in_g * self.groups}"
            )
        if self.out_scale is not None and tuple(self.out_scale.shape) != (c_out,):
            raise InputError(f"{label}out_scale must have shape ({c_out},), got {tuple(self.out_scale.shape)}")
        if min(self.output_shape) < 1:
            raise InputError(f"{label}kernel {(kh, kw)} does not fit the input {self.input_shape}")

    @property
    def in_channels(self) -> int:
        """``C_in``."""
        return self.input_shape[0]

    @property
    def out_channels(self) -> int:
        """``C_out``."""
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(kh, kw)``."""
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """torch's output shape: ``floor((H + 2 p - k) / s) + 1`` per axis."""
        _, h, w = self.input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return self.out_channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1

    def scaled_weight(self) -> torch.Tensor:
        """The kernel with ``out_scale`` folded in (same dtype as ``weight``)."""
        if self.out_scale is None:
            return self.weight
        return self.weight * self.out_scale.to(self.weight)[:, None, None, None]


@dataclass(frozen=True)
class OptionAShortcut:
    """Parameter-free CIFAR "option A" shortcut.

    ``y = pad_channels(x[:, ::stride, ::stride])``: ``pad_before`` zero channels
    before the input's channels, the rest (up to ``out_channels``) after.
    """

    input_shape: tuple[int, int, int]
    out_channels: int
    stride: int
    pad_before: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", shape_of_map(self.input_shape, "option A input_shape"))
        c_in = self.input_shape[0]
        if self.stride < 1 or self.pad_before < 0 or self.out_channels < self.pad_before + c_in:
            raise InputError(
                f"option A shortcut: stride {self.stride}, pad_before {self.pad_before} and "
                f"out_channels {self.out_channels} do not fit {c_in} input channels"
            )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(out_channels, ceil(H / stride), ceil(W / stride))``."""
        _, h, w = self.input_shape
        return self.out_channels, -(-h // self.stride), -(-w // self.stride)


@dataclass(frozen=True)
class IdentityShortcut:
    """The identity shortcut ``y = x``."""

    input_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", shape_of_map(self.input_shape, "identity input_shape"))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Same as the input."""
        return self.input_shape


@dataclass(frozen=True)
class Extremes:
    """Largest and smallest singular value of an operator.

    Attributes
    ----------
    sigma_max, sigma_min : float
        The smallest is taken over ``min(rows, cols)`` values.
    converged : bool
        False when an iterative solver stopped before reaching its tolerance;
        the values are then its last estimates.
    method : str
        ``"fft-circular"`` or ``"lanczos-zero"``.
    """

    sigma_max: float
    sigma_min: float
    converged: bool
    method: str


def linear_operator(
    weight: torch.Tensor, name: str = "", *, out_scale: torch.Tensor | None = None
) -> ConvOperator:
    """A Linear layer as a 1x1 convolution on a 1x1 map.

    Parameters
    ----------
    weight : torch.Tensor of shape (out_features, in_features)
    name : str
    out_scale : torch.Tensor of shape (out_features,), optional

    Returns
    -------
    ConvOperator
    """
    if weight.ndim != 2:
        raise InputError(f"linear weight must have shape (out, in), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    return ConvOperator(
        weight.reshape(out_features, in_features, 1, 1), (in_features, 1, 1), out_scale=out_scale, name=name
    )
