"""Drop-ins for the official code's module-level functions (``models/multimodal.py``).

``dm.diagonal_gaussian_kl`` is :func:`diagonal_gaussian_kl` here: the official function's
signature, argument names and conversions, computed by :func:`dmil_fast.ops.diagonal_gaussian_kl`
(the fused kernel where one fits). The op itself is stricter (one dtype, priors that broadcast to
q's shape) and offers ``reduction``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops._validate import NaNInputError, check_same_device, check_tensor
from .ops.diagonal_gaussian_kl import diagonal_gaussian_kl as _kl_op

# The op's argument names -> the official ones, for the op's NaN errors.
_OFFICIAL_NAMES = {"q_mu": "q_mean", "q_logvar": "q_log_var", "p_mu": "p_mean", "p_logvar": "p_log_var"}


def _as_prior(name: str, value, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """``value`` converted as the official function does: ``torch.as_tensor(value, dtype=like.dtype,
    device=like.device)`` (a tensor of another dtype or device is cast and moved, differentiably)."""
    try:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name} must be a number, a tensor or an array-like of numbers (converted to {like_name}'s dtype "
            f"and device), got {type(value).__name__}: {err}"
        ) from None


def diagonal_gaussian_kl(q_mean: torch.Tensor, q_log_var: torch.Tensor, p_mean=0.0, p_log_var=0.0, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Mean of KL(N(q_mean, exp(q_log_var)) || N(p_mean, exp(p_log_var))) over every element.

    The official ``diagonal_gaussian_kl(q_mean, q_log_var, p_mean=0.0, p_log_var=0.0)``, by position
    and by keyword, with its conversions: ``p_mean`` is taken to ``q_mean``'s dtype and device and
    ``p_log_var`` to ``q_log_var``'s (numbers, tensors of another dtype or device, NumPy arrays,
    lists); the four broadcast together as PyTorch broadcasts them (a prior may carry more
    dimensions than q), the mean runs over the broadcast shape, and the result has the promoted
    dtype of ``q_mean`` and ``q_log_var``. Differentiable in every tensor argument.

    Unlike the official function it refuses, with a TypeError or ValueError naming the argument:
    a q that is not a floating tensor, shapes that do not broadcast, tensors on two devices, an
    empty broadcast shape (the official mean of nothing is NaN) and NaN inputs (checked where
    :func:`dmil_fast.ops.diagonal_gaussian_kl` checks them: CPU tensors, GPU tensors under anomaly
    detection).

    ``backend``: as for :func:`dmil_fast.ops.diagonal_gaussian_kl` (None: automatic).
    """
    check_tensor("q_mean", q_mean, allow_empty=True)
    check_tensor("q_log_var", q_log_var, allow_empty=True)
    check_same_device(q_mean=q_mean, q_log_var=q_log_var)
    p_mean_t = _as_prior("p_mean", p_mean, q_mean, "q_mean")
    p_log_var_t = _as_prior("p_log_var", p_log_var, q_log_var, "q_log_var")
    try:
        shape = torch.broadcast_shapes(q_mean.shape, q_log_var.shape, p_mean_t.shape, p_log_var_t.shape)
    except RuntimeError:
        raise ValueError(
            "q_mean, q_log_var, p_mean and p_log_var must broadcast together, got shapes "
            f"{tuple(q_mean.shape)}, {tuple(q_log_var.shape)}, {tuple(p_mean_t.shape)} and "
            f"{tuple(p_log_var_t.shape)}"
        ) from None
    if 0 in shape:
        raise ValueError(f"q_mean, q_log_var, p_mean and p_log_var broadcast to the empty shape {tuple(shape)}; "
                         "expected at least one element (the mean of no elements is undefined)")
    dtype = torch.promote_types(q_mean.dtype, q_log_var.dtype)
    shape = shape if len(shape) else torch.Size((1,))  # the op reduces over a last dimension
    q_mu = q_mean.to(dtype).expand(shape)
    q_logvar = q_log_var.to(dtype).expand(shape)
    try:  # the op looks for NaN (where it reads values); its error names the official argument
        return _kl_op(q_mu, q_logvar, p_mean_t.to(dtype), p_log_var_t.to(dtype), "mean", backend=backend)
    except NaNInputError as err:
        raise NaNInputError(_OFFICIAL_NAMES.get(err.argument, err.argument)) from None


__all__ = ["diagonal_gaussian_kl"]
