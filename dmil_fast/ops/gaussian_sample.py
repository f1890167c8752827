"""gaussian_sample: the reparameterised sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I).

Backends: ``reference`` (PyTorch, eps from torch's generator, the draw the official model makes)
and ``triton`` (eps drawn in the kernel with Philox from (seed, row * E + col) and regenerated in
the backward; nothing but the seed is kept for the backward). There is no C++/CUDA kernel.

The Triton backend is registered with ``torch.library.custom_op`` rather than ``triton_op`` +
``wrap_triton``: under ``TRITON_INTERPRET=1`` the functional decomposition that ``triton_op``
gets under ``torch.compile`` runs the interpreter on fake tensors and fails ("Cannot access
data pointer of Tensor"). The kernel is already the fused unit, so an opaque op loses nothing.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..reference.gaussian import gaussian_sample_ref
from ._dispatch import (OpBackends, choose_backend, cpp_device_reason, cuda_device_reason, dtype_reason,
                        register, triton_device_reason)
from ._validate import (check_fake_devices, check_no_nan, check_same_device, check_same_dtype, check_same_shape,
                        check_tensor, values_checked)

# bfloat16 is left out on the CPU: the interpreter casts to it by truncation, not to nearest even
TRITON_DTYPES_CPU = (torch.float16, torch.float32, torch.float64)
TRITON_DTYPES_CUDA = (torch.float16, torch.bfloat16, torch.float32)
_SEED_MAX = 2**63 - 1


def triton_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Gaussian Triton kernels cannot run ``dtype`` tensors on ``device`` (None if they can)."""
    return triton_device_reason(device) or dtype_reason(dtype, device, TRITON_DTYPES_CPU, TRITON_DTYPES_CUDA)


def backends_of(name: str) -> OpBackends:
    """The capability table shared by the three Gaussian ops (reference everywhere, Triton where
    it runs, no C++/CUDA kernel)."""
    return OpBackends(name, checks={
        "reference": lambda device, dtype: None,
        "triton": triton_reason,
        "cpp": lambda device, dtype: cpp_device_reason(name, device, has_cpp=False),
        "cuda": lambda device, dtype: cuda_device_reason(name, device, has_cuda=False),
    })


register(backends_of("gaussian_sample"))


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # Python or NumPy integers
        raise TypeError(f"seed must be None or an int in [0, 2**63 - 1], got {type(seed).__name__}")
    if not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"seed must be None or an int in [0, 2**63 - 1], got {seed}")


def seed_tensor(seed: Optional[int], device: torch.device) -> torch.Tensor:
    """The kernels' seed: (1,) int64 on ``device``; drawn from torch's generator when ``seed`` is
    None (so ``torch.manual_seed`` controls it and nothing leaves the device or breaks a graph)."""
    if seed is None:
        return torch.randint(0, _SEED_MAX, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def seeded_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    """The reference backends' generator: None (torch's global one) or a fresh seeded one (None
    for meta tensors, which hold no values to draw)."""
    if seed is None or torch.device(device).type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.library.custom_op("dmil_fast::gaussian_sample", mutates_args=())
def _gaussian_sample_op(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    from ..kernels.gaussian_sample import gaussian_sample_fwd

    return gaussian_sample_fwd(mu, logvar, seed)


@_gaussian_sample_op.register_fake
def _(mu, logvar, seed):
    check_fake_devices("gaussian_sample", mu=mu, logvar=logvar, seed=seed)
    return mu.new_empty(mu.shape)


@torch.library.custom_op("dmil_fast::gaussian_sample_backward", mutates_args=())
def _gaussian_sample_backward_op(grad_z: torch.Tensor, logvar: torch.Tensor,
                                 seed: torch.Tensor) -> torch.Tensor:
    from ..kernels.gaussian_sample import gaussian_sample_bwd

    return gaussian_sample_bwd(grad_z, logvar, seed)


@_gaussian_sample_backward_op.register_fake
def _(grad_z, logvar, seed):
    check_fake_devices("gaussian_sample_backward", grad_z=grad_z, logvar=logvar, seed=seed)
    return logvar.new_empty(logvar.shape)


def _setup_context(ctx, inputs, output):
    _, logvar, seed = inputs
    ctx.save_for_backward(logvar, seed)


def _backward(ctx, grad_z):
    logvar, seed = ctx.saved_tensors
    grad_mu = grad_z if ctx.needs_input_grad[0] else None
    grad_logvar = None
    if ctx.needs_input_grad[1]:
        grad_logvar = torch.ops.dmil_fast.gaussian_sample_backward(grad_z, logvar, seed)
    return grad_mu, grad_logvar, None


_gaussian_sample_op.register_autograd(_backward, setup_context=_setup_context)


def gaussian_sample(mu: torch.Tensor, logvar: torch.Tensor, *, seed: Optional[int] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Reparameterised sample of N(mu, diag(exp(logvar))), differentiable in mu and logvar.

    Args:
        mu: (..., E) floating tensor (float16/float32/float64 on CPU; float16/bfloat16/float32 on CUDA
            for the Triton backend; any floating dtype for the reference), any strides.
        logvar: (..., E), same shape, dtype and device as ``mu``.
        seed: None or an int (Python or NumPy) in [0, 2**63 - 1]. Same seed -> bitwise the same z (per backend).
            None draws from torch's generator (``torch.manual_seed`` controls it); the reference
            then calls ``torch.randn_like(mu)``, the official draw. An int seed gives the
            reference a fresh ``torch.Generator``, which torch.compile cannot trace (a graph
            break); the Triton backend keeps any seed inside the graph. Under inductor, seed=None
            draws differ from eager ones (inductor has its own RNG) but follow torch.manual_seed.
        backend: None (automatic), "reference" or "triton" ("cpp"/"cuda": no kernel).

    Returns:
        z: (..., E), dtype and device of ``mu``, computed in float32 (float64 for float64).
        The Triton draw is a function of (seed, b * E + e) over the logical (B, E) view only.

    NaN in a tensor argument raises a ValueError naming it, on CPU tensors; on GPU tensors only
    under ``torch.autograd.detect_anomaly()`` (the check is a host sync); never inside a
    torch.compile graph or a torch.func transform (vmap), nor for fake tensors.

    Equivalent PyTorch::

        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
    """
    check_tensor("mu", mu, min_ndim=1)
    check_tensor("logvar", logvar, min_ndim=1)
    check_same_shape("logvar", logvar, "mu", mu)
    check_same_dtype(mu=mu, logvar=logvar)
    device = check_same_device(mu=mu, logvar=logvar)
    check_seed(seed)
    if values_checked(device, mu, logvar):
        check_no_nan(mu=mu, logvar=logvar)
    chosen = choose_backend("gaussian_sample", backend, device, mu.dtype)
    if chosen == "reference":
        return gaussian_sample_ref(mu, logvar, generator=seeded_generator(seed, device))
    e = mu.shape[-1]
    z = torch.ops.dmil_fast.gaussian_sample(mu.reshape(-1, e), logvar.reshape(-1, e),  # (B, E)
                                            seed_tensor(seed, device))
    return z.view(mu.shape)
