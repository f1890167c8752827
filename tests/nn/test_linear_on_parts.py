"""linear_on_parts / sequential_on_parts against the layer applied to the concatenation (the same
values and gradients, bit for bit, in every dtype and under autocast), and the cases where the
concatenated call is kept (hooks, pruning, subclasses)."""

import contextlib
import types

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from dmil_fast.nn.parts import linear_on_parts, parts_path_applies, sequential_on_parts
from tests.conftest import saved_storages


def _parts(widths, batch=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for w in widths]


def _autocast(on):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


CASES = [  # (layer dtype, parts dtype, CPU autocast to bfloat16)
    (torch.float64, torch.float64, False), (torch.float32, torch.float32, False),
    (torch.float32, torch.float32, True), (torch.float32, torch.bfloat16, True),
    (torch.bfloat16, torch.bfloat16, False),
]


def _run_both(layer, parts, grad_out, autocast, needs=None):
    """(out, grads) of linear_on_parts and of the layer on the concatenation, from equal copies."""
    results = []
    for on_parts in (True, False):
        ps = [p.detach().clone().requires_grad_(needs is None or needs[i]) for i, p in enumerate(parts)]
        with _autocast(autocast):
            out = linear_on_parts(layer, ps) if on_parts else layer(torch.cat(ps, dim=1))
        wrt = [p for p in [*ps, *layer.parameters()] if p.requires_grad]
        results.append((out, torch.autograd.grad(out, wrt, grad_out.to(out.dtype))))
    return results


@pytest.mark.parametrize("layer_dtype, parts_dtype, autocast", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("widths", [(3,), (3, 4), (2, 2, 2, 5)])
def test_values_and_gradients_equal_the_concatenated_layer_bit_for_bit(widths, bias, layer_dtype, parts_dtype,
                                                                        autocast):
    torch.manual_seed(1)
    layer = nn.Linear(sum(widths), 6, bias=bias, dtype=layer_dtype)
    parts = _parts(widths, batch=17, dtype=parts_dtype)
    (out, grads), (ref, ref_grads) = _run_both(layer, parts, torch.randn(17, 6), autocast)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert len(grads) == len(ref_grads)
    for got, expected in zip(grads, ref_grads):
        assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_a_frozen_layer_keeps_no_parts_and_gives_the_gradients_asked_for():
    torch.manual_seed(5)
    layer = nn.Linear(7, 3)
    layer.weight.requires_grad_(False)
    parts = _parts((3, 4), dtype=torch.float32)
    (_, grads), (_, ref_grads) = _run_both(layer, parts, torch.randn(5, 3), False, needs=(False, True))
    assert len(grads) == len(ref_grads) == 2  # the second part and the bias
    for got, expected in zip(grads, ref_grads):
        assert torch.equal(got, expected)
    saved, _ = saved_storages(lambda: linear_on_parts(layer, parts))
    assert set(saved) <= {layer.weight.untyped_storage().data_ptr(), layer.bias.untyped_storage().data_ptr()}


def test_torch_func_grad_equals_the_concatenated_layers():
    torch.manual_seed(9)
    layer = nn.Linear(7, 3, dtype=torch.float64)
    a, b = (p.detach() for p in _parts((3, 4)))

    def on_parts(w, bias, a, b):
        layer_like = types.SimpleNamespace(weight=w, bias=bias, in_features=7)  # plain tensors as parameters
        return (linear_on_parts(layer_like, (a, b)) ** 2).sum()

    def concatenated(w, bias, a, b):
        return (torch.nn.functional.linear(torch.cat((a, b), dim=1), w, bias) ** 2).sum()

    args = (layer.weight.detach(), layer.bias.detach(), a, b)
    got = torch.func.grad(on_parts, argnums=(0, 1, 2, 3))(*args)
    expected = torch.func.grad(concatenated, argnums=(0, 1, 2, 3))(*args)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_second_derivatives_equal_the_concatenated_layers():
    torch.manual_seed(6)
    layer = nn.Linear(7, 3, dtype=torch.float64)
    parts = _parts((3, 4))
    hessians = []
    for on_parts in (True, False):
        out = linear_on_parts(layer, parts) if on_parts else layer(torch.cat(parts, dim=1))
        grads = torch.autograd.grad((out ** 2).sum(), [*parts, layer.weight], create_graph=True)
        total = sum((g * g).sum() for g in grads)
        hessians.append(torch.autograd.grad(total, [*parts, layer.weight, layer.bias]))
    for got, expected in zip(*hessians):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda a, b: linear_on_parts(layer, (a, b)), tuple(parts))


def test_sequential_runs_the_remaining_layers():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(7, 4, dtype=torch.float64), nn.ReLU(), nn.Linear(4, 3, dtype=torch.float64),
                        nn.Softmax(dim=1))
    parts = _parts((3, 4))
    torch.testing.assert_close(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)))


