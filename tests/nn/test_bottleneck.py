"""VariationalBottleneck: the official parameter layout and call forms, and its fused sample()."""

import pytest
import torch

import dmil_fast as dm
from dmil_fast.nn import grouped_sample


def test_official_call_forms_and_parameters():
    official = dm.VariationalBottleneck(input_size=6, embed_size=3)
    positional = dm.VariationalBottleneck(6, 3)
    old_call_site = dm.VariationalBottleneck(lamb=0.1, input_size=6, embed_size=3)  # lamb: accepted, ignored
    for vb in (official, positional, old_call_site):
        assert {k: tuple(v.shape) for k, v in vb.state_dict().items()} == {"fc.weight": (6, 6), "fc.bias": (6,)}
        assert "input_size=6, embed_size=3" in repr(vb) and "lamb" not in repr(vb)
    default = dm.VariationalBottleneck()
    assert (default.input_size, default.embed_size) == (512, 512)
    old_call_site.load_state_dict(official.state_dict())
    old_call_site.train()
    x = torch.randn(4, 6)
    _, _, _, kl_old = old_call_site.sample(x, seed=1)
    _, _, _, kl = official.train().sample(x, seed=1)
    torch.testing.assert_close(kl_old, kl)  # lamb scales nothing
    with pytest.raises(ValueError, match="input_size"):
        dm.VariationalBottleneck(0.1, 3)  # the official positional form is refused, not misread


def test_forward_splits_the_projection_into_mean_and_log_variance():
    vb = dm.VariationalBottleneck(4, 3)
    x = torch.randn(5, 4)
    mu, logvar = vb(x)
    h = x @ vb.fc.weight.T + vb.fc.bias
    torch.testing.assert_close(mu, h[:, :3])
    torch.testing.assert_close(logvar, h[:, 3:])


def test_sample_returns_mean_in_eval_and_kl_of_the_closed_form():
    vb = dm.VariationalBottleneck(4, 3).eval()
    x = torch.randn(5, 4)
    z, mu, logvar, kl = vb.sample(x)
    assert torch.equal(z, mu)
    expected = 0.5 * torch.mean(-logvar + logvar.exp() + mu ** 2 - 1)
    torch.testing.assert_close(kl, expected)


def test_sample_in_training_draws_noise_with_the_head_variance():
    vb = dm.VariationalBottleneck(2, 4).train()
    with torch.no_grad():
        vb.fc.weight.zero_()
        vb.fc.bias.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 2 * torch.log(torch.tensor(0.5)), 0.0]))
    z, mu, _, _ = vb.sample(torch.zeros(20000, 2), seed=3)
    torch.testing.assert_close(z.mean(0), mu[0], atol=0.03, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 1.0, 0.5, 1.0]), atol=0.03, rtol=0)


def test_grouped_sample_equals_each_head_and_sends_gradients_to_each():
    heads = [dm.VariationalBottleneck(4, 3) for _ in range(3)]
    x = torch.randn(6, 4)
    z, mu, logvar, kl = grouped_sample(x, heads, sample=False)
    assert z.shape == mu.shape == logvar.shape == (6, 3, 3) and kl.shape == (3,)
    for g, head in enumerate(heads):
        m, lv = head(x)
        torch.testing.assert_close(mu[:, g], m)
        torch.testing.assert_close(logvar[:, g], lv)
        torch.testing.assert_close(kl[g], 0.5 * torch.mean(-lv + lv.exp() + m ** 2 - 1))
    (mu.sum() + kl.sum()).backward()
    assert all(h.fc.weight.grad is not None and h.fc.weight.grad.abs().sum() > 0 for h in heads)
    with pytest.raises(ValueError, match="heads"):
        grouped_sample(x, [heads[0], dm.VariationalBottleneck(4, 2)], sample=False)


def test_grouped_heads_of_another_input_size_are_refused_by_name():
    with pytest.raises(ValueError, match=r"heads\[1\] has sizes \(5, 3\)"):
        grouped_sample(torch.randn(2, 4), [dm.VariationalBottleneck(4, 3), dm.VariationalBottleneck(5, 3)],
                       sample=False)
