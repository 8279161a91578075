"""An average-pool shortcut (timm's ResNet-D ``downsample``) as one exact convolution.

``AvgPool2d(s, stride=s)`` followed by a 1x1 convolution ``W`` is, on an input
whose height and width are multiples of ``s``, the ``s x s`` stride-``s``
convolution with ``W / s^2`` at every tap: each output position averages the
``s x s`` window it owns, and windows do not overlap. Padding is zero and no
window wraps, so the circular and the real operator coincide, and the polyphase
machinery of :mod:`auditor.analysis.spectra` treats it exactly (on the coarse
grid it is the 1x1 matrix ``[W, W, ..., W] / s^2`` over the ``s^2`` phases).

With ``ceil_mode=True`` and ``count_include_pad=False`` (timm's setting) an odd
size adds a last row / column of partial windows averaged over fewer pixels:
not a convolution, so those sizes are refused.
"""

from __future__ import annotations

import torch

from ..errors import InputError, Remedy
from .spectra import ConvOperator

__all__ = ["pooled_projection"]


def pooled_projection(
    weight: torch.Tensor,
    pool: int,
    input_shape: tuple[int, int, int],
    *,
    out_scale: torch.Tensor | None = None,
    name: str = "",
) -> ConvOperator:
    """The convolution equal to ``AvgPool2d(pool, pool)`` then the 1x1 convolution ``weight``.

    Parameters
    ----------
    weight : Tensor of shape (C_out, C_in, 1, 1)
        The 1x1 projection after the pool.
    pool : int
        Kernel and stride of the average pool.
    input_shape : (C_in, H, W)
        The shortcut's input (before the pool); ``H`` and ``W`` multiples of ``pool``.
    out_scale : Tensor of shape (C_out,), optional
        Folded BatchNorm.
    name : str

    Returns
    -------
    ConvOperator
        Kernel (C_out, C_in, pool, pool) = weight / pool^2 at every tap, stride ``pool``, no padding.

    Raises
    ------
    InputError
        A weight that is not 1x1, or a size that is not a multiple of ``pool``.
    """
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise InputError(f"{name}: the projection after the average pool must be 1x1, got {tuple(weight.shape)}")
    _, height, width = input_shape
    if height % pool or width % pool:
        raise InputError(
            f"{name}: average-pool shortcut on a {height}x{width} input: the last window of an odd size "
            f"averages fewer pixels (ceil_mode), which no convolution does, so the block has no exact operator",
            hint=f"pass {{remedy}} with every stage's size a multiple of {pool} (e.g. a multiple of 32)",
            remedy=Remedy("input_size", None),
        )
    kernel = (weight / float(pool * pool)).expand(-1, -1, pool, pool).contiguous()
    return ConvOperator(kernel, input_shape, stride=(pool, pool), padding=(0, 0), out_scale=out_scale, name=name)
