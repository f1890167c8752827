"""variational_bottleneck: Linear -> (mu, logvar) -> reparameterised sample + KL to N(0, I).

Backends: ``reference`` (PyTorch: ``dmil_fast.reference.gaussian``) and ``triton``: the Linear
layer runs in torch (cuBLAS), then one Triton epilogue reads h = x @ W^T + b once and writes z
and per-(row, head) KL partial sums; mu and logvar are views of h. The backward is one fused
epilogue kernel (grad of h from the grads of z, mu, logvar and kl, eps regenerated from the
seed), then torch matmuls for x, W and b. With ``recompute=True`` the backward does not keep h:
it recomputes it from x, W and b (one more GEMM), which frees B x G*2E elements whenever the
caller keeps no view of mu or logvar itself. No C++/CUDA kernel. The Triton backend is a
``torch.library.custom_op`` (not ``triton_op``; see ``dmil_fast/ops/gaussian_sample.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import accumulation_dtype
from ..reference.gaussian import variational_bottleneck_grouped_ref, variational_bottleneck_ref
from ._dispatch import choose_backend, register
from ._validate import (autocast_enabled, check_fake_devices, check_no_nan, check_same_device, check_same_dtype,
                        check_tensor, values_checked)
from .gaussian_sample import backends_of, check_seed, seed_tensor, seeded_generator

register(backends_of("variational_bottleneck"))


@torch.library.custom_op("dmil_fast::variational_bottleneck", mutates_args=())
def _vb_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], seed: torch.Tensor,
           groups: int, sample: bool, recompute: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.variational_bottleneck import vb_epilogue_fwd

    # Autocast was applied by the caller (see _autocast_inputs); the outputs keep x's dtype,
    # as the fake implementation promises.
    with torch.autocast(x.device.type, enabled=False):
        h = torch.nn.functional.linear(x, weight, bias)  # (B, G*2E)
    z, kl_rows = vb_epilogue_fwd(h, seed, groups, sample)  # (B, G, E) or None; (B, G)
    return h, (z if sample else h.new_empty(0)), kl_rows


@_vb_op.register_fake
def _(x, weight, bias, seed, groups, sample, recompute):
    check_fake_devices("variational_bottleneck", x=x, weight=weight, bias=bias, seed=seed)
    b, width = x.shape[0], weight.shape[0]
    z = x.new_empty((b, groups, width // (2 * groups)) if sample else (0,))
    return x.new_empty((b, width)), z, x.new_empty((b, groups), dtype=accumulation_dtype(x.dtype))


@torch.library.custom_op("dmil_fast::variational_bottleneck_backward", mutates_args=())
def _vb_backward_op(grad_h: Optional[torch.Tensor], grad_z: Optional[torch.Tensor],
                    grad_kl_rows: Optional[torch.Tensor], h: torch.Tensor, seed: torch.Tensor,
                    groups: int) -> torch.Tensor:
    from ..kernels.variational_bottleneck import vb_epilogue_bwd

    return vb_epilogue_bwd(grad_h, grad_z, grad_kl_rows, h, seed, groups)


@_vb_backward_op.register_fake
def _(grad_h, grad_z, grad_kl_rows, h, seed, groups):
    check_fake_devices("variational_bottleneck_backward", grad_h=grad_h, grad_z=grad_z, grad_kl_rows=grad_kl_rows,
                       h=h, seed=seed)
    return h.new_empty(h.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, seed, groups, sample, recompute = inputs
    # Either h itself, or (recompute) the bias to rebuild it from x and W, which are kept anyway.
    ctx.save_for_backward(x, weight, bias if recompute else output[0], seed)
    ctx.groups, ctx.sample, ctx.recompute = groups, sample, recompute
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_h, grad_z, grad_kl_rows):
    x, weight, h_or_bias, seed = ctx.saved_tensors
    if ctx.recompute:
        with torch.autocast(x.device.type, enabled=False):  # the forward's GEMM, in its dtypes
            h = torch.nn.functional.linear(x, weight, h_or_bias)
    else:
        h = h_or_bias
    if not ctx.sample:
        grad_z = None  # z is then the mu view of h; its gradient arrives through grad_h
    grad_h = torch.ops.dmil_fast.variational_bottleneck_backward(
        grad_h, grad_z, grad_kl_rows, h, seed, ctx.groups)  # (B, G*2E)
    need = ctx.needs_input_grad
    grad_x = grad_h @ weight if need[0] else None  # (B, D)
    grad_w = grad_h.t() @ x if need[1] else None  # (G*2E, D)
    grad_b = grad_h.sum(0) if need[2] else None  # (G*2E,)
    return grad_x, grad_w, grad_b, None, None, None, None


_vb_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, weight, bias, groups, sample, seed, recompute) -> torch.device:
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=2)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int >= 1, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (2E*groups, D) with D = x.shape[1] = {x.shape[1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] % (2 * groups) != 0:
        raise ValueError(f"weight must have shape (2E*groups, D): its {weight.shape[0]} rows are not "
                         f"divisible by 2*groups = {2 * groups}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one per weight row), "
                             f"got {tuple(bias.shape)}")
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    check_seed(seed)
    device = check_same_device(x=x, weight=weight, bias=bias)
    if values_checked(device, x, weight, bias):
        check_no_nan(x=x, weight=weight, bias=bias)
    return device


def _op_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype an input of ``dtype`` has inside the op, cast as torch's own Linear is cast:
    under autocast every floating dtype but float64 becomes the autocast dtype, whatever it was
    (a bf16 activation meets the float32 parameters of the layer that holds them)."""
    if dtype.is_floating_point and dtype != torch.float64 and autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _autocast_inputs(x, weight, bias, device):
    """Cast to :func:`_op_dtype`, then check that the dtypes agree."""
    x, weight, bias = (t if t is None else t.to(_op_dtype(t.dtype, device.type)) for t in (x, weight, bias))
    check_same_dtype(x=x, weight=weight, bias=bias)
    return x, weight, bias


