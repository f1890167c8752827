"""linear_on_parts / sequential_on_parts against the layer applied to the concatenation, and the
cases where the concatenated call is kept (hooks, pruning, subclasses, autocast, low precision)."""

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from dmil_fast.nn.dmil import linear_on_parts, parts_path_applies, sequential_on_parts


def _parts(widths, batch=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for w in widths]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("widths", [(3,), (3, 4), (2, 2, 2, 5)])
def test_values_and_gradients_equal_the_concatenated_layer(widths, bias):
    torch.manual_seed(1)
    layer = nn.Linear(sum(widths), 6, bias=bias, dtype=torch.float64)
    parts = _parts(widths)
    out = linear_on_parts(layer, parts)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*parts, *layer.parameters()], grad_out)
    ref_parts = [p.detach().clone().requires_grad_(True) for p in parts]
    ref = layer(torch.cat(ref_parts, dim=1))
    ref_grads = torch.autograd.grad(ref, [*ref_parts, *layer.parameters()], grad_out)
    torch.testing.assert_close(out, ref)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


def test_sequential_runs_the_remaining_layers():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(7, 4, dtype=torch.float64), nn.ReLU(), nn.Linear(4, 3, dtype=torch.float64),
                        nn.Softmax(dim=1))
    parts = _parts((3, 4))
    torch.testing.assert_close(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)))


def test_no_concatenation_is_kept_for_the_backward():
    layer = nn.Linear(7, 2, dtype=torch.float64)
    parts = _parts((3, 4))
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_on_parts(layer, parts)
    allowed = {t.untyped_storage().data_ptr() for t in [*parts, *layer.parameters()]}
    assert kept and kept <= allowed


def test_widths_must_add_up_to_the_layer_input():
    with pytest.raises(ValueError, match="7 columns in all, the layer takes 8"):
        linear_on_parts(nn.Linear(8, 2), _parts((3, 4)))


def _gate(dtype=torch.float32):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(7, 4, dtype=dtype), nn.ReLU(), nn.Linear(4, 3, dtype=dtype))


def test_plain_layers_take_the_parts_path():
    assert parts_path_applies(_gate(), _parts((3, 4), dtype=torch.float32))


def test_a_hooked_layer_is_called_on_the_concatenation():
    net = _gate()
    seen = []
    net[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    parts = _parts((3, 4), dtype=torch.float32)
    assert not parts_path_applies(net, parts)
    torch.testing.assert_close(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)))
    assert seen[0] == (5, 7)  # the hook saw the concatenated input


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


def test_autocast_and_low_precision_use_the_concatenation():
    net = _gate()
    parts = _parts((3, 4), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not parts_path_applies(net, parts)
        torch.testing.assert_close(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)),
                                   rtol=0, atol=0)
    low = _gate(torch.bfloat16)
    low_parts = _parts((3, 4), dtype=torch.bfloat16)
    assert not parts_path_applies(low, low_parts)
    torch.testing.assert_close(sequential_on_parts(low, low_parts), low(torch.cat(low_parts, dim=1)),
                               rtol=0, atol=0)


def test_a_subclassed_layer_is_called_as_a_module():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(4)
    net = nn.Sequential(Scaled(7, 3))
    parts = _parts((3, 4), dtype=torch.float32)
    assert not parts_path_applies(net, parts)
    torch.testing.assert_close(sequential_on_parts(net, parts), net(torch.cat(parts, dim=1)))
