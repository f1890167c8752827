"""One DMIL training step (forward, loss, backward, SGD step) per stage on VGGSound-shaped
features: 512-d pooled features per modality (identity encoders, or the feature-data MLP encoders),
C = 309 classes.

Providers: ``reference`` (``dmil_fast.reference.model.ReferenceDMILModel``, the official
architecture in eager PyTorch), ``compile`` (that model under ``torch.compile(dynamic=False)``;
CUDA only: compiling a whole training step takes minutes on a CPU), ``dmil_fast``
(``dmil_fast.nn.DMILModel``, automatic backends) and ``dmil_fast_keep`` (the same with
``recompute=False``: it keeps the heads' projections instead of rebuilding them in the backward,
so the pair shows what ``recompute`` costs in time and saves in memory, side by side). Reported:
samples/s; on CUDA the peak allocated memory of a step and the activation memory (allocated after
forward + loss minus before it: what the step keeps alive for the backward). Every provider trains
with ``dmil_loss``, ``reference`` and ``compile`` with the official trainer's ``F.cross_entropy``;
the models, the loss and the batch come from ``bench_harness.dmil_step_model``, ``dmil_step_loss``
and ``dmil_step_batch``.
``activation_memory.py`` counts the activation memory from the autograd graph on any device.
"""

from __future__ import annotations

import pytest
import torch

from bench_harness import (DMIL_CLASSES, DMIL_FEATURES, DMIL_STEP_PROVIDERS, assert_finite, compiled, devices,
                           dmil_step_batch, dmil_step_loss, dmil_step_model, label, measure, need, record,
                           release_flush_buffer, synchronize, target_marks)

OP = "dmil_step"
CPU_CASES = [(64, 32, "identity")]  # (B, E, encoder)
GPU_CASES = [(b, e, "identity") for b in (256, 4096) for e in (32, 256)] + [(4096, 256, "mlp")]
#: The cases the training-step targets are judged on (bench_targets.py).
TARGETS = {"cuda": [(4096, 256, "identity")]}
CPU_COMPILE_REASON = ("torch.compile of a whole DMIL training step takes minutes on CPU (over the CPU "
                      "smoke budget); the CUDA run measures it")


def _cases():
    out = []
    for device in devices():
        for b, e, encoder in (CPU_CASES if device == "cpu" else GPU_CASES):
            for stage in (1, 2, 3):
                for provider in DMIL_STEP_PROVIDERS:
                    out.append(pytest.param(device, b, e, encoder, stage, provider,
                                            marks=target_marks(device, (b, e, encoder), TARGETS),
                                            id=f"{device}-B{b}-E{e}-{encoder}-stage{stage}-{provider}"))
    return out


@pytest.mark.parametrize("device, b, e, encoder, stage, provider", _cases())
def test_bench_dmil_step(benchmark, device, b, e, encoder, stage, provider):
    if provider == "compile" and device == "cpu":
        pytest.skip(CPU_COMPILE_REASON)
    dmil_loss = dmil_step_loss(provider)
    config = need("dmil_fast.train", "DMILConfig")()
    label(benchmark, op=OP, variant=f"stage{stage} {encoder}", provider=provider,
          shape=f"B={b} D={DMIL_FEATURES} E={e} C={DMIL_CLASSES}", dtype=torch.float32, device=device)
    model = dmil_step_model(provider, e, stage, device, encoder=encoder)
    forward = compiled(model) if provider == "compile" else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=config.stage_lr(stage),
                                momentum=config.momentum, weight_decay=config.weight_decay)
    visual, audio, labels = dmil_step_batch(b, device)

    def loss_of_batch():
        loss, _ = dmil_loss(forward(visual, audio), labels, stage=stage, config=config)
        return loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of_batch()
        loss.backward()
        optimizer.step()
        return loss.detach()

    loss = measure(benchmark, step, device)
    assert_finite(loss)
    record(benchmark, items=b, **_memory(loss_of_batch, optimizer, device))


def _memory(loss_of_batch, optimizer, device: str) -> dict:
    """Peak allocated memory of one step and the memory kept for the backward (CUDA only)."""
    if device != "cuda":
        return {"peak_mem_mb": None, "activation_mem_mb": None}
    release_flush_buffer()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = loss_of_batch()
    synchronize(device)
    activation = torch.cuda.memory_allocated() - before
    loss.backward()
    optimizer.step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated()
    del loss
    return {"peak_mem_mb": peak / 2**20, "activation_mem_mb": activation / 2**20,
            "step_mem_mb": (peak - before) / 2**20}
