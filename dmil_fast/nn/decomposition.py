"""The variational heads of DMIL, run fused (dmil_fast.ops) or in plain PyTorch.

Two executions of the same computation:

- fused (``reference=False``): heads that read the same input run as one
  :func:`dmil_fast.ops.variational_bottleneck_grouped` call (projection, sample and KL in one op,
  weights concatenated on the fly). Noise comes from the op's own generator.
- plain PyTorch (``reference=True``): one ``F.linear`` per head and ``torch.randn_like`` draws
  in the order of the official model, so a run with the same torch seed reproduces it draw for
  draw. First level (:data:`DRAW_ORDERS`): stage 1 draws (m1 tr, m1 ir, m2 tr, m2 ir); stage 2
  reads the tr means and draws (m1 ir, m2 ir) only; stage 3 draws (m1 tr, m2 tr, m1 ir, m2 ir).
  Second level: the redundancy, unique-1 and unique-2 heads, then two more (B, E) draws that the
  official alignment terms make and discard.

Every KL returned here is the unweighted mean KL of DESIGN section 1 (the official model returns
them so too); the weights are applied by the training objective.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import ops
from .bottleneck import VariationalBottleneck, grouped_sample

Tensor = torch.Tensor


class HeadPair(NamedTuple):
    """The task-relevant (tr) and task-irrelevant (ir) heads of one modality.

    z_*, mu_*, logvar_*: (B, E) (views into the fused result, or the plain-PyTorch tensors with
    the official memory layout); z_cat: (B, 2E) = [z_tr, z_ir]; kl: (2,) unweighted (tr, ir).
    """

    z_tr: Tensor
    z_ir: Tensor
    mu_tr: Tensor
    mu_ir: Tensor
    z_cat: Tensor
    kl: Tensor


# ---------------------------------------------------------------- plain PyTorch pieces

def torch_project(x: Tensor, head: VariationalBottleneck) -> Tuple[Tensor, Tensor]:
    """x: (B, D) -> mu, logvar: (B, E), exactly as the official head computes them."""
    h = F.linear(x, head.fc.weight, head.fc.bias)  # (B, 2E)
    e = head.embed_size
    return h[:, :e], h[:, e:]


def torch_kl(q_mu: Tensor, q_logvar: Tensor, p_mu=0.0, p_logvar=0.0) -> Tensor:
    """Mean over every element of KL(N(q_mu, e^q_logvar) || N(p_mu, e^p_logvar)); shape ()."""
    p_mu = torch.as_tensor(p_mu, dtype=q_mu.dtype, device=q_mu.device)
    p_logvar = torch.as_tensor(p_logvar, dtype=q_logvar.dtype, device=q_logvar.device)
    delta = q_logvar - p_logvar
    sq = (q_mu - p_mu).pow(2) * torch.exp(-p_logvar)
    return 0.5 * torch.mean(-delta + torch.exp(delta) + sq - 1)


def torch_sample(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + torch.exp(logvar / 2) * torch.randn_like(mu)


# ---------------------------------------------------------------- first level

#: First-level draw orders: ``"per_modality"`` (stage 1), ``"ir_only"`` (stage 2: z_tr = mu_tr),
#: ``"tr_then_ir"`` (stage 3).
DRAW_ORDERS = ("per_modality", "ir_only", "tr_then_ir")


def first_level(pairs: Sequence[Tuple[Tensor, Tuple[VariationalBottleneck, VariationalBottleneck]]], *,
                sample: bool, reference: bool, draw: str,
                backend: Optional[str] = None, recompute: bool = False) -> List[HeadPair]:
    """Task-relevant / task-irrelevant heads of each modality.

    Args:
        pairs: per modality ``(e_m, (IB_m_tr, IB_m_ir))`` with e_m: (B, E).
        sample: draw z (training) or z = mu (eval).
        reference: plain PyTorch with the official draw order (see the module docstring).
        draw: one of :data:`DRAW_ORDERS`. ``"ir_only"`` returns z_tr = mu_tr even when sampling
            (stage 2 reads only the means of the tr heads); the other two sample both heads and
            differ in the order of the draws, which only matters if ``reference``.
        recompute: fused path: rebuild each pair's (B, 4E) projection in the backward instead of
            keeping it (``grouped_sample``); the means stay views of it.

    Returns:
        one :class:`HeadPair` per modality.
    """
    if draw not in DRAW_ORDERS:
        raise ValueError(f"draw must be one of {DRAW_ORDERS}, got {draw!r}")
    sample_tr = sample and draw != "ir_only"
    if not reference:
        out = []
        for x, heads in pairs:
            # recompute: the projection (B, 4E) is rebuilt in the backward, not kept; only the
            # means are views of it, and a caller that keeps mu_tr copies it out (DMILModel).
            z, mu, _, kl = grouped_sample(x, heads, sample=sample, backend=backend,
                                          recompute=recompute)  # (B, 2, E) ...
            z_tr = z[:, 0] if sample_tr else mu[:, 0]
            z_cat = z.reshape(z.shape[0], -1) if sample_tr else torch.cat((z_tr, z[:, 1]), dim=1)  # (B, 2E)
            out.append(HeadPair(z_tr, z[:, 1], mu[:, 0], mu[:, 1], z_cat, kl))
        return out
    projected = [[torch_project(x, head) for head in heads] for x, heads in pairs]
    modalities = range(len(pairs))
    if draw == "per_modality":
        order = [(m, h) for m in modalities for h in range(2)]
    elif draw == "tr_then_ir":
        order = [(m, h) for h in range(2) for m in modalities]
    else:
        order = [(m, 1) for m in modalities]
    zs: Dict[Tuple[int, int], Tensor] = {(m, h): projected[m][h][0] for m in modalities for h in range(2)}
    if sample:
        for m, h in order:
            zs[(m, h)] = torch_sample(*projected[m][h])
    out = []
    for m, ((mu_tr, lv_tr), (mu_ir, lv_ir)) in enumerate(projected):
        z_tr, z_ir = zs[(m, 0)], zs[(m, 1)]
        kl = torch.stack([torch_kl(mu_tr, lv_tr), torch_kl(mu_ir, lv_ir)])
        out.append(HeadPair(z_tr, z_ir, mu_tr, mu_ir, torch.cat((z_tr, z_ir), dim=1), kl))
    return out


# ---------------------------------------------------------------- second level

class SecondLevelHeads(NamedTuple):
    """Second-level Gaussians. z_*, mu_*, logvar_*: (B, E); kl_*: () unweighted."""

    z_red: Tensor
    mu_red: Tensor
    logvar_red: Tensor
    kl_red: Tensor
    z_unique_1: Tensor
    kl_unique_1: Tensor
    z_unique_2: Tensor
    kl_unique_2: Tensor
    mu_r1: Tensor
    logvar_r1: Tensor
    mu_r2: Tensor
    logvar_r2: Tensor


def second_level(model, mu_tr1: Tensor, mu_tr2: Tensor, *, sample: bool, reference: bool,
                 backend: Optional[str] = None, recompute: bool = False) -> SecondLevelHeads:
    """Redundancy head on [mu_tr1, mu_tr2], unique and alignment heads on each mu_trm.

    ``model`` holds ``IB_redundancy``, ``IB_m{1,2}_unique`` and ``IB_m{1,2}_r``.
    In the fused path the unique and alignment heads of a modality share one grouped call;
    ``recompute`` rebuilds its projection in the backward instead of keeping it.
    """
    joint = torch.cat((mu_tr1, mu_tr2), dim=1)  # (B, 2E)
    if not reference:
        # The alignment KLs keep all of the redundancy head's projection: nothing to recompute.
        z_red, mu_red, lv_red, kl_red = model.IB_redundancy.sample(joint, sample=sample, backend=backend)
        # Unique and alignment heads. The unique samples are copied out, so the alignment heads'
        # samples (never used) do not stay alive beside them. With recompute the projection
        # (B, 4E) is rebuilt in the backward, and the part of it that is used (the alignment
        # means and log-variances) is copied out too, so it does not stay alive either.
        g1 = grouped_sample(mu_tr1, (model.IB_m1_unique, model.IB_m1_r), sample=sample, backend=backend,
                            recompute=recompute)
        g2 = grouped_sample(mu_tr2, (model.IB_m2_unique, model.IB_m2_r), sample=sample, backend=backend,
                            recompute=recompute)
        align = [g1[1][:, 1], g1[2][:, 1], g2[1][:, 1], g2[2][:, 1]]  # mu_r1, lv_r1, mu_r2, lv_r2
        if recompute:
            align = [t.contiguous() for t in align]
        return SecondLevelHeads(z_red, mu_red, lv_red, kl_red,
                                g1[0][:, 0].contiguous(), g1[3][0], g2[0][:, 0].contiguous(), g2[3][0],
                                *align)
    mu_red, lv_red = torch_project(joint, model.IB_redundancy)
    mu_u1, lv_u1 = torch_project(mu_tr1, model.IB_m1_unique)
    mu_u2, lv_u2 = torch_project(mu_tr2, model.IB_m2_unique)
    mu_r1, lv_r1 = torch_project(mu_tr1, model.IB_m1_r)
    mu_r2, lv_r2 = torch_project(mu_tr2, model.IB_m2_r)
    if sample:
        z_red = torch_sample(mu_red, lv_red)
        z_u1 = torch_sample(mu_u1, lv_u1)
        z_u2 = torch_sample(mu_u2, lv_u2)
        torch.randn_like(mu_red)  # the two draws the official alignment terms make and discard
        torch.randn_like(mu_red)
    else:
        z_red, z_u1, z_u2 = mu_red, mu_u1, mu_u2
    return SecondLevelHeads(z_red, mu_red, lv_red, torch_kl(mu_red, lv_red),
                            z_u1, torch_kl(mu_u1, lv_u1), z_u2, torch_kl(mu_u2, lv_u2),
                            mu_r1, lv_r1, mu_r2, lv_r2)


def align_kl(heads: SecondLevelHeads, m: int, *, reference: bool, backend: Optional[str] = None) -> Tensor:
    """KL(q(R | M1, M2) || q(R | M_m)), unweighted, shape ()."""
    p_mu, p_lv = (heads.mu_r1, heads.logvar_r1) if m == 1 else (heads.mu_r2, heads.logvar_r2)
    if reference:
        return torch_kl(heads.mu_red, heads.logvar_red, p_mu, p_lv)
    return ops.diagonal_gaussian_kl(heads.mu_red, heads.logvar_red, p_mu, p_lv, backend=backend)


def recon_loss(x: Tensor, x_hat: Tensor, *, reference: bool) -> Tensor:
    """||x - x_hat||_F^2 / (B * E), shape (1,) as the official model returns it."""
    if reference:
        return (torch.norm(x - x_hat) ** 2 / (x.size(0) * x.size(1))).unsqueeze(0)
    return F.mse_loss(x_hat, x, reduction="mean").unsqueeze(0)
