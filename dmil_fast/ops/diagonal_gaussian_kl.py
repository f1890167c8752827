"""diagonal_gaussian_kl (minimal version: reference backend only)."""

from __future__ import annotations

from typing import Optional

from ..reference.gaussian import diagonal_gaussian_kl_ref


def diagonal_gaussian_kl(q_mu, q_logvar, p_mu=0.0, p_logvar=0.0, reduction: str = "mean", *,
                         backend: Optional[str] = None):
    return diagonal_gaussian_kl_ref(q_mu, q_logvar, p_mu, p_logvar, reduction)
