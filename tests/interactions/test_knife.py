"""KNIFE density: exact log-density against torch.distributions, normalisation, maximum-likelihood
fits against closed-form Gaussians, and gradients that never accumulate across steps."""

import math

import numpy as np
import pytest
import torch

from dmil_fast.interactions import KNIFE


def _random_knife(dim, components, seed):
    gen = torch.Generator().manual_seed(seed)
    knife = KNIFE(dim, components).double()
    with torch.no_grad():
        knife.means.copy_(torch.randn(components, dim, generator=gen, dtype=torch.float64))
        knife.raw_log_scales.copy_(torch.randn(components, dim, generator=gen, dtype=torch.float64))
        knife.mixing.copy_(torch.randn(components, dim, dim, generator=gen, dtype=torch.float64))
        knife.weight_logits.copy_(torch.randn(components, generator=gen, dtype=torch.float64))
        knife.loc.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
        knife.scale.copy_(torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5)
    return knife


def _mixture_reference(knife):
    """The same density written as a torch.distributions Gaussian mixture on the raw inputs."""
    k, d = knife.components, knife.dim
    s = knife.log_scale_bound * torch.tanh(knife.raw_log_scales.detach())
    unit_lower = torch.eye(d, dtype=torch.float64) + torch.tril(knife.mixing.detach(), diagonal=-1)
    # x -> A_k (x - mu_k) is the whitening map of component k.
    a = unit_lower @ torch.diag_embed(torch.exp(s)) @ torch.diag(1.0 / knife.scale)
    precision = a.transpose(1, 2) @ a
    means = knife.loc + knife.scale * knife.means.detach()
    comps = torch.distributions.MultivariateNormal(means, precision_matrix=precision)
    mix = torch.distributions.Categorical(logits=knife.weight_logits.detach())
    assert comps.batch_shape == (k,)
    return torch.distributions.MixtureSameFamily(mix, comps)


