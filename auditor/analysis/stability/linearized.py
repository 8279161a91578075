"""Jacobian products of one block: reverse mode and the masked linearization.

:class:`Reverse` gives ``J^T u`` (and ``J v`` by reverse mode twice, the
check), :class:`Linearized` gives ``J v`` by one forward pass of a masked copy
of the block where that is exact, :class:`BlockProducts` picks between them
(forward-mode AD where the copy does not fit), on a copy whose eval BatchNorms
are :class:`AffineBatchNorm` (:func:`jacobian_copy`). :mod:`.krylov` uses the
products for the worst direction.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .chunks import row_norms

__all__ = ["Reverse", "AffineBatchNorm", "jacobian_copy", "Linearized", "BlockProducts"]


class Reverse:
    """Jacobian products of ``fn`` at ``x`` by reverse-mode autograd, from one recorded forward pass.

    ``torch.autograd.grad`` rather than ``torch.func`` (the same products): the
    first use of ``torch.func`` imports ``torch._dynamo``, which cost every audit
    1.5 s and 150 MB here.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
        with torch.enable_grad():
            self.leaf = x.detach().requires_grad_(True)
            self.out = fn(self.leaf)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """``J^T u``."""
        if not self.out.requires_grad:  # the output does not depend on x
            return torch.zeros_like(self.leaf)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.out, self.leaf, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.leaf) if grad is None else grad

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v`` by reverse mode twice, without forward-mode AD.

        ``g(u) = J^T u`` is linear in ``u`` with derivative ``J^T``, so ``J v`` is
        the gradient of ``<g(u), v>`` with respect to ``u`` (taken at ``u = 0``).
        About two more passes; used once per block, to check the linearization
        (:meth:`Linearized.matches`) with autograd's own derivative rules.
        """
        if not self.out.requires_grad:
            return torch.zeros_like(self.out)
        with torch.enable_grad():
            probe = torch.zeros_like(self.out, requires_grad=True)
            (grad,) = torch.autograd.grad(self.out, self.leaf, probe, create_graph=True, retain_graph=True,
                                          allow_unused=True)
            if grad is None or not grad.requires_grad:  # J = 0, or J^T u does not depend on u
                return torch.zeros_like(self.out)
            (product,) = torch.autograd.grad(grad, probe, v, allow_unused=True)
        return torch.zeros_like(self.out) if product is None else product.detach()


class AffineBatchNorm(nn.Module):
    """Eval-mode BatchNorm as the per-channel affine map it is: ``x * scale + shift``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (t.dim() - 2)
        return torch.addcmul(self.shift.reshape(shape), t, self.scale.reshape(shape))


