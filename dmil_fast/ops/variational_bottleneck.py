"""variational_bottleneck (minimal version: reference backend only)."""

from __future__ import annotations

from typing import Optional

import torch

from ..reference.gaussian import variational_bottleneck_grouped_ref, variational_bottleneck_ref


def _gen(x, seed):
    return None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))


def variational_bottleneck(x, weight, bias, *, sample: bool = True, seed: Optional[int] = None,
                           backend: Optional[str] = None):
    return variational_bottleneck_ref(x, weight, bias, sample=sample, generator=_gen(x, seed))


def variational_bottleneck_grouped(x, weight, bias, groups: int, *, sample: bool = True,
                                   seed: Optional[int] = None, backend: Optional[str] = None):
    return variational_bottleneck_grouped_ref(x, weight, bias, groups, sample=sample, generator=_gen(x, seed))
