"""Cross-entropy of (B, C) logits, forward+backward: ``F.cross_entropy`` (``reference``) against
``dmil_fast.train.lean_cross_entropy`` (``dmil_fast``), which ``dmil_loss`` uses for the four
parts' logits of stages 2 and 3.

The lean one keeps the logits for the backward instead of a (B, C) log-softmax and recomputes
the log-softmax there: less memory where the logits are kept anyway (``kept_mb``: what the
forward leaves allocated for the backward, the logits excluded), one more pass over the logits in
the backward (the time measured here). Minimal traffic: the logits read in the forward, read again
and their gradient written in the backward. bfloat16 cases run under autocast, as DMIL's
``--amp bf16`` training does (both providers then reduce in float32).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench_harness import (assert_finite, call_memory_mb, element_size, gpu_grid, label, measure, need, op_cases,
                           record, release_flush_buffer, synchronize)

OP = "cross_entropy"
PROVIDERS = ("reference", "dmil_fast")
CPU_SHAPES = [(4096, 309)]
GPU_SHAPES = [s for s in gpu_grid(widths=(309, 1000)) if s[0] >= 4096]


def _loss(provider: str):
    if provider == "reference":
        return torch.nn.functional.cross_entropy
    return need("dmil_fast.train", "lean_cross_entropy")


def _autocast(device: str, dtype: torch.dtype):
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="C", modes=("fwd+bwd",), providers=PROVIDERS))
def test_bench_cross_entropy(benchmark, copy_bandwidth, mode, device, dtype, shape, provider):
    b, c = shape
    label(benchmark, op=OP, variant=mode, provider=provider, shape=f"B={b} C={c}", dtype=dtype, device=device)
    loss_fn = _loss(provider)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (4 * torch.randn(b, c, device=device, generator=gen)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, c, (b,), device=device, generator=gen)

    def forward():
        with _autocast(device, dtype):
            return loss_fn(logits, labels)

    def run():
        return torch.autograd.grad(forward(), logits)

    out = measure(benchmark, run, device)
    assert_finite(out)
    record(benchmark, nbytes=3 * b * c * element_size(dtype),
           copy_gbps=copy_bandwidth(device) if benchmark.stats else None,
           kept_mb=_kept_mb(forward, device), **call_memory_mb(run, device))


def _kept_mb(forward, device: str):
    """What the forward leaves allocated for the backward, the loss included (CUDA only)."""
    if device != "cuda":
        return None
    release_flush_buffer()
    synchronize(device)
    before = torch.cuda.memory_allocated()
    loss = forward()
    synchronize(device)
    kept = torch.cuda.memory_allocated() - before
    del loss
    return kept / 2**20
