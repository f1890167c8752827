"""Reference (pure PyTorch) per-sample interaction scores (LSMI) and the dataset-level shift.

Conventions shared with the fused kernels:
- pmi_k = log softmax(logits_k)[y] - log_prior[y], log_prior = log(1/C) when not given.
- min(a, b) takes ``a`` when a <= b (ties go to the first argument, and so does the gradient).
- "lsmi": r = min(h1, h2) - min(h1 - i1, h2 - i2); "mmi": r = min(i1, i2).
- u1 = i1 - r, u2 = i2 - r, s = i12 - r - u1 - u2.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class InteractionScores(NamedTuple):
    """Per-sample pointwise quantities in nats, each (B,)."""

    pmi_1: torch.Tensor
    pmi_2: torch.Tensor
    pmi_12: torch.Tensor
    redundancy: torch.Tensor
    unique_1: torch.Tensor
    unique_2: torch.Tensor
    synergy: torch.Tensor

    def means(self) -> dict:
        """Dataset-level means of the four interaction components (floats)."""
        return {
            "redundancy": float(self.redundancy.float().mean()),
            "unique_1": float(self.unique_1.float().mean()),
            "unique_2": float(self.unique_2.float().mean()),
            "synergy": float(self.synergy.float().mean()),
        }


def _first_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a <= b, a, b)


def _pmi(logits: torch.Tensor, labels: torch.Tensor, log_prior: Optional[torch.Tensor]) -> torch.Tensor:
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(x, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if log_prior is None:
        return log_p + math.log(x.shape[-1])
    lp = log_prior.to(dtype=x.dtype, device=x.device)
    return log_p - lp[labels.long()]


def interaction_scores_ref(logits_1: torch.Tensor, logits_2: torch.Tensor, logits_12: torch.Tensor,
                           labels: torch.Tensor, *, entropy_1: Optional[torch.Tensor] = None,
                           entropy_2: Optional[torch.Tensor] = None,
                           log_prior: Optional[torch.Tensor] = None,
                           redundancy: str = "lsmi") -> InteractionScores:
    """logits_*: (B, C), labels: (B,) int, entropy_*: (B,) (required for "lsmi"), log_prior: (C,)."""
    i1 = _pmi(logits_1, labels, log_prior)
    i2 = _pmi(logits_2, labels, log_prior)
    i12 = _pmi(logits_12, labels, log_prior)
    if redundancy == "lsmi":
        if entropy_1 is None or entropy_2 is None:
            raise ValueError("redundancy='lsmi' needs entropy_1 and entropy_2 (pointwise entropies, (B,))")
        h1 = entropy_1.to(i1.dtype)
        h2 = entropy_2.to(i1.dtype)
        r = _first_min(h1, h2) - _first_min(h1 - i1, h2 - i2)
    elif redundancy == "mmi":
        r = _first_min(i1, i2)
    else:
        raise ValueError(f"redundancy must be 'lsmi' or 'mmi', got {redundancy!r}")
    u1 = i1 - r
    u2 = i2 - r
    s = i12 - r - u1 - u2
    out_dtype = logits_1.dtype
    return InteractionScores(*(t.to(out_dtype) for t in (i1, i2, i12, r, u1, u2, s)))


def adjust_interactions_ref(scores: InteractionScores) -> InteractionScores:
    """Dataset-level shift: if mean R < 0 or mean S < 0, c = -min(mean R, mean S); elif mean U1 < 0
    or mean U2 < 0, c = min(mean U1, mean U2); else c = 0. Then r += c, s += c, u1 -= c, u2 -= c."""
    rm = scores.redundancy.double().mean()
    sm = scores.synergy.double().mean()
    u1m = scores.unique_1.double().mean()
    u2m = scores.unique_2.double().mean()
    if rm < 0 or sm < 0:
        c = -torch.minimum(rm, sm)
    elif u1m < 0 or u2m < 0:
        c = torch.minimum(u1m, u2m)
    else:
        c = torch.zeros((), dtype=torch.float64)
    c = float(c)
    return scores._replace(
        redundancy=scores.redundancy + c,
        synergy=scores.synergy + c,
        unique_1=scores.unique_1 - c,
        unique_2=scores.unique_2 - c,
    )
