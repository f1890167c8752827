"""A linear layer on the concatenation of parts that keeps the parts for the backward instead of
the concatenation: the model's gate, reconstructions and synergy module take [a, b, ...] inputs
whose parts other layers keep already."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_mod  # the global forward/backward (pre-)hook registries

Tensor = torch.Tensor


class _LinearOnParts(torch.autograd.Function):
    """``F.linear(torch.cat(parts, dim=1), weight, bias)`` that keeps the parts for the backward
    instead of their concatenation.

    The forward runs exactly the concatenated call (under autocast too: the same cast, the same
    GEMM); the concatenation is freed when it returns. The backward rebuilds it, in the dtype the
    forward's GEMM ran in, and computes the gradients with the GEMMs autograd runs for the
    concatenated layer, so values and gradients are the same. Its ops are differentiable, so
    double backward works too.
    """

    generate_vmap_rule = True  # torch.func transforms see through it

    @staticmethod
    def forward(weight: Tensor, bias: Optional[Tensor], *parts: Tensor) -> Tensor:
        return F.linear(torch.cat(parts, dim=1), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, bias, *parts = inputs
        # The parts only where the weight's gradient needs them (a frozen layer keeps none).
        ctx.save_for_backward(weight, bias, *(parts if ctx.needs_input_grad[0] else ()))
        ctx.widths, ctx.part_dtypes = [p.shape[1] for p in parts], [p.dtype for p in parts]
        ctx.compute_dtype = output.dtype

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, bias, *parts = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad = grad.to(dtype)
        need_weight, need_bias, *need_parts = ctx.needs_input_grad
        grad_weight = grad_bias = None
        if need_weight:
            x = torch.cat([p.to(dtype) for p in parts], dim=1)
            grad_weight = grad.t().mm(x).to(weight.dtype)
        if need_bias:
            grad_bias = grad.sum(0).to(bias.dtype)
        grad_parts = [None] * len(ctx.widths)
        if any(need_parts):
            grad_x = grad.mm(weight.to(dtype))
            start = 0
            for i, (width, part_dtype) in enumerate(zip(ctx.widths, ctx.part_dtypes)):
                if need_parts[i]:
                    grad_parts[i] = grad_x[:, start:start + width].to(part_dtype)
                start += width
        return (grad_weight, grad_bias, *grad_parts)


def linear_on_parts(linear: nn.Linear, parts: Sequence[Tensor]) -> Tensor:
    """``linear(torch.cat(parts, dim=1))`` (the same values and gradients) that keeps the parts for
    the backward (tensors that other layers keep already) instead of a new (B, sum of widths)
    copy: see :class:`_LinearOnParts`."""
    widths = sum(p.shape[1] for p in parts)
    if widths != linear.in_features:
        raise ValueError(f"the parts have {widths} columns in all, the layer takes {linear.in_features}")
    return _LinearOnParts.apply(linear.weight, linear.bias, *parts)


def _has_hooks(module: nn.Module) -> bool:
    """Forward or backward hooks (or pre-hooks) on ``module`` or registered globally: a module that
    has them must be called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_mod._global_forward_hooks
                or _module_mod._global_forward_pre_hooks or _module_mod._global_backward_hooks
                or _module_mod._global_backward_pre_hooks)


def _plain_linear(layer: Optional[nn.Module]) -> bool:
    """Whether :func:`linear_on_parts` may stand in for calling ``layer``: a plain ``nn.Linear``
    (no subclass) without hooks (:func:`_has_hooks`)."""
    return type(layer) is nn.Linear and not _has_hooks(layer)


def parts_path_applies(net: nn.Sequential) -> bool:
    """Whether :func:`sequential_on_parts` may run ``net``'s first layer by :func:`linear_on_parts`.

    Only for a plain ``nn.Sequential`` whose first layer is a plain ``nn.Linear``, with no forward
    or backward hooks or pre-hooks on either (nor global ones: pruning, weight norm, quantisation
    stubs, backward hooks or a replaced layer must see the module called).
    """
    first = net[0] if type(net) is nn.Sequential and len(net) > 0 else None
    return _plain_linear(first) and not _has_hooks(net)


def sequential_on_parts(net: nn.Sequential, parts: Sequence[Tensor], *, split: bool = True) -> Tensor:
    """``net(torch.cat(parts, dim=1))``, its first layer run by :func:`linear_on_parts` where
    ``split`` and :func:`parts_path_applies`, else exactly that concatenated call."""
    if not (split and parts_path_applies(net)):
        return net(torch.cat(parts, dim=1))
    out = linear_on_parts(net[0], parts)
    for layer in list(net)[1:]:
        out = layer(out)
    return out
