"""diagonal_gaussian_kl: KL(N(q_mu, exp(q_logvar)) || N(p_mu, exp(p_logvar))) of diagonal Gaussians.

Backends: ``reference`` (PyTorch) and ``triton`` (one kernel writes per-row partial sums in
float32, float64 for float64 inputs; one elementwise kernel gives the gradients of all four
tensors). No C++/CUDA kernel.
The Triton backend is a ``torch.library.custom_op`` (not ``triton_op``; see
``dmil_fast/ops/gaussian_sample.py`` for why).
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from ..kernels import accumulation_dtype
from ..reference.gaussian import diagonal_gaussian_kl_ref
from ._dispatch import choose_backend, register
from ._validate import (check_choice, check_fake_devices, check_no_nan, check_same_device, check_same_dtype,
                        check_same_shape, check_tensor, values_checked)
from .gaussian_sample import backends_of

REDUCTIONS = ("mean", "sum", "none")

register(backends_of("diagonal_gaussian_kl"))


def _flat(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` broadcast to ``shape`` (..., E) and viewed as (B, E) (stride 0 where broadcast)."""
    return t.expand(shape).reshape(-1, shape[-1])


@torch.library.custom_op("dmil_fast::diagonal_gaussian_kl_rows", mutates_args=())
def _kl_rows_op(q_mu: torch.Tensor, q_logvar: torch.Tensor, p_mu: torch.Tensor,
                p_logvar: torch.Tensor) -> torch.Tensor:
    from ..kernels.diagonal_gaussian_kl import diagonal_gaussian_kl_rows_fwd

    shape = q_mu.shape
    rows = diagonal_gaussian_kl_rows_fwd(_flat(q_mu, shape), _flat(q_logvar, shape),
                                         _flat(p_mu, shape), _flat(p_logvar, shape))  # (B,)
    return rows.view(shape[:-1])


@_kl_rows_op.register_fake
def _(q_mu, q_logvar, p_mu, p_logvar):
    check_fake_devices("diagonal_gaussian_kl_rows", q_mu=q_mu, q_logvar=q_logvar, p_mu=p_mu, p_logvar=p_logvar)
    return q_mu.new_empty(q_mu.shape[:-1], dtype=accumulation_dtype(q_mu.dtype))


