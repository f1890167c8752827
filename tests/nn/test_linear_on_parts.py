"""linear_on_parts / sequential_on_parts against the layer applied to the concatenation."""

import pytest
import torch
from torch import nn

from dmil_fast.nn.dmil import linear_on_parts, sequential_on_parts


def _parts(widths, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, w, generator=g, dtype=torch.float64, requires_grad=True) for w in widths]


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
