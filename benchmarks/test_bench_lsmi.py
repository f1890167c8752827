"""LSMI per-sample interaction scoring, end to end: ``LSMIEstimator.score`` of a fitted estimator
(three discriminators, two KNIFE densities, the interaction-scores op and the dataset-level shift).

CUDA: 200k VGGSound-shaped samples (512-d per modality, 309 classes). CPU: 4096 samples of 64-d
features (the smoke run). The estimator is fitted once per case (untimed, one short epoch: the
weights do not change the cost of scoring). Providers pick the interaction-scores backend through
``DMIL_FAST_BACKEND`` (``reference``, ``cpp`` on CPU, ``cuda`` on GPU); the rest of the pipeline
is the same PyTorch code for all of them.
"""

from __future__ import annotations

import pytest
import torch

from bench_harness import (TARGET, assert_finite, call_memory_mb, devices, label, measure, need, record,
                           skip_unless_available)

OP = "lsmi_score"
PROVIDERS = ("reference", "cpp", "cuda")
# device -> (samples scored, samples fitted, features per modality, classes, batch size)
SIZES = {"cpu": (4096, 1024, 64, 309, 1024), "cuda": (200_000, 20_000, 512, 309, 8192)}


def _cases():
    # The GPU cases carry the target mark, which puts the 200k-sample scoring in the one
    # GPU run (-m target); no goal is set on it, so bench_targets.py has no row for it.
    return [pytest.param(device, provider, marks=(TARGET,) if device == "cuda" else (),
                         id=f"{device}-{provider}") for device in devices() for provider in PROVIDERS]


def _features(n: int, dim: int, num_classes: int, device: str):
    """Class-dependent Gaussian features for both modalities (so the discriminators see signal)."""
    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, num_classes, (n,), device=device, generator=gen)
    centres = torch.randn(num_classes, 2 * dim, device=device, generator=gen)
    x = centres[y] + torch.randn(n, 2 * dim, device=device, generator=gen)
    return x[:, :dim].contiguous(), x[:, dim:].contiguous(), y


@pytest.mark.parametrize("device, provider", _cases())
def test_bench_lsmi_score(benchmark, monkeypatch, device, provider):
    skip_unless_available("interaction_scores", provider, device, torch.float32, benchmark)
    estimator_cls = need("dmil_fast.interactions", "LSMIEstimator")
    n, n_fit, dim, classes, batch = SIZES[device]
    label(benchmark, op=OP, variant="score", provider=provider, shape=f"N={n} D={dim} C={classes}",
          dtype=torch.float32, device=device)
    x1, x2, y = _features(n, dim, classes, device)
    estimator = estimator_cls(classes, epochs=1, batch_size=batch, seed=0, device=device, progress=False)
    estimator.fit(x1[:n_fit], x2[:n_fit], y[:n_fit])
    monkeypatch.setenv("DMIL_FAST_BACKEND", provider)

    def run():
        return estimator.score(x1, x2, y, progress=False)

    scores = measure(benchmark, run, device, warmup=1)
    assert_finite(tuple(scores))
    record(benchmark, items=n, **call_memory_mb(run, device))
