"""The variational bottleneck (Gaussian head), forward and forward+backward:

- ``epilogue``: what follows the Linear layer, alone: h (B, 2E) -> z = mu + exp(logvar/2) eps and
  the KL to N(0, I). Memory-bound; minimal traffic h read, z written (forward), then grad_z and h
  read, grad_h written (backward). The Triton provider calls the epilogue kernels directly
  (``dmil_fast.kernels.variational_bottleneck``); the reference is the oracle's composition.
- ``linear``: the whole op ``variational_bottleneck(x, W, b)`` with D = E (the stage-1 heads):
  Linear (B, E) -> (B, 2E) plus the epilogue; reported in TFLOP/s of the GEMMs.
- ``grouped``: ``variational_bottleneck_grouped`` with G = 2 heads sharing x (DMIL's (tr, ir)
  and (unique, r) pairs): one (B, E) x (4E, E) GEMM and one epilogue; TFLOP/s.
"""

from __future__ import annotations

import pytest
import torch

from bench_harness import (LARGE_ROWS, assert_finite, call_memory_mb, compiled, element_size, gpu_grid, label, measure, need,
                           op_cases, record, skip_compiled_backward_on_cpu, skip_unless_available)

OP = "variational_bottleneck"
GROUPS = 2
CPU_SHAPES = [(4096, 32)]
GPU_SHAPES = gpu_grid(widths=(32, 256, 1024))
#: The epilogue case the speed-up target is judged on (bench_targets.py).
EPILOGUE_TARGETS = {"cuda": [(LARGE_ROWS, 256)]}


def _epilogue_ref():
    """h (B, 2E) -> z (B, E), mean KL to N(0, I): the eager composition of the oracles."""
    ref = need("dmil_fast.reference")
    sample, kl = ref.gaussian_sample_ref, ref.diagonal_gaussian_kl_ref

    def epilogue(h: torch.Tensor):
        e = h.shape[1] // 2
        mu, logvar = h[:, :e], h[:, e:]  # (B, E) views
        return sample(mu, logvar), kl(mu, logvar)

    return epilogue


def _epilogue_triton(h: torch.Tensor, grad_z, backward: bool):
    """The Triton epilogue kernels as the op runs them: forward, and with ``backward`` the fused
    backward for upstream grads (grad_z, d loss / d kl = 1)."""
    kernels = need("dmil_fast.kernels.variational_bottleneck")
    b, e = h.shape[0], h.shape[1] // 2
    seed = torch.zeros(1, dtype=torch.int64, device=h.device)
    grad_kl_rows = torch.full((1, 1), 1.0 / (b * e), dtype=torch.float32, device=h.device).expand(b, 1)

    def run():
        z, kl_rows = kernels.vb_epilogue_fwd(h, seed, 1, True)  # (B, 1, E), (B, 1)
        kl = (kl_rows.sum() / (b * e)).to(h.dtype)
        if not backward:
            return z.view(b, e), kl
        return kernels.vb_epilogue_bwd(None, grad_z.view(b, 1, e), grad_kl_rows, h, seed, 1), kl

    return run


def _head_fn(provider: str, grouped: bool):
    """(x, weight, bias) -> (z, mu, logvar, kl) for the provider."""
    if provider in ("reference", "compile"):
        ref = need("dmil_fast.reference")
        fn = ((lambda x, w, bias: ref.variational_bottleneck_grouped_ref(x, w, bias, GROUPS)) if grouped
              else ref.variational_bottleneck_ref)
        return compiled(fn) if provider == "compile" else fn
    ops = need("dmil_fast.ops")
    if grouped:
        return lambda x, w, bias: ops.variational_bottleneck_grouped(x, w, bias, GROUPS, backend=provider)
    return lambda x, w, bias: ops.variational_bottleneck(x, w, bias, backend=provider)


def _prepare(benchmark, variant, mode, device, dtype, shape, provider):
    skip_unless_available(OP, provider, device, dtype, benchmark)
    skip_compiled_backward_on_cpu(provider, device, mode)
    b, e = shape
    label(benchmark, op=OP, variant=f"{variant} {mode}", provider=provider, shape=f"B={b} E={e}",
          dtype=dtype, device=device)
    return torch.Generator(device=device).manual_seed(0)


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="E", targets=EPILOGUE_TARGETS))
def test_bench_vb_epilogue(benchmark, copy_bandwidth, mode, device, dtype, shape, provider):
    gen = _prepare(benchmark, "epilogue", mode, device, dtype, shape, provider)
    b, e = shape
    h = torch.cat([torch.randn(b, e, device=device, generator=gen),
                   0.5 * torch.randn(b, e, device=device, generator=gen)], dim=1).to(dtype)  # (B, 2E)
    backward = mode == "fwd+bwd"
    grad_z = torch.randn(b, e, device=device, dtype=dtype, generator=gen)
    if provider == "triton":
        run = _epilogue_triton(h, grad_z, backward)
    else:
        epilogue = compiled(_epilogue_ref()) if provider == "compile" else _epilogue_ref()
        if backward:
            h.requires_grad_(True)
            one = torch.ones((), device=device, dtype=dtype)

            def run():
                z, kl = epilogue(h)
                return torch.autograd.grad((z, kl), h, (grad_z, one))
        else:
            def run():
                return epilogue(h)

    out = measure(benchmark, run, device)
    assert_finite(out)
    nbytes = (8 if backward else 3) * b * e * element_size(dtype)
    record(benchmark, nbytes=nbytes, copy_gbps=copy_bandwidth(device) if benchmark.stats else None,
           **call_memory_mb(run, device))


def _bench_head(benchmark, grouped, mode, device, dtype, shape, provider):
    gen = _prepare(benchmark, "grouped" if grouped else "linear", mode, device, dtype, shape, provider)
    b, e = shape
    g = GROUPS if grouped else 1
    head = _head_fn(provider, grouped)
    x = torch.randn(b, e, device=device, generator=gen).to(dtype)
    weight = (torch.randn(g * 2 * e, e, device=device, generator=gen) / e ** 0.5).to(dtype)
    bias = torch.zeros(g * 2 * e, device=device, dtype=dtype)
    backward = mode == "fwd+bwd"
    if backward:
        params = (x, weight, bias)
        for t in params:
            t.requires_grad_(True)
        z_shape = (b, g, e) if grouped else (b, e)
        grad_z = torch.randn(z_shape, device=device, generator=gen).to(dtype)
        grad_kl = torch.ones((g,) if grouped else (), device=device, dtype=dtype)

        def run():
            z, _, _, kl = head(x, weight, bias)
            return torch.autograd.grad((z, kl), params, (grad_z, grad_kl))
    else:
        def run():
            return head(x, weight, bias)

    out = measure(benchmark, run, device)
    assert_finite(out)
    gemm_flops = 2 * b * e * (g * 2 * e)  # x (B, E) @ W^T (E, G*2E)
    record(benchmark, flops=(3 if backward else 1) * gemm_flops, groups=g,
           **call_memory_mb(run, device))


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="E"))
def test_bench_vb_linear(benchmark, mode, device, dtype, shape, provider):
    _bench_head(benchmark, False, mode, device, dtype, shape, provider)


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="E"))
def test_bench_vb_grouped(benchmark, mode, device, dtype, shape, provider):
    _bench_head(benchmark, True, mode, device, dtype, shape, provider)
