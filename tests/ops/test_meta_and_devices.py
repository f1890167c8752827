"""Meta tensors and mixed devices at the ops' registered entry points.

The fake kernels also serve as the ops' meta kernels: a direct ``torch.ops.dmil_fast`` call with
one argument on ``meta`` and the rest on the CPU must raise, as PyTorch's own ops do, instead of
returning empty memory. The public ops and the model run on meta tensors alone (shape inspection)."""

import pytest
import torch

import dmil_fast as dm

ops = torch.ops.dmil_fast


def _direct_calls():
    """(name, call(move)) per registered op, where ``move`` puts one argument on another device."""
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    seed = torch.tensor([5])
    zero = torch.zeros(())
    x, w, b = torch.randn(3, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, generator=g)
    h = torch.randn(3, 8, generator=g)
    l1, y, ent = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 0]), torch.randn(4, generator=g)
    scores, lse = ops.interaction_scores(l1, l1, l1, y, ent, ent, None, 0)
    return [
        ("gaussian_sample", lambda m: ops.gaussian_sample(mu, lv, m(seed))),
        ("gaussian_sample_backward", lambda m: ops.gaussian_sample_backward(mu, m(lv), seed)),
        ("diagonal_gaussian_kl_rows", lambda m: ops.diagonal_gaussian_kl_rows(mu, lv, m(zero), zero)),
        ("diagonal_gaussian_kl_rows_backward",
         lambda m: ops.diagonal_gaussian_kl_rows_backward(torch.ones(3), mu, m(lv), zero, zero, False, False)),
        ("variational_bottleneck", lambda m: ops.variational_bottleneck(x, w, m(b), seed, 1, True, False)),
        ("variational_bottleneck_backward",
         lambda m: ops.variational_bottleneck_backward(m(torch.ones(3, 8)), None, None, h, seed, 1)),
        ("interaction_scores", lambda m: ops.interaction_scores(l1, l1, l1, m(y), ent, ent, None, 0)),
        ("interaction_scores_backward",
         lambda m: ops.interaction_scores_backward(torch.ones(4, 7), scores, m(lse), l1, l1, l1, y, ent, ent, 0)),
        ("interaction_scores_triton", lambda m: ops.interaction_scores_triton(l1, l1, l1, m(y), ent, ent, None, 0)),
    ]


@pytest.mark.parametrize("name,call", _direct_calls(), ids=[n for n, _ in _direct_calls()])
def test_a_direct_call_with_one_argument_on_meta_raises(name, call):
    name = name.replace("_triton", "")  # the Triton op shares the fake kernels of the C++ one
    with pytest.raises(RuntimeError, match=f"{name}: every tensor argument must be on one device, got .* on meta"):
        call(lambda t: t.to("meta"))


def _meta(*shape):
    return torch.empty(shape, device="meta")


def test_gaussian_ops_run_on_meta_tensors_alone():
    for backend in ("reference", None):
        z = dm.ops.gaussian_sample(_meta(3, 4), _meta(3, 4), seed=3, backend=backend)
        assert z.device.type == "meta" and z.shape == (3, 4)
    z, mu, logvar, kl = dm.ops.variational_bottleneck(_meta(3, 5), _meta(8, 5), _meta(8), backend="reference")
    assert [t.device.type for t in (z, mu, logvar, kl)] == ["meta"] * 4
    assert (z.shape, mu.shape, kl.shape) == ((3, 4), (3, 4), ())


def test_interaction_scores_run_on_meta_tensors_alone():
    labels = torch.empty(4, dtype=torch.int64, device="meta")
    scores = dm.ops.interaction_scores(_meta(4, 3), _meta(4, 3), _meta(4, 3), labels, entropy_1=_meta(4),
                                       entropy_2=_meta(4), backend="reference")
    assert all(t.device.type == "meta" and t.shape == (4,) for t in scores)


def test_a_model_built_on_meta_runs_its_forward_for_shapes():
    """Shape inspection without memory: the model built under torch.device('meta') runs every
    stage's forward, as the official pure-PyTorch model does."""
    with torch.device("meta"):
        model = dm.DMILModel(None, None, embed_size=8, num_class=3, input_size=6)
    for stage in (1, 2, 3):
        model.configure_stage(stage)
        out = model(_meta(2, 6), _meta(2, 6))
        assert out["out"].device.type == "meta" and out["out"].shape == (2, 3)
