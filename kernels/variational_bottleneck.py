"""Triton epilogue of the (grouped) variational bottleneck.

The Linear layer h = x @ W^T + b (B, G*2E) runs in cuBLAS; head g owns columns
[2E*g, 2E*g + E) (mu) and [2E*g + E, 2E*(g+1)) (logvar). One kernel then reads h once and writes

    z[b, g, :]       = mu + exp(logvar / 2) * eps     (only when sampling)
    kl_rows[b, g]    = sum_e 0.5 * (mu^2 + exp(logvar) - logvar - 1)     (float32 partial sums)

with eps from Philox at the logical offset (b * G + g) * E + e, so for G = 1 the draw is exactly
the one of the gaussian_sample kernel with the same seed. The backward kernel rebuilds grad_h
(B, G*2E) from the incoming grads of h (through the mu / logvar views), z and kl_rows, each
optional, regenerating eps instead of reading it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import accumulation_dtype
from .gaussian_sample import acc_dtype, standard_normal, tile


@triton.jit
def _vb_epilogue_fwd_kernel(
    z_ptr, stride_zb, stride_zg, stride_ze,
    kl_ptr, stride_klb, stride_klg,
    h_ptr, stride_hb, stride_hc,
    seed_ptr,
    B, G, E,
    SAMPLE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # A logical row is one (sample, head) pair: row = b * G + g.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B * G
    b = (rows // G).to(tl.int64)[:, None]
    g = (rows % G).to(tl.int64)[:, None]
    mu_base = h_ptr + b * stride_hb + g * (2 * E) * stride_hc
    z_base = z_ptr + b * stride_zb + g * stride_zg
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for start in range(0, E, BLOCK_E):
        cols = start + tl.arange(0, BLOCK_E)
        mask = row_mask[:, None] & (cols[None, :] < E)
        c = cols[None, :].to(tl.int64)
        mu = tl.load(mu_base + c * stride_hc, mask=mask, other=0.0).to(ACC_DTYPE)
        logvar = tl.load(mu_base + (c + E) * stride_hc, mask=mask, other=0.0).to(ACC_DTYPE)
        # KL to N(0, I); masked lanes load mu = logvar = 0 and add exactly 0.
        acc += tl.sum(0.5 * (mu * mu + tl.exp(logvar) - logvar - 1.0), axis=1)
        if SAMPLE:
            eps = standard_normal(seed, rows, cols, E).to(ACC_DTYPE)
            z = mu + tl.exp(logvar * 0.5) * eps
            tl.store(z_base + c * stride_ze, z.to(z_ptr.dtype.element_ty), mask=mask)
    b_row = rows // G
    g_row = rows % G
    tl.store(kl_ptr + b_row * stride_klb + g_row * stride_klg, acc, mask=row_mask)


@triton.jit
def _vb_epilogue_bwd_kernel(
    grad_h_ptr, stride_ghb, stride_ghc,
    grad_hin_ptr, stride_gib, stride_gic,
    grad_z_ptr, stride_gzb, stride_gzg, stride_gze,
    grad_kl_ptr, stride_gkb, stride_gkg,
    h_ptr, stride_hb, stride_hc,
    seed_ptr,
    B, G, E,
    HAS_GRAD_H: tl.constexpr, HAS_GRAD_Z: tl.constexpr, HAS_GRAD_KL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_mask = rows < B * G
    mask = row_mask[:, None] & (cols[None, :] < E)
    b = (rows // G).to(tl.int64)[:, None]
    g = (rows % G).to(tl.int64)[:, None]
    mu_col = g * (2 * E) + cols[None, :].to(tl.int64)
    lv_col = mu_col + E
    mu = tl.load(h_ptr + b * stride_hb + mu_col * stride_hc, mask=mask, other=0.0).to(ACC_DTYPE)
    logvar = tl.load(h_ptr + b * stride_hb + lv_col * stride_hc, mask=mask, other=0.0).to(ACC_DTYPE)
    grad_mu = tl.zeros((BLOCK_R, BLOCK_E), dtype=ACC_DTYPE)
    grad_lv = tl.zeros((BLOCK_R, BLOCK_E), dtype=ACC_DTYPE)
    if HAS_GRAD_H:
        grad_hin = grad_hin_ptr + b * stride_gib
        grad_mu += tl.load(grad_hin + mu_col * stride_gic, mask=mask, other=0.0).to(ACC_DTYPE)
        grad_lv += tl.load(grad_hin + lv_col * stride_gic, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_GRAD_Z:
        c = cols[None, :].to(tl.int64)
        grad_z = tl.load(grad_z_ptr + b * stride_gzb + g * stride_gzg + c * stride_gze,
                         mask=mask, other=0.0).to(ACC_DTYPE)
        seed = tl.load(seed_ptr)
        eps = standard_normal(seed, rows, cols, E).to(ACC_DTYPE)
        grad_mu += grad_z
        grad_lv += grad_z * (0.5 * tl.exp(logvar * 0.5) * eps)
    if HAS_GRAD_KL:
        grad_kl = tl.load(grad_kl_ptr + b * stride_gkb + g * stride_gkg,
                          mask=row_mask[:, None], other=0.0).to(ACC_DTYPE)
        grad_mu += grad_kl * mu
        grad_lv += grad_kl * (0.5 * (tl.exp(logvar) - 1.0))
    out_ty = grad_h_ptr.dtype.element_ty
    tl.store(grad_h_ptr + b * stride_ghb + mu_col * stride_ghc, grad_mu.to(out_ty), mask=mask)
    tl.store(grad_h_ptr + b * stride_ghb + lv_col * stride_ghc, grad_lv.to(out_ty), mask=mask)


def vb_epilogue_fwd(h: torch.Tensor, seed: torch.Tensor, groups: int, sample: bool
                    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """h: (B, G*2E), any strides; seed: (1,) int64 -> z: (B, G, E) (``None`` when not sampling)
    and kl_rows: (B, G) per-(sample, head) KL sums in float32 (float64 for float64 h)."""
    b, width = h.shape
    e = width // (2 * groups)
    kl_rows = torch.empty((b, groups), dtype=accumulation_dtype(h.dtype), device=h.device)
    z = torch.empty((b, groups, e), dtype=h.dtype, device=h.device) if sample else None
    z_arg, z_strides = (z, z.stride()) if sample else (kl_rows, (0, 0, 0))
    block_r, block_e, warps = tile(b * groups, e, h.device)
    _vb_epilogue_fwd_kernel[(triton.cdiv(b * groups, block_r),)](
        z_arg, *z_strides,
        kl_rows, kl_rows.stride(0), kl_rows.stride(1),
        h, h.stride(0), h.stride(1),
        seed,
        b, groups, e,
        SAMPLE=sample, ACC_DTYPE=acc_dtype(h.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return z, kl_rows


def vb_epilogue_bwd(grad_h: Optional[torch.Tensor], grad_z: Optional[torch.Tensor],
                    grad_kl_rows: Optional[torch.Tensor], h: torch.Tensor, seed: torch.Tensor,
                    groups: int) -> torch.Tensor:
    """grad_h: (B, G*2E) or None (grads reaching h through the mu / logvar views), grad_z:
    (B, G, E) or None, grad_kl_rows: (B, G) or None (any strides, expanded allowed) -> the total
    gradient of h: (B, G*2E) contiguous, in h's dtype."""
    b, width = h.shape
    e = width // (2 * groups)
    out = torch.empty((b, width), dtype=h.dtype, device=h.device)
    block_r, block_e, warps = tile(b * groups, e, h.device)
    grid = (triton.cdiv(b * groups, block_r), triton.cdiv(e, block_e))
    _vb_epilogue_bwd_kernel[grid](
        out, out.stride(0), out.stride(1),
        # Absent gradients are never read: a placeholder pointer with zero strides.
        *((grad_h, grad_h.stride(0), grad_h.stride(1)) if grad_h is not None else (h, 0, 0)),
        *((grad_z, *grad_z.stride()) if grad_z is not None else (h, 0, 0, 0)),
        *((grad_kl_rows, *grad_kl_rows.stride()) if grad_kl_rows is not None else (h, 0, 0)),
        h, h.stride(0), h.stride(1),
        seed,
        b, groups, e,
        HAS_GRAD_H=grad_h is not None, HAS_GRAD_Z=grad_z is not None, HAS_GRAD_KL=grad_kl_rows is not None,
        ACC_DTYPE=acc_dtype(h.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return out