def variational_bottleneck_backend(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend ``variational_bottleneck(_grouped)`` runs for an input like ``x`` (its dtype
    taken after the op's autocast cast) when asked for ``backend``."""
    return choose_backend("variational_bottleneck", backend, x.device, _op_dtype(x.dtype, x.device.type))


def _triton_forward(x, weight, bias, groups, sample, seed, device, recompute):
    # Nothing is drawn when not sampling, so torch's generator does not advance (as in the reference).
    seed_t = seed_tensor(seed, device) if sample else torch.zeros(1, dtype=torch.int64, device=device)
    h, z, kl_rows = torch.ops.dmil_fast.variational_bottleneck(x, weight, bias, seed_t, groups, sample,
                                                               recompute)
    b, e = x.shape[0], weight.shape[0] // (2 * groups)
    h3 = h.view(b, groups, 2 * e)  # (B, G, 2E)
    mu, logvar = h3[..., :e], h3[..., e:]  # (B, G, E) views of h
    kl = (kl_rows.sum(0) / (b * e)).to(x.dtype)  # (G,)
    return (z if sample else mu), mu, logvar, kl


def variational_bottleneck(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                           sample: bool = True, seed: Optional[int] = None, backend: Optional[str] = None,
                           recompute: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian head: h = x @ W^T + b split into (mu, logvar); z sampled (or mu); KL to N(0, I).

    Args:
        x: (B, D); weight: (2E, D) (rows [0, E) give mu, [E, 2E) logvar); bias: (2E,) or None.
            One floating dtype and device (Triton: float16/float32/float64 on CPU, float16/bfloat16/
            float32 on CUDA; the reference takes any float). Any strides.
        sample: draw z = mu + exp(logvar / 2) * eps (training) or return z = mu (eval).
        seed: None (torch's generator) or an int in [0, 2**63 - 1]; the Triton draw equals
            ``gaussian_sample(mu, logvar, seed=seed, backend="triton")``. Seeds under
            torch.compile: see ``gaussian_sample``. Under autocast, float32 inputs are cast
            to the autocast dtype first (as torch's Linear does).
        backend: None (automatic), "reference" or "triton" ("cpp"/"cuda": no kernel).
        recompute: Triton backend: keep no h = x W^T + b for the backward and recompute it there
            (one more GEMM). Saves a (B, 2E) tensor when the caller keeps no mu or logvar (a kept
            view keeps h alive anyway); same values and gradients. The reference ignores it.

    Returns:
        z, mu, logvar: (B, E) in x's dtype (mu and logvar are views of h; z is mu when not
        sampling); kl: () the mean over (B, E) of KL(N(mu, exp(logvar)) || N(0, I)), x's dtype.

    NaN in a tensor argument raises a ValueError naming it, on CPU tensors; on GPU tensors only
    under ``torch.autograd.detect_anomaly()`` (the check is a host sync); never inside a
    torch.compile graph or a torch.func transform (vmap), nor for fake tensors.

    Equivalent PyTorch::

        h = torch.nn.functional.linear(x, weight, bias)
        mu, logvar = h.chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).mean()
    """
    device = _validate(x, weight, bias, 1, sample, seed, recompute)
    x, weight, bias = _autocast_inputs(x, weight, bias, device)
    chosen = choose_backend("variational_bottleneck", backend, device, x.dtype)
    if chosen == "reference":
        return variational_bottleneck_ref(x, weight, bias, sample=sample,
                                          generator=seeded_generator(seed, device))
    z, mu, logvar, kl = _triton_forward(x, weight, bias, 1, sample, seed, device, recompute)
    return z[:, 0], mu[:, 0], logvar[:, 0], kl[0]  # (B, E), (B, E), (B, E), ()


def variational_bottleneck_grouped(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                   groups: int, *, sample: bool = True, seed: Optional[int] = None,
                                   backend: Optional[str] = None, recompute: bool = False
                                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``groups`` Gaussian heads on the same x in one GEMM and one epilogue launch.

    Args:
        x: (B, D); weight: (G*2E, D), the G heads' (2E, D) weights stacked (head g owns rows
            [2E*g, 2E*(g+1))); bias: (G*2E,) or None; groups: G >= 1. Dtypes/devices as in
            ``variational_bottleneck``.
        sample, seed, backend, recompute: as in ``variational_bottleneck`` (recompute saves a
            (B, G*2E) tensor). The Triton draw of head g at
            (b, e) uses the logical offset (b * G + g) * E + e, so G = 1 equals the ungrouped op.

    Returns:
        z, mu, logvar: (B, G, E) (mu, logvar views of h); kl: (G,) each head's mean KL to N(0, I).

    NaN in a tensor argument raises a ValueError naming it, on CPU tensors; on GPU tensors only
    under ``torch.autograd.detect_anomaly()`` (the check is a host sync); never inside a
    torch.compile graph or a torch.func transform (vmap), nor for fake tensors.

    Equivalent PyTorch::

        h = torch.nn.functional.linear(x, weight, bias).view(B, G, 2 * E)
        mu, logvar = h[..., :E], h[..., E:]
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).mean(dim=(0, 2))
    """
    device = _validate(x, weight, bias, groups, sample, seed, recompute)
    x, weight, bias = _autocast_inputs(x, weight, bias, device)
    chosen = choose_backend("variational_bottleneck", backend, device, x.dtype)
    if chosen == "reference":
        return variational_bottleneck_grouped_ref(x, weight, bias, groups, sample=sample,
                                                  generator=seeded_generator(seed, device))
    return _triton_forward(x, weight, bias, groups, sample, seed, device, recompute)
