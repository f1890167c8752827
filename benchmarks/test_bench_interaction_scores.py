"""interaction_scores (LSMI redundancy, pointwise entropies and a log prior given), forward and
forward+backward; providers ``reference``, ``compile``, ``cpp`` (CPU) and ``cuda`` (GPU).

The fused providers are timed through the public op as a user calls it, its input checks included
(the label range and a NaN check: on CUDA one host sync per call, after the launch); ``reference``
and ``compile`` are the bare PyTorch function, which checks nothing. The ratios are therefore those
a user gets, the cost of the checks counted against the fused providers.

Memory-bound: the minimal traffic is the three (B, C) logits read, plus per row the label, two
float32 entropies and seven outputs (forward); the backward reads the seven output grads and the
logits again and writes the three logits' grads and the entropies' grads. Rates are reported
against the device's copy bandwidth.
"""

from __future__ import annotations

import pytest
import torch

from bench_harness import (LARGE_ROWS, assert_finite, call_memory_mb, compiled, element_size, gpu_grid, label, measure, need,
                           op_cases, record, skip_compiled_backward_on_cpu, skip_unless_available)

OP = "interaction_scores"
CPU_SHAPES = [(4096, 6), (65536, 6), (4096, 309), (4096, 1000)]
CPU_COMPILE_SHAPE = (4096, 309)
GPU_SHAPES = gpu_grid(widths=(6, 309, 1000))
#: The cases the scoring targets are judged on (bench_targets.py): every CPU shape (C++ vs the
#: reference) and 1M rows of CREMA-D's and VGGSound's class counts on the GPU.
TARGETS = {"cpu": CPU_SHAPES, "cuda": [(LARGE_ROWS, 6), (LARGE_ROWS, 309)]}


def _scorer(provider: str):
    if provider in ("reference", "compile"):
        ref = need("dmil_fast.reference", "interaction_scores_ref")
        return compiled(ref) if provider == "compile" else ref
    op = need("dmil_fast.ops", "interaction_scores")
    return lambda *args, **kwargs: op(*args, backend=provider, **kwargs)


def _bytes(b: int, c: int, s: int, backward: bool) -> int:
    fwd = 3 * b * c * s + b * (8 + 2 * 4 + 7 * s)
    bwd = 6 * b * c * s + b * (8 + 7 * s + 2 * 4)
    return fwd + (bwd if backward else 0)


@pytest.mark.parametrize("mode, device, dtype, shape, provider",
                         op_cases(CPU_SHAPES, GPU_SHAPES, width_name="C", targets=TARGETS))
def test_bench_interaction_scores(benchmark, copy_bandwidth, mode, device, dtype, shape, provider):
    skip_unless_available(OP, provider, device, dtype, benchmark)
    skip_compiled_backward_on_cpu(provider, device, mode)
    if provider == "compile" and device == "cpu" and shape != CPU_COMPILE_SHAPE:
        pytest.skip(f"on CPU torch.compile is measured at one shape, B={CPU_COMPILE_SHAPE[0]} "
                    f"C={CPU_COMPILE_SHAPE[1]} (compile time); the CUDA run measures every shape")
    _bench(benchmark, copy_bandwidth, mode, device, dtype, shape, provider, _scorer(provider))


def _cpu_clones():
    try:
        from dmil_fast import _C
    except ImportError:
        return []
    return list(_C.cpu_kernel_isas())


CLONE_SHAPES = [(4096, 309), (4096, 1000)]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", CLONE_SHAPES, ids=lambda s: f"B{s[0]}xC{s[1]}")
@pytest.mark.parametrize("clone", _cpu_clones() or ["none"])
def test_bench_interaction_scores_cpu_clones(benchmark, copy_bandwidth, monkeypatch, clone, shape, mode):
    """The C++ CPU kernel's instruction-set clones side by side (``DMIL_FAST_CPU_ISA``), provider
    ``cpp-<clone>``: what AVX-512 and AVX2 give over the portable build on this CPU."""
    skip_unless_available(OP, "cpp", "cpu", torch.float32, benchmark)
    monkeypatch.setenv("DMIL_FAST_CPU_ISA", clone)
    _bench(benchmark, copy_bandwidth, mode, "cpu", torch.float32, shape, f"cpp-{clone}", _scorer("cpp"))


def _bench(benchmark, copy_bandwidth, mode, device, dtype, shape, provider, score):
    b, c = shape
    label(benchmark, op=OP, variant=mode, provider=provider, shape=f"B={b} C={c}", dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = [(2.0 * torch.randn(b, c, device=device, generator=gen)).to(dtype) for _ in range(3)]
    labels = torch.randint(0, c, (b,), device=device, generator=gen)
    entropies = [torch.rand(b, device=device, generator=gen) * 10.0 - 5.0 for _ in range(2)]
    log_prior = torch.log_softmax(torch.randn(c, device=device, generator=gen), dim=0)
    backward = mode == "fwd+bwd"

    def forward():
        return score(*logits, labels, entropy_1=entropies[0], entropy_2=entropies[1], log_prior=log_prior,
                     redundancy="lsmi")

    if backward:
        inputs = (*logits, *entropies)
        for t in inputs:
            t.requires_grad_(True)
        grads = torch.randn(7, b, device=device, generator=gen).to(dtype).unbind(0)

        def run():
            return torch.autograd.grad(tuple(forward()), inputs, grads)
    else:
        run = forward

    out = measure(benchmark, run, device)
    assert_finite(tuple(out))
    record(benchmark, nbytes=_bytes(b, c, element_size(dtype), backward),
           copy_gbps=copy_bandwidth(device) if benchmark.stats else None,
           **call_memory_mb(run, device))
