"""Triton kernels for the diagonal-Gaussian KL divergence, reduced per row.

    kl_elem = 0.5 * (-d + exp(d) + (q_mu - p_mu)^2 * exp(-p_logvar) - 1),  d = q_logvar - p_logvar

The forward writes one partial sum per row (in float32, float64 for float64 inputs); the caller
reduces those to "mean" / "sum" / "none". The backward is elementwise, scaled by the incoming
per-row gradient. Prior tensors may be broadcast views with stride 0: the kernels read them
through their strides, so a prior shared by every row is never materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import accumulation_dtype
from .gaussian_sample import acc_dtype, tile


@triton.jit
def kl_elementwise(q_mu, q_logvar, p_mu, p_logvar):
    delta = q_logvar - p_logvar
    diff = q_mu - p_mu
    return 0.5 * (tl.exp(delta) - delta + diff * diff * tl.exp(-p_logvar) - 1.0)


@triton.jit
def _diagonal_gaussian_kl_fwd_kernel(
    rows_ptr, stride_rows,
    q_mu_ptr, stride_qmb, stride_qme,
    q_lv_ptr, stride_qlb, stride_qle,
    p_mu_ptr, stride_pmb, stride_pme,
    p_lv_ptr, stride_plb, stride_ple,
    B, E,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    r = rows[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for start in range(0, E, BLOCK_E):
        cols = start + tl.arange(0, BLOCK_E)
        mask = row_mask[:, None] & (cols[None, :] < E)
        c = cols[None, :].to(tl.int64)
        q_mu = tl.load(q_mu_ptr + r * stride_qmb + c * stride_qme, mask=mask, other=0.0).to(ACC_DTYPE)
        q_lv = tl.load(q_lv_ptr + r * stride_qlb + c * stride_qle, mask=mask, other=0.0).to(ACC_DTYPE)
        p_mu = tl.load(p_mu_ptr + r * stride_pmb + c * stride_pme, mask=mask, other=0.0).to(ACC_DTYPE)
        p_lv = tl.load(p_lv_ptr + r * stride_plb + c * stride_ple, mask=mask, other=0.0).to(ACC_DTYPE)
        # Masked lanes load q = p = N(0, 1), whose KL is exactly 0: no extra select needed.
        acc += tl.sum(kl_elementwise(q_mu, q_lv, p_mu, p_lv), axis=1)
    tl.store(rows_ptr + rows * stride_rows, acc, mask=row_mask)


@triton.jit
def _diagonal_gaussian_kl_bwd_kernel(
    g_qmu_ptr, stride_gqmb, stride_gqme,
    g_qlv_ptr, stride_gqlb, stride_gqle,
    g_pmu_ptr, stride_gpmb, stride_gpme,
    g_plv_ptr, stride_gplb, stride_gple,
    grad_rows_ptr, stride_grows,
    q_mu_ptr, stride_qmb, stride_qme,
    q_lv_ptr, stride_qlb, stride_qle,
    p_mu_ptr, stride_pmb, stride_pme,
    p_lv_ptr, stride_plb, stride_ple,
    B, E,
    P_MU_GRAD: tl.constexpr, P_LOGVAR_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (rows[:, None] < B) & (cols[None, :] < E)
    r = rows[:, None].to(tl.int64)
    c = cols[None, :].to(tl.int64)
    g = tl.load(grad_rows_ptr + rows * stride_grows, mask=rows < B, other=0.0).to(ACC_DTYPE)[:, None]
    q_mu = tl.load(q_mu_ptr + r * stride_qmb + c * stride_qme, mask=mask, other=0.0).to(ACC_DTYPE)
    q_lv = tl.load(q_lv_ptr + r * stride_qlb + c * stride_qle, mask=mask, other=0.0).to(ACC_DTYPE)
    p_mu = tl.load(p_mu_ptr + r * stride_pmb + c * stride_pme, mask=mask, other=0.0).to(ACC_DTYPE)
    p_lv = tl.load(p_lv_ptr + r * stride_plb + c * stride_ple, mask=mask, other=0.0).to(ACC_DTYPE)
    exp_delta = tl.exp(q_lv - p_lv)
    scaled_diff = (q_mu - p_mu) * tl.exp(-p_lv)
    g_qmu = g * scaled_diff
    g_qlv = g * 0.5 * (exp_delta - 1.0)
    tl.store(g_qmu_ptr + r * stride_gqmb + c * stride_gqme, g_qmu.to(g_qmu_ptr.dtype.element_ty), mask=mask)
    tl.store(g_qlv_ptr + r * stride_gqlb + c * stride_gqle, g_qlv.to(g_qlv_ptr.dtype.element_ty), mask=mask)
    if P_MU_GRAD:
        tl.store(g_pmu_ptr + r * stride_gpmb + c * stride_gpme,
                 (-g_qmu).to(g_pmu_ptr.dtype.element_ty), mask=mask)
    if P_LOGVAR_GRAD:
        g_plv = g * 0.5 * (1.0 - exp_delta - (q_mu - p_mu) * scaled_diff)
        tl.store(g_plv_ptr + r * stride_gplb + c * stride_gple,
                 g_plv.to(g_plv_ptr.dtype.element_ty), mask=mask)


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1)


def diagonal_gaussian_kl_rows_fwd(q_mu: torch.Tensor, q_logvar: torch.Tensor, p_mu: torch.Tensor,
                                  p_logvar: torch.Tensor) -> torch.Tensor:
    """All (B, E), any strides (priors may have stride 0) -> (B,) per-row KL sums, float32
    (float64 for float64 inputs)."""
    b, e = q_mu.shape
    rows = torch.empty((b,), dtype=accumulation_dtype(q_mu.dtype), device=q_mu.device)
    block_r, block_e, warps = tile(b, e, q_mu.device)
    _diagonal_gaussian_kl_fwd_kernel[(triton.cdiv(b, block_r),)](
        rows, rows.stride(0),
        q_mu, *_strides(q_mu), q_logvar, *_strides(q_logvar),
        p_mu, *_strides(p_mu), p_logvar, *_strides(p_logvar),
        b, e,
        ACC_DTYPE=acc_dtype(q_mu.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return rows


def diagonal_gaussian_kl_rows_bwd(grad_rows: torch.Tensor, q_mu: torch.Tensor, q_logvar: torch.Tensor,
                                  p_mu: torch.Tensor, p_logvar: torch.Tensor, *, p_mu_grad: bool,
                                  p_logvar_grad: bool, prior_grad_dtype: torch.dtype):
    """grad_rows: (B,) (may be expanded); the rest (B, E) -> grads of q_mu, q_logvar: (B, E) in
    q's dtype, and of p_mu, p_logvar: (B, E) in ``prior_grad_dtype`` (``None`` when not asked),
    left for the caller to reduce to the priors' broadcast shapes."""
    b, e = q_mu.shape
    dev = q_mu.device
    g_qmu = torch.empty((b, e), dtype=q_mu.dtype, device=dev)
    g_qlv = torch.empty((b, e), dtype=q_mu.dtype, device=dev)
    g_pmu = torch.empty((b, e), dtype=prior_grad_dtype, device=dev) if p_mu_grad else None
    g_plv = torch.empty((b, e), dtype=prior_grad_dtype, device=dev) if p_logvar_grad else None
    block_r, block_e, warps = tile(b, e, dev)
    grid = (triton.cdiv(b, block_r), triton.cdiv(e, block_e))
    _diagonal_gaussian_kl_bwd_kernel[grid](
        g_qmu, *_strides(g_qmu), g_qlv, *_strides(g_qlv),
        # An output not asked for is never written: pass a placeholder pointer with zero strides.
        g_pmu if p_mu_grad else g_qmu, *(_strides(g_pmu) if p_mu_grad else (0, 0)),
        g_plv if p_logvar_grad else g_qlv, *(_strides(g_plv) if p_logvar_grad else (0, 0)),
        grad_rows, grad_rows.stride(0),
        q_mu, *_strides(q_mu), q_logvar, *_strides(q_logvar),
        p_mu, *_strides(p_mu), p_logvar, *_strides(p_logvar),
        b, e,
        P_MU_GRAD=p_mu_grad, P_LOGVAR_GRAD=p_logvar_grad,
        ACC_DTYPE=acc_dtype(q_mu.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return g_qmu, g_qlv, g_pmu, g_plv
