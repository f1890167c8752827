"""diagonal_gaussian_kl with tensor priors (DMIL's alignment terms KL(q(R|M1,M2) || q(R|M_m))),
reduction "mean", forward and forward+backward.

Memory-bound: the minimal traffic is the four (B, E) inputs read (forward), then read again and
the four gradients written (backward). Rates are reported against the device's copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from bench_harness import (LARGE_ROWS, assert_finite, call_memory_mb, compiled, element_size, gpu_grid, label, measure, need,
                           op_cases, record, skip_compiled_backward_on_cpu, skip_unless_available)

OP = "diagonal_gaussian_kl"
CPU_SHAPES = [(4096, 32)]
GPU_SHAPES = gpu_grid(widths=(32, 256, 1024))
#: The case the copy-bandwidth target is judged on (bench_targets.py).
TARGETS = {"cuda": [(LARGE_ROWS, 256)]}


def _kl(provider: str):
    """(q_mu, q_logvar, p_mu, p_logvar) -> mean KL for the provider."""
    if provider in ("reference", "compile"):
        ref = need("dmil_fast.reference", "diagonal_gaussian_kl_ref")
        return compiled(ref) if provider == "compile" else ref
    op = need("dmil_fast.ops", "diagonal_gaussian_kl")
    return lambda q_mu, q_logvar, p_mu, p_logvar: op(q_mu, q_logvar, p_mu, p_logvar, backend=provider)


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="E", targets=TARGETS))
def test_bench_diagonal_gaussian_kl(benchmark, copy_bandwidth, mode, device, dtype, shape, provider):
    skip_unless_available(OP, provider, device, dtype, benchmark)
    skip_compiled_backward_on_cpu(provider, device, mode)
    b, e = shape
    label(benchmark, op=OP, variant=mode, provider=provider, shape=f"B={b} E={e}", dtype=dtype, device=device)
    kl = _kl(provider)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [(scale * torch.randn(b, e, device=device, generator=gen)).to(dtype)
              for scale in (1.0, 0.5, 1.0, 0.5)]  # q_mu, q_logvar, p_mu, p_logvar
    backward = mode == "fwd+bwd"
    if backward:
        for t in inputs:
            t.requires_grad_(True)

        def run():
            return torch.autograd.grad(kl(*inputs), inputs)
    else:
        def run():
            return kl(*inputs)

    out = measure(benchmark, run, device)
    assert_finite(out)
    nbytes = (12 if backward else 4) * b * e * element_size(dtype)
    record(benchmark, nbytes=nbytes, copy_gbps=copy_bandwidth(device) if benchmark.stats else None,
           **call_memory_mb(run, device))
