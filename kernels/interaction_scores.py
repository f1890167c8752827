"""Triton kernels for the per-sample interaction scores (LSMI / MMI redundancy).

Same contract as the C++ ops ``dmil_fast::interaction_scores{,_backward}``:

    i_k = log softmax(logits_k)[y] - log_prior[y]          (log_prior = log(1/C) when absent)
    r   = min(h1, h2) - min(h1 - i1, h2 - i2)  (lsmi)  or  min(i1, i2)  (mmi); ties take the first
    scores (B, 7) = [i1, i2, i12, r, i1 - r, i2 - r, i12 - r - u1 - u2],  lse (B, 3) float64

The forward gives each program BLOCK_R rows and walks the three logit rows once in BLOCK_C
column tiles with an online log-sum-exp; the backward is a 2-D grid over (rows, column tiles)
that recomputes the per-row chain-rule factors (seven numbers) in every column tile. A label
outside [0, C) is never used as an address: that row's outputs are NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import accumulation_dtype
from .gaussian_sample import acc_dtype, tile


@triton.jit
def _row_lse(ptr, stride_b, stride_c, rows64, row_mask, C,
             ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(max, sum of exp(x - max)) of BLOCK_R rows; masked lanes read -inf and add nothing."""
    run_max = tl.full((BLOCK_R,), float("-inf"), dtype=ACC_DTYPE)
    run_sum = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols[None, :] < C)
        x = tl.load(ptr + rows64[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_c,
                    mask=mask, other=float("-inf")).to(ACC_DTYPE)
        new_max = tl.maximum(run_max, tl.max(x, axis=1))
        # All -inf so far: shift by 0, so no -inf - -inf arises and a NaN still reaches the sum.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max).to(ACC_DTYPE)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        run_max = new_max
    return run_max, run_sum


@triton.jit
def _interaction_scores_fwd_kernel(
    scores_ptr, lse_ptr,
    l1_ptr, stride_l1b, stride_l1c,
    l2_ptr, stride_l2b, stride_l2c,
    l12_ptr, stride_l12b, stride_l12c,
    labels_ptr, stride_y,
    h1_ptr, stride_h1, h2_ptr, stride_h2,
    prior_ptr, stride_prior,
    B, C, log_c,
    LSMI: tl.constexpr, HAS_PRIOR: tl.constexpr, SAVE_LSE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(labels_ptr + rows64 * stride_y, mask=row_mask, other=0)
    valid = (y >= 0) & (y < C)
    safe_y = tl.where(valid, y, 0).to(tl.int64)
    load_mask = row_mask & valid
    if HAS_PRIOR:
        log_prior_y = tl.load(prior_ptr + safe_y * stride_prior, mask=load_mask, other=0.0).to(ACC_DTYPE)
    else:
        log_prior_y = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE) - log_c
    m1, s1 = _row_lse(l1_ptr, stride_l1b, stride_l1c, rows64, load_mask, C, ACC_DTYPE, BLOCK_R, BLOCK_C)
    m2, s2 = _row_lse(l2_ptr, stride_l2b, stride_l2c, rows64, load_mask, C, ACC_DTYPE, BLOCK_R, BLOCK_C)
    m3, s3 = _row_lse(l12_ptr, stride_l12b, stride_l12c, rows64, load_mask, C, ACC_DTYPE, BLOCK_R, BLOCK_C)
    x1 = tl.load(l1_ptr + rows64 * stride_l1b + safe_y * stride_l1c, mask=load_mask, other=0.0).to(ACC_DTYPE)
    x2 = tl.load(l2_ptr + rows64 * stride_l2b + safe_y * stride_l2c, mask=load_mask, other=0.0).to(ACC_DTYPE)
    x3 = tl.load(l12_ptr + rows64 * stride_l12b + safe_y * stride_l12c, mask=load_mask, other=0.0).to(ACC_DTYPE)
    # Rows past B or with a bad label summed nothing; log(1) keeps them quiet (they store NaN).
    log_s1 = tl.log(tl.where(load_mask, s1, 1.0))
    log_s2 = tl.log(tl.where(load_mask, s2, 1.0))
    log_s3 = tl.log(tl.where(load_mask, s3, 1.0))
    m1 = tl.where(load_mask, m1, 0.0)
    m2 = tl.where(load_mask, m2, 0.0)
    m3 = tl.where(load_mask, m3, 0.0)
    i1 = ((x1 - m1) - log_s1) - log_prior_y
    i2 = ((x2 - m2) - log_s2) - log_prior_y
    i12 = ((x3 - m3) - log_s3) - log_prior_y
    if LSMI:
        h1 = tl.load(h1_ptr + rows64 * stride_h1, mask=row_mask, other=0.0).to(ACC_DTYPE)
        h2 = tl.load(h2_ptr + rows64 * stride_h2, mask=row_mask, other=0.0).to(ACC_DTYPE)
        d1 = h1 - i1
        d2 = h2 - i2
        r = tl.where(h1 <= h2, h1, h2) - tl.where(d1 <= d2, d1, d2)
    else:
        r = tl.where(i1 <= i2, i1, i2)
    u1 = i1 - r
    u2 = i2 - r
    syn = i12 - r - u1 - u2
    nan = float("nan")
    out_ty = scores_ptr.dtype.element_ty
    base = scores_ptr + rows64 * 7
    tl.store(base + 0, tl.where(valid, i1, nan).to(out_ty), mask=row_mask)
    tl.store(base + 1, tl.where(valid, i2, nan).to(out_ty), mask=row_mask)
    tl.store(base + 2, tl.where(valid, i12, nan).to(out_ty), mask=row_mask)
    tl.store(base + 3, tl.where(valid, r, nan).to(out_ty), mask=row_mask)
    tl.store(base + 4, tl.where(valid, u1, nan).to(out_ty), mask=row_mask)
    tl.store(base + 5, tl.where(valid, u2, nan).to(out_ty), mask=row_mask)
    tl.store(base + 6, tl.where(valid, syn, nan).to(out_ty), mask=row_mask)
    # The lse in float64: the sum of the maximum and the log-sum is exact there, where rounding it
    # to float32 would cost the backward's softmax a relative error of half an ulp of the maximum.
    # Not written for a forward that no backward follows.
    if SAVE_LSE:
        lse_base = lse_ptr + rows64 * 3
        tl.store(lse_base + 0, tl.where(valid, m1.to(tl.float64) + log_s1.to(tl.float64), nan), mask=row_mask)
        tl.store(lse_base + 1, tl.where(valid, m2.to(tl.float64) + log_s2.to(tl.float64), nan), mask=row_mask)
        tl.store(lse_base + 2, tl.where(valid, m3.to(tl.float64) + log_s3.to(tl.float64), nan), mask=row_mask)


@triton.jit
def _store_row_grad(out_ptrs, logits_ptr, stride_b, stride_c, lse_ptrs, rows64, cols, y, valid,
                    g, row_mask, mask, ACC_DTYPE: tl.constexpr):
    """out = g * (onehot(y) - softmax(x)) for one (BLOCK_R, BLOCK_C) tile; NaN for bad labels.
    exp(x - lse) is taken as exp(-lo) exp(x - hi), hi the float64 lse rounded to ACC_DTYPE and lo
    the rest (x - hi is exact for the large terms; an infinite lse keeps lo = 0)."""
    lse = tl.load(lse_ptrs, mask=row_mask, other=0.0)
    hi = lse.to(ACC_DTYPE)
    rest = lse - hi.to(tl.float64)
    lo = tl.where(rest == rest, rest, 0.0).to(ACC_DTYPE)  # NaN (inf - inf) -> 0
    x = tl.load(logits_ptr + rows64[:, None] * stride_b + cols[None, :].to(tl.int64) * stride_c,
                mask=mask, other=0.0).to(ACC_DTYPE)
    neg = -((g * tl.exp(-lo))[:, None] * tl.exp(x - hi[:, None]))
    out = tl.where(cols[None, :] == y[:, None], g[:, None] + neg, neg)
    out = tl.where(valid[:, None], out, float("nan"))
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _interaction_scores_bwd_kernel(
    g1_ptr, g2_ptr, g12_ptr, g_entropy_ptr,
    grad_ptr, stride_gb, stride_gc,
    scores_ptr, stride_sb, stride_sc,
    lse_ptr,
    l1_ptr, stride_l1b, stride_l1c,
    l2_ptr, stride_l2b, stride_l2c,
    l12_ptr, stride_l12b, stride_l12c,
    labels_ptr, stride_y,
    h1_ptr, stride_h1, h2_ptr, stride_h2,
    B, C,
    LSMI: tl.constexpr, REBUILD_PMI: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    y = tl.load(labels_ptr + rows64 * stride_y, mask=row_mask, other=0)
    valid = (y >= 0) & (y < C)
    g_base = grad_ptr + rows64 * stride_gb
    g_p1 = tl.load(g_base, mask=row_mask, other=0.0).to(ACC_DTYPE)
    g_p2 = tl.load(g_base + stride_gc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    g_p12 = tl.load(g_base + 2 * stride_gc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    g_r = tl.load(g_base + 3 * stride_gc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    g_u1 = tl.load(g_base + 4 * stride_gc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    g_u2 = tl.load(g_base + 5 * stride_gc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    g_s = tl.load(g_base + 6 * stride_gc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    # The min branches are re-decided from the pmis: the saved scores for float32 and float64 (the
    # forward's own values); for float16 and bfloat16 (REBUILD_PMI), whose saved scores are rounded
    # alike near a tie, log p(y) = x_y - lse rebuilt from the label logits (without the prior,
    # which shifts both pmis alike: the branches compare differences). r collects
    # G = g_r - g_u1 - g_u2 + g_s and passes it to the chosen arguments.
    if REBUILD_PMI:
        safe_y = tl.where(valid, y, 0).to(tl.int64)
        y_mask = row_mask & valid
        x1 = tl.load(l1_ptr + rows64 * stride_l1b + safe_y * stride_l1c, mask=y_mask, other=0.0)
        x2 = tl.load(l2_ptr + rows64 * stride_l2b + safe_y * stride_l2c, mask=y_mask, other=0.0)
        lse1 = tl.load(lse_ptr + rows64 * 3, mask=row_mask, other=0.0)
        lse2 = tl.load(lse_ptr + rows64 * 3 + 1, mask=row_mask, other=0.0)
        i1 = (x1.to(ACC_DTYPE).to(tl.float64) - lse1).to(ACC_DTYPE)
        i2 = (x2.to(ACC_DTYPE).to(tl.float64) - lse2).to(ACC_DTYPE)
    else:
        i1 = tl.load(scores_ptr + rows64 * stride_sb, mask=row_mask, other=0.0).to(ACC_DTYPE)
        i2 = tl.load(scores_ptr + rows64 * stride_sb + stride_sc, mask=row_mask, other=0.0).to(ACC_DTYPE)
    big_g = g_r - g_u1 - g_u2 + g_s
    zero = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    if LSMI:
        h1 = tl.load(h1_ptr + rows64 * stride_h1, mask=row_mask, other=0.0).to(ACC_DTYPE)
        h2 = tl.load(h2_ptr + rows64 * stride_h2, mask=row_mask, other=0.0).to(ACC_DTYPE)
        first_h = h1 <= h2
        first_d = (h1 - i1) <= (h2 - i2)
        to_i1 = tl.where(first_d, big_g, zero)
        to_i2 = tl.where(first_d, zero, big_g)
        differ = first_h != first_d
        g_h1 = tl.where(differ, tl.where(first_h, big_g, -big_g), zero)
        g_h2 = tl.where(differ, tl.where(first_h, -big_g, big_g), zero)
        if tl.program_id(1) == 0:
            tl.store(g_entropy_ptr + rows64 * 2, tl.where(valid, g_h1, float("nan")), mask=row_mask)
            tl.store(g_entropy_ptr + rows64 * 2 + 1, tl.where(valid, g_h2, float("nan")),
                     mask=row_mask)
    else:
        first_i = i1 <= i2
        to_i1 = tl.where(first_i, big_g, zero)
        to_i2 = tl.where(first_i, zero, big_g)
    g_i1 = g_p1 + g_u1 - g_s + to_i1
    g_i2 = g_p2 + g_u2 - g_s + to_i2
    g_i12 = g_p12 + g_s
    mask = row_mask[:, None] & (cols[None, :] < C)
    offs = rows64[:, None] * C + cols[None, :].to(tl.int64)  # outputs are contiguous (B, C)
    _store_row_grad(g1_ptr + offs, l1_ptr, stride_l1b, stride_l1c, lse_ptr + rows64 * 3, rows64,
                    cols, y, valid, g_i1, row_mask, mask, ACC_DTYPE)
    _store_row_grad(g2_ptr + offs, l2_ptr, stride_l2b, stride_l2c, lse_ptr + rows64 * 3 + 1,
                    rows64, cols, y, valid, g_i2, row_mask, mask, ACC_DTYPE)
    _store_row_grad(g12_ptr + offs, l12_ptr, stride_l12b, stride_l12c, lse_ptr + rows64 * 3 + 2,
                    rows64, cols, y, valid, g_i12, row_mask, mask, ACC_DTYPE)


def interaction_scores_fwd(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, log_prior,
                           redundancy: int, save_lse: bool = True):
    """logits_*: (B, C) any strides, one dtype; labels: (B,) int64; entropy_*: (B,) in the
    accumulation dtype (float32, float64 for float64 logits), used when redundancy == 0 (lsmi);
    log_prior: (C,) in that dtype or None -> scores (B, 7) in the logits dtype, lse (B, 3) float64
    ((0, 3), nothing written, when not ``save_lse``)."""
    b, c = logits_1.shape
    dev = logits_1.device
    scores = torch.empty((b, 7), dtype=logits_1.dtype, device=dev)
    lse = torch.empty((b if save_lse else 0, 3), dtype=torch.float64, device=dev)
    if b == 0:
        return scores, lse
    lsmi = redundancy == 0
    h1 = entropy_1 if lsmi else scores  # unread stand-ins for absent inputs
    h2 = entropy_2 if lsmi else scores
    prior = log_prior if log_prior is not None else scores
    block_r, block_c, warps = tile(b, c, dev)
    _interaction_scores_fwd_kernel[(triton.cdiv(b, block_r),)](
        scores, lse if save_lse else scores,  # not written without save_lse
        logits_1, *logits_1.stride(), logits_2, *logits_2.stride(), logits_12, *logits_12.stride(),
        labels, labels.stride(0), h1, h1.stride(0), h2, h2.stride(0), prior, prior.stride(0),
        b, c, math.log(c),
        LSMI=lsmi, HAS_PRIOR=log_prior is not None, SAVE_LSE=save_lse, ACC_DTYPE=acc_dtype(logits_1.dtype),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return scores, lse


def interaction_scores_bwd(grad_scores, scores, lse, logits_1, logits_2, logits_12, labels,
                           entropy_1, entropy_2, redundancy: int):
    """grad_scores, scores: (B, 7) any strides; lse: (B, 3) float64; the rest as in the forward
    -> grads of the three logits (B, C) contiguous in their dtype and of (h1, h2): (B, 2)."""
    b, c = logits_1.shape
    dev = logits_1.device
    grads = [torch.empty((b, c), dtype=logits_1.dtype, device=dev) for _ in range(3)]
    g_entropy = torch.zeros((b, 2), dtype=accumulation_dtype(logits_1.dtype), device=dev)
    if b == 0:
        return (*grads, g_entropy)
    lsmi = redundancy == 0
    h1 = entropy_1 if lsmi else lse
    h2 = entropy_2 if lsmi else lse
    lse = lse.contiguous()
    block_r, block_c, warps = tile(b, c, dev)
    _interaction_scores_bwd_kernel[(triton.cdiv(b, block_r), triton.cdiv(c, block_c))](
        *grads, g_entropy,
        grad_scores, *grad_scores.stride(), scores, *scores.stride(), lse,
        logits_1, *logits_1.stride(), logits_2, *logits_2.stride(), logits_12, *logits_12.stride(),
        labels, labels.stride(0), h1, h1.stride(0), h2, h2.stride(0),
        b, c,
        LSMI=lsmi, REBUILD_PMI=logits_1.dtype in (torch.float16, torch.bfloat16),
        ACC_DTYPE=acc_dtype(logits_1.dtype), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return (*grads, g_entropy)