@torch.library.custom_op("dmil_fast::diagonal_gaussian_kl_rows_backward", mutates_args=())
def _kl_rows_backward_op(grad_rows: torch.Tensor, q_mu: torch.Tensor, q_logvar: torch.Tensor,
                         p_mu: torch.Tensor, p_logvar: torch.Tensor, p_mu_grad: bool,
                         p_logvar_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.diagonal_gaussian_kl import diagonal_gaussian_kl_rows_bwd

    shape = q_mu.shape
    g_qmu, g_qlv, g_pmu, g_plv = diagonal_gaussian_kl_rows_bwd(
        grad_rows.reshape(-1), _flat(q_mu, shape), _flat(q_logvar, shape), _flat(p_mu, shape),
        _flat(p_logvar, shape), p_mu_grad=p_mu_grad, p_logvar_grad=p_logvar_grad,
        prior_grad_dtype=accumulation_dtype(q_mu.dtype))
    # Broadcast priors: reduce their (B, E) gradients (kept in float32) to the priors' shapes.
    g_pmu = g_pmu.view(shape).sum_to_size(p_mu.shape).to(p_mu.dtype) if p_mu_grad else p_mu.new_empty(0)
    g_plv = (g_plv.view(shape).sum_to_size(p_logvar.shape).to(p_logvar.dtype) if p_logvar_grad
             else p_logvar.new_empty(0))
    return g_qmu.view(shape), g_qlv.view(shape), g_pmu, g_plv


@_kl_rows_backward_op.register_fake
def _(grad_rows, q_mu, q_logvar, p_mu, p_logvar, p_mu_grad, p_logvar_grad):
    check_fake_devices("diagonal_gaussian_kl_rows_backward", grad_rows=grad_rows, q_mu=q_mu, q_logvar=q_logvar,
                       p_mu=p_mu, p_logvar=p_logvar)
    return (q_mu.new_empty(q_mu.shape), q_logvar.new_empty(q_logvar.shape),
            p_mu.new_empty(p_mu.shape if p_mu_grad else (0,)),
            p_logvar.new_empty(p_logvar.shape if p_logvar_grad else (0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_rows):
    q_mu, q_logvar, p_mu, p_logvar = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = torch.ops.dmil_fast.diagonal_gaussian_kl_rows_backward(
        grad_rows, q_mu, q_logvar, p_mu, p_logvar, need[2], need[3])
    return tuple(g if n else None for g, n in zip(grads, need))


_kl_rows_op.register_autograd(_backward, setup_context=_setup_context)


def _prior(name: str, value, q: torch.Tensor) -> torch.Tensor:
    """A prior argument as a tensor that broadcasts to ``q`` (a number becomes a 0-d tensor)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((), float(value), dtype=q.dtype, device=q.device)
    if not isinstance(value, torch.Tensor):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):  # a NumPy scalar, a Fraction
            return torch.full((), float(value), dtype=q.dtype, device=q.device)
        raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(value).__name__}")
    check_tensor(name, value)
    ok = value.dim() <= q.dim() and all(
        p in (1, s) for p, s in zip(reversed(value.shape), reversed(q.shape)))
    if not ok:
        raise ValueError(f"{name} must be a number or a tensor broadcastable to q_mu's shape "
                         f"{tuple(q.shape)}, got shape {tuple(value.shape)}")
    return value


def diagonal_gaussian_kl(q_mu: torch.Tensor, q_logvar: torch.Tensor,
                         p_mu: Union[torch.Tensor, float] = 0.0, p_logvar: Union[torch.Tensor, float] = 0.0,
                         reduction: str = "mean", *, backend: Optional[str] = None) -> torch.Tensor:
    """KL divergence between diagonal Gaussians q = N(q_mu, exp(q_logvar)), p = N(p_mu, exp(p_logvar)).

    Positionally the same as the official ``diagonal_gaussian_kl(q_mean, q_log_var, p_mean=0.0,
    p_log_var=0.0)`` (mean over every element), but stricter: one dtype, priors that broadcast to
    q's shape. ``dm.diagonal_gaussian_kl`` (:mod:`dmil_fast.compat`) takes the official names and
    conversions and calls this. Differentiable in every tensor argument.

    Args:
        q_mu, q_logvar: (..., E), same shape, dtype and device (float16/float32/float64 on CPU and
            float16/bfloat16/float32 on CUDA for the Triton backend; any float for the reference).
        p_mu, p_logvar: a number, or a tensor of q's dtype and device broadcastable to (..., E)
            (e.g. (E,) or (1, E)); their gradients come back in their own shapes. Under
            torch.compile give a Python number or a tensor (dynamo turns a NumPy scalar into an array).
        reduction: "mean" over every element, "sum" over every element, or "none": (...,) one
            value per row, the mean over the last dimension.
        backend: None (automatic), "reference" or "triton" ("cpp"/"cuda": no kernel).

    Returns:
        () for "mean"/"sum", (...,) for "none"; q_mu's dtype (sums accumulate in float32; float64 for float64).

    NaN in a tensor argument raises a ValueError naming it, on CPU tensors; on GPU tensors only
    under ``torch.autograd.detect_anomaly()`` (the check is a host sync); never inside a
    torch.compile graph or a torch.func transform (vmap), nor for fake tensors.

    Equivalent PyTorch::

        d = q_logvar - p_logvar
        kl = 0.5 * (-d + d.exp() + (q_mu - p_mu) ** 2 * torch.exp(-p_logvar) - 1)
        kl.mean()  # "sum": kl.sum(), "none": kl.mean(-1)
    """
    check_tensor("q_mu", q_mu, min_ndim=1)
    check_tensor("q_logvar", q_logvar, min_ndim=1)
    check_same_shape("q_logvar", q_logvar, "q_mu", q_mu)
    check_choice("reduction", reduction, REDUCTIONS)
    p_mu_t = _prior("p_mu", p_mu, q_mu)
    p_logvar_t = _prior("p_logvar", p_logvar, q_mu)
    check_same_dtype(q_mu=q_mu, q_logvar=q_logvar, p_mu=p_mu_t, p_logvar=p_logvar_t)
    device = check_same_device(q_mu=q_mu, q_logvar=q_logvar, p_mu=p_mu_t, p_logvar=p_logvar_t)
    if values_checked(device, q_mu, q_logvar, p_mu_t, p_logvar_t):
        check_no_nan(q_mu=q_mu, q_logvar=q_logvar, p_mu=p_mu_t, p_logvar=p_logvar_t)
    chosen = choose_backend("diagonal_gaussian_kl", backend, device, q_mu.dtype)
    if chosen == "reference":
        return diagonal_gaussian_kl_ref(q_mu, q_logvar, p_mu, p_logvar, reduction)
    rows = torch.ops.dmil_fast.diagonal_gaussian_kl_rows(q_mu, q_logvar, p_mu_t, p_logvar_t)  # (...,)
    if reduction == "none":
        out = rows / q_mu.shape[-1]
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / q_mu.numel()
    return out.to(q_mu.dtype)
