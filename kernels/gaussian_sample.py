"""Triton kernels for the reparameterised Gaussian sample z = mu + exp(logvar / 2) * eps.

eps is drawn inside the kernel with Philox from (seed, logical element index row * E + col) and
drawn again in the backward, so no eps tensor is stored and the draw does not depend on how the
inputs are laid out in memory. The seed is read from a 1-element int64 tensor, so a seed drawn
from torch's generator never has to leave the device.

The launchers take 2-D (B, E) tensors of any strides and return contiguous outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import accumulation_dtype


def acc_dtype(dtype: torch.dtype):
    """Triton type the kernels compute in: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


def tile(n_rows: int, n_cols: int, device: torch.device):
    """(BLOCK_R, BLOCK_E, num_warps) for a (n_rows, n_cols) problem.

    Rows are short here (latent sizes of tens to hundreds), so one program takes several rows.
    The CPU interpreter pays per program, not per element, so it gets much larger tiles.
    """
    on_gpu = device.type == "cuda"
    block_e = min(triton.next_power_of_2(max(n_cols, 1)), 128 if on_gpu else 512)
    budget = 4096 if on_gpu else 32768
    block_r = max(1, min(triton.next_power_of_2(max(n_rows, 1)), budget // block_e))
    return block_r, block_e, 4


@triton.jit
def standard_normal(seed, rows, cols, E):
    """N(0, 1) noise for the (rows, cols) block of a logical (*, E) array: Philox keyed by the
    seed, counter = row * E + col in 64 bits (so the draw is the same for any layout)."""
    offsets = rows[:, None].to(tl.int64) * E + cols[None, :]
    return tl.randn(seed, offsets)


@triton.jit
def _gaussian_sample_fwd_kernel(
    z_ptr, stride_zb, stride_ze,
    mu_ptr, stride_mub, stride_mue,
    logvar_ptr, stride_lvb, stride_lve,
    seed_ptr,
    B, E,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (rows[:, None] < B) & (cols[None, :] < E)
    r = rows[:, None].to(tl.int64)
    c = cols[None, :].to(tl.int64)
    seed = tl.load(seed_ptr)
    mu = tl.load(mu_ptr + r * stride_mub + c * stride_mue, mask=mask, other=0.0).to(ACC_DTYPE)
    logvar = tl.load(logvar_ptr + r * stride_lvb + c * stride_lve, mask=mask, other=0.0).to(ACC_DTYPE)
    eps = standard_normal(seed, rows, cols, E).to(ACC_DTYPE)
    z = mu + tl.exp(logvar * 0.5) * eps
    tl.store(z_ptr + r * stride_zb + c * stride_ze, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_sample_bwd_kernel(
    grad_logvar_ptr, stride_glb, stride_gle,
    grad_z_ptr, stride_gzb, stride_gze,
    logvar_ptr, stride_lvb, stride_lve,
    seed_ptr,
    B, E,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # dz/dlogvar = exp(logvar / 2) * eps / 2, with eps regenerated from the same counters.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (rows[:, None] < B) & (cols[None, :] < E)
    r = rows[:, None].to(tl.int64)
    c = cols[None, :].to(tl.int64)
    seed = tl.load(seed_ptr)
    grad_z = tl.load(grad_z_ptr + r * stride_gzb + c * stride_gze, mask=mask, other=0.0).to(ACC_DTYPE)
    logvar = tl.load(logvar_ptr + r * stride_lvb + c * stride_lve, mask=mask, other=0.0).to(ACC_DTYPE)
    eps = standard_normal(seed, rows, cols, E).to(ACC_DTYPE)
    grad_logvar = grad_z * (0.5 * tl.exp(logvar * 0.5) * eps)
    tl.store(grad_logvar_ptr + r * stride_glb + c * stride_gle,
             grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


def gaussian_sample_fwd(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """mu, logvar: (B, E), any strides; seed: (1,) int64 on their device -> z: (B, E) contiguous."""
    b, e = mu.shape
    z = torch.empty((b, e), dtype=mu.dtype, device=mu.device)
    block_r, block_e, warps = tile(b, e, mu.device)
    grid = (triton.cdiv(b, block_r), triton.cdiv(e, block_e))
    _gaussian_sample_fwd_kernel[grid](
        z, z.stride(0), z.stride(1),
        mu, mu.stride(0), mu.stride(1),
        logvar, logvar.stride(0), logvar.stride(1),
        seed,
        b, e,
        ACC_DTYPE=acc_dtype(mu.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return z


def gaussian_sample_bwd(grad_z: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """grad_z, logvar: (B, E), any strides (grad_z may be expanded) -> grad_logvar: (B, E)."""
    b, e = logvar.shape
    grad_logvar = torch.empty((b, e), dtype=logvar.dtype, device=logvar.device)
    block_r, block_e, warps = tile(b, e, logvar.device)
    grid = (triton.cdiv(b, block_r), triton.cdiv(e, block_e))
    _gaussian_sample_bwd_kernel[grid](
        grad_logvar, grad_logvar.stride(0), grad_logvar.stride(1),
        grad_z, grad_z.stride(0), grad_z.stride(1),
        logvar, logvar.stride(0), logvar.stride(1),
        seed,
        b, e,
        ACC_DTYPE=acc_dtype(logvar.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return grad_logvar