@pytest.mark.parametrize("dim,components", [(1, 1), (3, 5), (6, 2)])
def test_log_prob_matches_gaussian_mixture(dim, components):
    knife = _random_knife(dim, components, seed=dim)
    x = torch.randn(64, dim, dtype=torch.float64) * 2
    expected = _mixture_reference(knife).log_prob(x)
    torch.testing.assert_close(knife.log_prob(x), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(knife(x), -expected, rtol=1e-9, atol=1e-9)


def test_density_integrates_to_one():
    knife = _random_knife(2, 3, seed=7)
    with torch.no_grad():
        knife.scale.fill_(0.5)
        knife.loc.zero_()
    grid = torch.linspace(-9, 9, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    with torch.no_grad():
        p = knife.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).exp().reshape(xx.shape)
    total = torch.trapezoid(torch.trapezoid(p, grid, dim=1), grid)
    assert abs(float(total) - 1.0) < 1e-3


def test_fit_recovers_1d_gaussian():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 1, generator=gen) * 2.0 + 3.0
    knife = KNIFE(1, 5)
    knife.fit(x, epochs=30, batch_size=256, lr=1e-2, seed=0)
    mu, sigma = float(x.mean()), float(x.std())
    grid = torch.linspace(mu - 2 * sigma, mu + 2 * sigma, 41)[:, None]
    closed_form = -0.5 * ((grid[:, 0] - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    err = (knife.log_prob(grid).detach() - closed_form).abs()
    assert float(err.max()) < 0.1
    assert float(err.mean()) < 0.04


def test_fit_loss_decreases_to_gaussian_entropy():
    gen = torch.Generator().manual_seed(4)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    x = torch.randn(3000, 2, generator=gen) @ torch.linalg.cholesky(cov).T
    knife = KNIFE(2, 3)
    history = knife.fit(x, epochs=25, batch_size=200, lr=1e-2, seed=1)
    assert len(history) == 25
    drops = sum(b <= a + 1e-3 for a, b in zip(history, history[1:]))
    assert drops >= 0.8 * (len(history) - 1)
    assert history[-1] < history[0]
    # Mean NLL on the samples estimates the differential entropy 1/2 log det(2 pi e cov).
    entropy = 0.5 * math.log(float(torch.linalg.det(2 * math.pi * math.e * cov)))
    assert abs(history[-1] - entropy) < 0.05


def test_fit_zeroes_gradients_every_step():
    """With full-batch steps at a vanishing learning rate, every step sees the same gradient g;
    accumulated gradients would leave 3 g behind after 3 steps, zeroed ones leave g."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 3, generator=gen)
    knife = KNIFE(3, 4)
    knife.fit(x, epochs=3, batch_size=256, lr=1e-12, seed=2)
    params = [knife.means, knife.raw_log_scales, knife.mixing, knife.weight_logits]
    fresh = torch.autograd.grad(-knife.log_prob(x).mean(), params)
    for p, g in zip(params, fresh):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_bad_inputs_name_the_argument():
    knife = KNIFE(2)
    with pytest.raises(ValueError, match="x must have shape"):
        knife.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        knife.fit(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        knife.fit(torch.zeros(4, 2), epochs=0)
    with pytest.raises(ValueError, match="dim"):
        KNIFE(0)
    with pytest.raises(ValueError, match="components"):
        KNIFE(2, components=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        knife.fit(torch.zeros(4, 2), epochs=1, lr=0.0)
    # NumPy integers are integers (as everywhere in the estimator's settings).
    assert KNIFE(np.int64(2), components=np.int32(3)).means.shape == (3, 2)


@pytest.mark.parametrize("bound", [float("inf"), float("nan"), 0.0, -1.0, "2", None, True])
def test_log_scale_bound_must_be_a_finite_positive_number(bound):
    with pytest.raises(ValueError, match=r"^log_scale_bound must be a finite number > 0, got "):
        KNIFE(2, 3, log_scale_bound=bound)


def test_log_scale_bound_takes_numpy_numbers_and_0d_tensors():
    for bound in (np.float32(0.5), torch.tensor(0.5), 1):
        knife = KNIFE(2, 3, log_scale_bound=bound)
        assert type(knife.log_scale_bound) is float and knife.log_scale_bound == float(bound)


def test_log_scale_bound_bounds_the_scales_in_the_density():
    """With b != 1 the density is still the Gaussian mixture with precision A^T A,
    A = (I + L) diag(exp(b tanh(theta))), built here with torch.distributions."""
    b, k, d = 0.3, 4, 3
    g = torch.Generator().manual_seed(0)
    knife = KNIFE(d, k, log_scale_bound=b).double()
    with torch.no_grad():
        for p in (knife.means, knife.raw_log_scales, knife.mixing, knife.weight_logits):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 2)
    s = b * torch.tanh(knife.raw_log_scales.detach())
    a = (torch.eye(d, dtype=torch.float64) + torch.tril(knife.mixing.detach(), -1)) @ torch.diag_embed(s.exp())
    components = torch.distributions.MultivariateNormal(knife.means.detach(), precision_matrix=a.transpose(1, 2) @ a)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=knife.weight_logits.detach()), components)
    x = torch.randn(50, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(knife.log_prob(x), mixture.log_prob(x), rtol=1e-9, atol=1e-9)


def test_fit_reshuffles_every_epoch_by_its_seed(monkeypatch):
    seen = []
    step = KNIFE.step
    monkeypatch.setattr(KNIFE, "step", lambda self, x, opt: seen.append(x[:, 0].clone()) or step(self, x, opt))
    x = torch.arange(40, dtype=torch.float32)[:, None]  # row i holds i

    def orders(seed):
        seen.clear()
        KNIFE(1, 2).fit(x, epochs=3, batch_size=8, seed=seed)
        return [torch.cat(seen[5 * e:5 * e + 5]) for e in range(3)]

    first = orders(0)
    for order in first:
        assert sorted(order.tolist()) == list(range(40))  # every row once per epoch
        assert not torch.equal(order, x[:, 0])           # not in file order
    assert not torch.equal(first[0], first[1])           # reshuffled each epoch
    assert all(torch.equal(a, b) for a, b in zip(first, orders(0)))
    assert not torch.equal(first[0], orders(1)[0])


def test_a_constant_feature_keeps_unit_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 1, generator=g), torch.full((300, 1), 3.0)], 1)
    knife = KNIFE(2, 3)
    knife.fit(x, epochs=2, seed=0)
    assert float(knife.scale[1]) == 1.0
    assert float(knife.loc[1]) == pytest.approx(3.0)
