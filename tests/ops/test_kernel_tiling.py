"""The Triton kernels on grids of many programs, against the references.

The default tiles (``tile`` in kernels/gaussian_sample.py) are large under the CPU interpreter, so
the other op tests' small shapes run as one program there: row and column program offsets, the
column loops of the KL and bottleneck forwards and the column tiles of the scoring kernels would
go unchecked. Here every kernel module's ``tile`` is replaced by one of 4 rows x 8 columns, and the
shapes are ragged in both (a 37 x 21 problem runs on 10 x 3 tiles, the last ones partly masked).
"""

import importlib

import pytest
import torch

import dmil_fast as dm
from dmil_fast.reference.gaussian import (diagonal_gaussian_kl_ref, gaussian_sample_ref,
                                          variational_bottleneck_grouped_ref)
from dmil_fast.reference.interactions import interaction_scores_ref
from tests.conftest import triton_device

DEVICE = triton_device()
KERNEL_MODULES = ("gaussian_sample", "diagonal_gaussian_kl", "variational_bottleneck", "interaction_scores")
B, E = 37, 21


def _small_tile(n_rows, n_cols, device):
    return 4, 8, 4


def _use_small_tiles(monkeypatch):
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"dmil_fast.kernels.{name}")
        assert callable(getattr(module, "tile", None)), name
        monkeypatch.setattr(module, "tile", _small_tile)


@pytest.fixture
def small_tiles(monkeypatch):
    _use_small_tiles(monkeypatch)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _randn(*shape, scale=1.0, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE)


def _noise(shape, seed):
    zeros = torch.zeros(shape, device=DEVICE)
    return dm.ops.gaussian_sample(zeros, zeros, seed=seed, backend="triton")


def test_sampling_draws_the_same_noise_on_any_grid_and_matches_reference(monkeypatch):
    eps_one_program = _noise((B, E), 5)  # the default tiles: one program here on the CPU
    _use_small_tiles(monkeypatch)
    eps = _noise((B, E), 5)
    assert torch.equal(eps, eps_one_program)  # noise keyed by the logical index, not the tile
    assert eps.std() > 0.5 and (eps != 0).all()
    mu, logvar = _leaves(_randn(B, E, seed=1), _randn(B, E, scale=2.0, seed=2))
    z = dm.ops.gaussian_sample(mu, logvar, seed=5, backend="triton")
    mu_r, lv_r = _leaves(mu, logvar)
    z_r = gaussian_sample_ref(mu_r, lv_r, eps)
    torch.testing.assert_close(z, z_r)
    grad = _randn(B, E, seed=3)
    for o, r in zip(torch.autograd.grad(z, (mu, logvar), grad), torch.autograd.grad(z_r, (mu_r, lv_r), grad)):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_kl_on_many_programs_matches_reference(small_tiles, reduction):
    inputs = _leaves(_randn(B, E, seed=1), _randn(B, E, scale=0.5, seed=2), _randn(E, seed=3),
                     _randn(E, scale=0.5, seed=4))
    kl = dm.ops.diagonal_gaussian_kl(*inputs, reduction=reduction, backend="triton")
    ref_inputs = _leaves(*inputs)
    kl_r = diagonal_gaussian_kl_ref(*ref_inputs, reduction=reduction)
    torch.testing.assert_close(kl, kl_r)
    grad = _randn(*kl.shape, seed=5)
    for o, r in zip(torch.autograd.grad(kl, inputs, grad), torch.autograd.grad(kl_r, ref_inputs, grad)):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("sample", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_bottleneck_epilogue_on_many_programs_matches_reference(small_tiles, sample, recompute):
    b, d, g = 13, 10, 3  # 39 (row, head) pairs of E = 21
    x, weight, bias = _leaves(_randn(b, d, seed=1), _randn(g * 2 * E, d, scale=d ** -0.5, seed=2),
                              _randn(g * 2 * E, seed=3))
    # the draw of head h of row r sits at logical offset (r * G + h) * E + e
    eps = _noise((b * g, E), 7).view(b, g, E) if sample else None
    out = dm.ops.variational_bottleneck_grouped(x, weight, bias, g, sample=sample, seed=7, backend="triton",
                                                recompute=recompute)
    ref_in = _leaves(x, weight, bias)
    ref = variational_bottleneck_grouped_ref(*ref_in, g, sample=sample, eps=eps)
    for name, o, r in zip(("z", "mu", "logvar", "kl"), out, ref):
        torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5, msg=name)
    grads = [_randn(*o.shape, seed=10 + i) for i, o in enumerate(out)]
    for o, r in zip(torch.autograd.grad(out, (x, weight, bias), grads), torch.autograd.grad(ref, ref_in, grads)):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_interaction_scores_on_many_programs_match_reference(small_tiles, redundancy):
    logits = _leaves(*(_randn(B, E, scale=2.0, seed=s) for s in (1, 2, 3)))
    labels = torch.randint(0, E, (B,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    entropies = _leaves(_randn(B, scale=3.0, seed=5), _randn(B, scale=3.0, seed=6)) if redundancy == "lsmi" else []
    kwargs = dict(entropy_1=entropies[0], entropy_2=entropies[1]) if entropies else {}
    log_prior = torch.log_softmax(_randn(E, seed=7), 0)
    out = dm.ops.interaction_scores(*logits, labels, **kwargs, log_prior=log_prior, redundancy=redundancy,
                                    backend="triton")
    ref_leaves = _leaves(*logits, *entropies)
    ref_kwargs = dict(entropy_1=ref_leaves[3], entropy_2=ref_leaves[4]) if entropies else {}
    ref = interaction_scores_ref(*ref_leaves[:3], labels, **ref_kwargs, log_prior=log_prior, redundancy=redundancy)
    for name, o, r in zip(ref._fields, out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=name)
    grads = [_randn(B, seed=20 + i) for i in range(len(out))]
    ours = torch.autograd.grad(list(out), logits + entropies, grads)
    theirs = torch.autograd.grad(list(ref), ref_leaves, grads)
    for o, r in zip(ours, theirs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