def jacobian_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with its eval-mode BatchNorm layers as :class:`AffineBatchNorm`.

    The same function (up to rounding) but with cheap forward-mode derivatives: torch's
    ``batch_norm`` forward-mode rule costs several times the layer itself. Layers that
    normalize by batch statistics even in eval mode (no running statistics) are kept.
    """
    copy_ = copy.deepcopy(block)
    for module in list(copy_.modules()):
        for child_name, child in list(module.named_children()):
            if (
                isinstance(child, nn.modules.batchnorm._BatchNorm)
                and not child.training
                and child.running_mean is not None
                and child.running_var is not None
            ):
                setattr(module, child_name, AffineBatchNorm(child))
    return copy_


class _MaskedReLU(nn.Module):
    """A ReLU of the linearized block: records ``t > 0`` on the clean pass, applies the masks to tangents.

    A module may be called several times per forward (torchvision's blocks call
    ``self.relu`` three times): masks are kept in call order, in a list shared
    by the recording and the applying copy.
    """

    def __init__(self, masks: list[torch.Tensor], record: bool) -> None:
        super().__init__()
        self.masks, self.record, self.index = masks, record, 0

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.record:
            mask = t > 0
            self.masks.append(mask)
            return t * mask
        mask = self.masks[self.index]
        self.index += 1
        return t * mask


# modules whose Jacobian the masked copy of Linearized does not model (functions are caught by its check)
_NOT_MASKABLE = (nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.LeakyReLU,
                 nn.ELU, nn.Mish, nn.Softplus, nn.LayerNorm, nn.GroupNorm)


class Linearized:
    """``v -> J(x) v`` of a piecewise-linear block by one forward pass, instead of forward-mode AD.

    An eval block made of convolutions, linear layers, eval BatchNorm (an affine
    map, :class:`AffineBatchNorm`), ReLU modules and additions is, around ``x``,
    the same network with every ReLU replaced by the fixed mask ``x_relu > 0``
    and every additive constant (biases, BatchNorm shifts) removed: its Jacobian
    product costs one forward pass, where ``torch.func.jvp`` costs 4-8 (measured
    on ResNet-50 blocks at 224 px). Exact at points where no ReLU input is zero
    (a measure-zero set; there autograd takes one one-sided derivative, this the
    other). Whether a block has only these parts is not assumed: :meth:`matches`
    compares one product with autograd's (:meth:`Reverse.jvp`) and the caller
    falls back to ``torch.func.jvp`` for every product where they differ.
    That is a property of the block's parts, not of the point: ``exact`` keeps the
    verdict of the first comparison (None before it) for every later batch of points.
    """

    exact: bool | None = None

    def __init__(self, block: nn.Module) -> None:
        if any(isinstance(m, _NOT_MASKABLE) for m in block.modules()):
            # a part the masked copy does not model (GELU, SiLU, a gate's sigmoid, LayerNorm):
            # it cannot be exact, and autograd's double backward may not exist for the part
            self.exact = False
        masks: list[list[torch.Tensor]] = []
        self.masks = masks
        self.recorder, self.linear = copy.deepcopy(block), copy.deepcopy(block)
        for recorder_module, linear_module in zip(self.recorder.modules(), self.linear.modules()):
            for (name, child), (_, twin) in zip(list(recorder_module.named_children()),
                                                list(linear_module.named_children())):
                if isinstance(child, nn.ReLU):
                    masks.append([])
                    setattr(recorder_module, name, _MaskedReLU(masks[-1], record=True))
                    setattr(linear_module, name, _MaskedReLU(masks[-1], record=False))
                elif isinstance(twin, AffineBatchNorm):
                    twin.shift.zero_()
                elif isinstance(twin, (nn.Conv2d, nn.Linear)) and twin.bias is not None:
                    twin.bias = None
        self.relus = [m for m in self.linear.modules() if isinstance(m, _MaskedReLU)]

    def at(self, x: torch.Tensor) -> Linearized:
        """Fix the ReLU masks at the points ``x`` (one clean forward pass); returns self."""
        for masks in self.masks:
            masks.clear()
        with torch.no_grad():
            self.recorder(x.clone())
        return self

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        for relu in self.relus:
            relu.index = 0
        with torch.no_grad():
            return self.linear(v)

    def matches(self, jvp: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the product equals autograd's ``jvp = J v`` to working precision."""
        mine = self(v)
        if mine.shape != jvp.shape:
            return False
        scale = row_norms(jvp).clamp_min(torch.finfo(jvp.dtype).tiny)
        return bool((row_norms(mine - jvp) <= 1e3 * torch.finfo(jvp.dtype).eps * scale).all())



def _forward_product(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J v`` by forward-mode AD; where an operation has no forward-mode rule (torch's fused CPU
    attention kernel), with scaled-dot-product attention computed by its plain math instead."""
    try:
        _, u = torch.func.jvp(fn, (x,), (v,))
    except NotImplementedError:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # only for such blocks

        with sdpa_kernel(SDPBackend.MATH):
            _, u = torch.func.jvp(fn, (x,), (v,))
    return u

class BlockProducts:
    """``J v`` and ``J^T u`` of ``block`` at the rows ``x``, by the cheapest exact means.

    ``J^T u`` by reverse mode (:class:`Reverse`). ``J v`` by one forward pass of the
    masked copy (:class:`Linearized`) where that is exact: the block's first product
    is computed by autograd too and compared (:meth:`Linearized.matches`), and the
    verdict is kept on ``linearized`` for every later batch; elsewhere by
    forward-mode AD.
    """

    def __init__(self, block: nn.Module, x: torch.Tensor, linearized: Linearized | None = None) -> None:
        def fn(t: torch.Tensor) -> torch.Tensor:
            return block(t.clone())

        self.fn, self.x = fn, x
        self.reverse = Reverse(fn, x)
        self.linearized = linearized or Linearized(block)
        self.linear = None if self.linearized.exact is False else self.linearized.at(x)

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        """``J v``."""
        linear = self.linear
        if linear is not None and linear.exact:
            return linear(v)
        if linear is not None:  # the block's one check of its linearization
            try:
                u = self.reverse.jvp(v)
            except RuntimeError:  # an operation without a double backward (hardsigmoid)
                self.linearized.exact, self.linear = False, None
                return _forward_product(self.fn, self.x, v)
            linear.exact = linear.matches(u, v)
            self.linear = linear if linear.exact else None
            return u
        return _forward_product(self.fn, self.x, v)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """``J^T u``."""
        return self.reverse.vjp(u)
