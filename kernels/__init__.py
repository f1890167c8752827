"""Triton kernels of dmil_fast (installed as dmil_fast.kernels). They know only tensors.

This module itself imports no Triton, so the ops can share its helpers on machines without it.
"""

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute and keep per-row results in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
