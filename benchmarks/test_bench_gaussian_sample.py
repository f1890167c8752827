"""gaussian_sample: z = mu + exp(logvar / 2) * eps, forward and forward+backward.

Memory-bound: the minimal traffic is mu, logvar read and z written (forward), then grad_z and
logvar read and grad_logvar written (backward; grad_mu is grad_z itself). A kernel that draws
eps in place never reads or writes it; the eager reference does, and that is the point.
Rates are reported against the device's own copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from bench_harness import (LARGE_ROWS, assert_finite, call_memory_mb, compiled, element_size, gpu_grid, label, measure, need,
                           op_cases, record, skip_compiled_backward_on_cpu, skip_unless_available)

OP = "gaussian_sample"
CPU_SHAPES = [(4096, 32)]
GPU_SHAPES = gpu_grid(widths=(32, 256, 1024))
#: The case the copy-bandwidth target is judged on (bench_targets.py).
TARGETS = {"cuda": [(LARGE_ROWS, 256)]}


def _sampler(provider: str):
    """(mu, logvar) -> z for the provider."""
    if provider in ("reference", "compile"):
        ref = need("dmil_fast.reference", "gaussian_sample_ref")
        return compiled(ref) if provider == "compile" else ref
    op = need("dmil_fast.ops", "gaussian_sample")
    return lambda mu, logvar: op(mu, logvar, backend=provider)


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="E", targets=TARGETS))
def test_bench_gaussian_sample(benchmark, copy_bandwidth, mode, device, dtype, shape, provider):
    skip_unless_available(OP, provider, device, dtype, benchmark)
    skip_compiled_backward_on_cpu(provider, device, mode)
    b, e = shape
    label(benchmark, op=OP, variant=mode, provider=provider, shape=f"B={b} E={e}", dtype=dtype, device=device)
    sample = _sampler(provider)
    gen = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(b, e, device=device, dtype=dtype, generator=gen)
    logvar = (0.5 * torch.randn(b, e, device=device, generator=gen)).to(dtype)
    backward = mode == "fwd+bwd"
    if backward:
        mu.requires_grad_(True)
        logvar.requires_grad_(True)
        grad_z = torch.randn(b, e, device=device, dtype=dtype, generator=gen)

        def run():
            z = sample(mu, logvar)
            return torch.autograd.grad(z, (mu, logvar), grad_z)
    else:
        def run():
            return sample(mu, logvar)

    out = measure(benchmark, run, device)
    assert_finite(out)
    nbytes = (6 if backward else 3) * b * e * element_size(dtype)
    record(benchmark, nbytes=nbytes, copy_gbps=copy_bandwidth(device) if benchmark.stats else None,
           **call_memory_mb(run, device))
