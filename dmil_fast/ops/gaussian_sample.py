"""gaussian_sample: reparameterised sample z = mu + exp(logvar / 2) * eps.

(Minimal version: reference backend only; the Triton backend lands beside it.)
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference.gaussian import gaussian_sample_ref


def gaussian_sample(mu: torch.Tensor, logvar: torch.Tensor, *, seed: Optional[int] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    gen = None
    if seed is not None:
        gen = torch.Generator(device=mu.device).manual_seed(int(seed))
    return gaussian_sample_ref(mu, logvar, generator=gen)