@pytest.mark.parametrize("layer_dtype, parts_dtype, autocast", CASES)
def test_no_concatenation_is_kept_for_the_backward(layer_dtype, parts_dtype, autocast):
    layer = nn.Linear(7, 2, dtype=layer_dtype)
    parts = _parts((3, 4), dtype=parts_dtype)
    with _autocast(autocast):
        kept, _ = saved_storages(lambda: linear_on_parts(layer, parts))
    allowed = {t.untyped_storage().data_ptr() for t in [*parts, *layer.parameters()]}
    assert kept and set(kept) <= allowed


def test_widths_must_add_up_to_the_layer_input():
    with pytest.raises(ValueError, match="7 columns in all, the layer takes 8"):
        linear_on_parts(nn.Linear(8, 2), _parts((3, 4)))


def _gate(dtype=torch.float32):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(7, 4, dtype=dtype), nn.ReLU(), nn.Linear(4, 3, dtype=dtype))


def test_plain_layers_take_the_parts_path():
    assert parts_path_applies(_gate())


@pytest.mark.parametrize("kind, seen_shape", [("forward", (5, 7)), ("backward", (5, 4))])
def test_a_hooked_layer_is_called_on_the_concatenation(kind, seen_shape):
    """A forward hook sees the concatenated (5, 7) input; a full backward hook fires, with the
    (5, 4) gradient of the layer's output."""
    net = _gate()
    seen = []
    if kind == "forward":
        net[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    else:
        net[0].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    parts = _parts((3, 4), dtype=torch.float32)
    assert not parts_path_applies(net)
    out = sequential_on_parts(net, parts)
    out.sum().backward()
    assert seen[0] == seen_shape
    torch.testing.assert_close(out, net(torch.cat(parts, dim=1)))


def test_a_pruned_layer_trains_through_its_pre_hook():
    """Pruning recomputes weight = weight_orig * mask in a forward pre-hook on every call: the
    parts path would reuse a stale weight (and fail on the second backward)."""
    net = _gate()
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", amount=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        parts = _parts((3, 4), dtype=torch.float32)
        opt.zero_grad()
        out = sequential_on_parts(net, parts)
        torch.testing.assert_close(out, net(torch.cat(parts, dim=1)))
        out.sum().backward()
        opt.step()
    assert (net[0].weight == 0).sum() >= 14  # half of the 28 weights stay pruned


def test_autocast_and_low_precision_take_the_parts_path_with_the_same_results():
    for net, parts, autocast in ((_gate(), _parts((3, 4), dtype=torch.float32), True),
                                 (_gate(torch.bfloat16), _parts((3, 4), dtype=torch.bfloat16), False)):
        assert parts_path_applies(net)
        with _autocast(autocast):
            assert torch.equal(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)))


def test_a_subclassed_layer_is_called_as_a_module():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(4)
    net = nn.Sequential(Scaled(7, 3))
    parts = _parts((3, 4), dtype=torch.float32)
    assert not parts_path_applies(net)
    torch.testing.assert_close(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)))


@pytest.mark.parametrize("hidden", [0, 5])
def test_cross_modality_split_equals_its_concatenated_call_and_keeps_no_concatenation(hidden):
    from dmil_fast.nn import CrossModality

    torch.manual_seed(7)
    module = CrossModality(4, hidden=hidden)
    x1, x2 = _parts((4, 4), batch=6, dtype=torch.float32)
    results = []
    for split in (True, False):
        a, b = (x.detach().clone().requires_grad_() for x in (x1, x2))
        saved, out = saved_storages(lambda: module(a, b, split=split))
        grads = torch.autograd.grad(out, [a, b, *module.parameters()], torch.ones_like(out))
        kept = {t.untyped_storage().data_ptr() for t in [a, b, *module.parameters()]}
        results.append((out, grads, sum(n for ptr, n in saved.items() if ptr not in kept)))
    (out, grads, new_split), (ref, ref_grads, new_cat) = results
    assert torch.equal(out, ref)
    for got, expected in zip(grads, ref_grads):
        assert torch.equal(got, expected)
    # Split keeps the (B, E) product x1 * x2 where the concatenated call keeps its (B, 3E) input
    # (x1 and x2 are kept by the product's backward either way).
    assert new_cat - new_split == 6 * 2 * 4 * 4


def test_cross_modality_on_inputs_without_grad_or_with_hooks_concatenates():
    from dmil_fast.nn import CrossModality

    torch.manual_seed(8)
    module = CrossModality(4)
    x1, x2 = (x.detach() for x in _parts((4, 4), batch=6, dtype=torch.float32))
    saved_split, out = saved_storages(lambda: module(x1, x2, split=True))
    saved_cat, ref = saved_storages(lambda: module(x1, x2))
    assert torch.equal(out, ref) and sorted(saved_split.values()) == sorted(saved_cat.values()) == [6 * 12 * 4]
    assert not ({x1.untyped_storage().data_ptr(), x2.untyped_storage().data_ptr()} & set(saved_split))
    seen = []
    module.fc_out.register_forward_hook(lambda m, args, o: seen.append(args[0].shape))
    a, b = (x.requires_grad_() for x in _parts((4, 4), batch=6, dtype=torch.float32))
    module(a, b, split=True)
    assert seen == [(6, 12)]  # the hook saw the concatenated input
