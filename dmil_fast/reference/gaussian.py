"""Reference (pure PyTorch) Gaussian ops: reparameterised sampling, diagonal-Gaussian KL,
and the variational bottleneck (Linear -> (mu, logvar) -> sample + KL to N(0, I)).

Low-precision inputs are computed in float32 and cast back, as the fused kernels do.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Number = Union[float, int]


def _opmath(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def gaussian_sample_ref(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                        *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps.

    ``eps`` defaults to ``torch.randn_like(mu)`` (drawn from ``generator`` when given), the
    draw the official model makes, so with the same torch seed this reproduces it.
    """
    if eps is None:
        if generator is None:
            eps = torch.randn_like(mu)
        else:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    out = _opmath(mu) + torch.exp(_opmath(logvar) * 0.5) * _opmath(eps)
    return out.to(mu.dtype)


def diagonal_gaussian_kl_ref(q_mu: torch.Tensor, q_logvar: torch.Tensor,
                             p_mu: Union[torch.Tensor, Number] = 0.0,
                             p_logvar: Union[torch.Tensor, Number] = 0.0,
                             reduction: str = "mean") -> torch.Tensor:
    """KL(N(q_mu, exp(q_logvar)) || N(p_mu, exp(p_logvar))) elementwise, then reduced.

    ``reduction``: "mean" over every element (the official definition), "sum" over every
    element, or "none": one value per row, the mean over the last dimension (so that
    ``kl(..., reduction="none").mean() == kl(...)``).
    """
    qm, ql = _opmath(q_mu), _opmath(q_logvar)
    pm = torch.as_tensor(p_mu, dtype=qm.dtype, device=qm.device)
    pl = torch.as_tensor(p_logvar, dtype=ql.dtype, device=ql.device)
    pm, pl = _opmath(pm), _opmath(pl)
    delta = ql - pl
    elem = 0.5 * (-delta + torch.exp(delta) + (qm - pm).pow(2) * torch.exp(-pl) - 1.0)
    if reduction == "mean":
        out = elem.mean()
    elif reduction == "sum":
        out = elem.sum()
    elif reduction == "none":
        out = elem.mean(dim=-1)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return out.to(q_mu.dtype)


def variational_bottleneck_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               *, sample: bool = True, eps: Optional[torch.Tensor] = None,
                               generator: Optional[torch.Generator] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, D), weight: (2E, D), bias: (2E,) -> z, mu, logvar: (B, E); kl: () mean over (B, E)."""
    h = torch.nn.functional.linear(x, weight, bias)  # (B, 2E)
    e = h.shape[-1] // 2
    mu, logvar = h[..., :e], h[..., e:]
    kl = diagonal_gaussian_kl_ref(mu, logvar)
    z = gaussian_sample_ref(mu, logvar, eps, generator=generator) if sample else mu
    return z, mu, logvar, kl


def variational_bottleneck_grouped_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                       groups: int, *, sample: bool = True,
                                       eps: Optional[torch.Tensor] = None,
                                       generator: Optional[torch.Generator] = None):
    """``groups`` heads sharing the input x: weight (G*2E, D) is the heads' weights stacked
    (head g owns rows [2E*g, 2E*(g+1))); returns z, mu, logvar: (B, G, E) and kl: (G,), each
    head's KL mean. ``eps``, if given, is (B, G, E); otherwise heads draw in head order, each
    ``randn_like`` its (B, E) mean, as separate heads called one after another would.
    """
    h = torch.nn.functional.linear(x, weight, bias)  # (B, G*2E)
    b = h.shape[0]
    h = h.view(b, groups, -1)  # (B, G, 2E)
    e = h.shape[-1] // 2
    mu, logvar = h[..., :e], h[..., e:]  # (B, G, E) each
    # Per-head mean in float32 (or float64), rounded once to the input dtype.
    kl = diagonal_gaussian_kl_ref(_opmath(mu).transpose(0, 1), _opmath(logvar).transpose(0, 1),
                                  reduction="none").mean(dim=-1).to(x.dtype)  # (G,)
    if not sample:
        return mu, mu, logvar, kl
    zs = []
    for g in range(groups):
        eps_g = None if eps is None else eps[:, g]
        zs.append(gaussian_sample_ref(mu[:, g], logvar[:, g], eps_g, generator=generator))
    return torch.stack(zs, dim=1), mu, logvar, kl
