"""dmil_fast.train.lean_cross_entropy against torch.nn.functional.cross_entropy (the oracle): values,
gradients and second derivatives, ignored labels, autocast, and what it keeps for the backward."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dmil_fast.train import lean_cross_entropy as cross_entropy
from tests.conftest import saved_storages

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def _same(got, expected):
    """Bit for bit, NaN where the oracle has NaN."""
    return got.dtype == expected.dtype and torch.equal(torch.nan_to_num(got, 7.0), torch.nan_to_num(expected, 7.0)) \
        and torch.equal(torch.isnan(got), torch.isnan(expected))


def _case(b, c, dtype, scale, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, c, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, c, (b,), generator=g)
    labels[torch.rand(b, generator=g) < ignored] = -100
    return logits, labels


@given(b=st.integers(1, 9), c=st.integers(1, 12), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from([1.0, 30.0, 1e3]), ignored=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**16))
def test_value_and_gradient_equal_f_cross_entropys_bit_for_bit(b, c, dtype, scale, ignored, seed):
    logits, labels = _case(b, c, dtype, scale, ignored, seed)
    loss = cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = F.cross_entropy(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.shape == ()
    assert _same(loss, expected)  # NaN when every label is ignored
    assert _same(grad, expected_grad)


def test_second_derivatives_match_f_cross_entropy():
    logits, labels = _case(6, 5, torch.float64, 3.0, 0.3, 1)
    hessians = []
    for ce in (cross_entropy, F.cross_entropy):
        (grad,) = torch.autograd.grad(ce(logits, labels), logits, create_graph=True)
        hessians.append(torch.autograd.grad((grad * torch.arange(5.0, dtype=torch.float64)).sum(), logits)[0])
    torch.testing.assert_close(hessians[0], hessians[1], rtol=1e-12, atol=1e-14)
    assert hessians[1].abs().max() > 0.01  # the check compares something


def test_all_labels_ignored_gives_nan_and_zero_gradients_as_f_cross_entropy():
    logits = torch.randn(3, 4, requires_grad=True)
    labels = torch.full((3,), -100)
    loss = cross_entropy(logits, labels)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, labels))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(logits))


def test_bfloat16_logits_under_autocast_match_f_cross_entropy():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 8, generator=g), torch.randn(7, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (16,), generator=g)
    results = []
    for ce in (cross_entropy, F.cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(x, w)
            loss = ce(logits, labels)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        results.append((loss, torch.autograd.grad(loss, w)[0]))
    assert _same(results[0][0], results[1][0]) and _same(results[0][1], results[1][1])


def test_bfloat16_logits_are_reduced_in_float32():
    logits, labels = _case(5, 6, torch.bfloat16, 4.0, 0.0, 2)
    loss = cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    reference = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(reference, labels)
    assert _same(loss, expected)
    assert _same(grad, torch.autograd.grad(expected, reference)[0].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_only_the_logits_and_labels_for_the_backward(dtype):
    """F.cross_entropy keeps its (B, C) log-softmax; this keeps the logits and labels themselves
    (and a 0-d float32 count of the labels that count)."""
    logits, labels = _case(8, 5, dtype, 1.0, 0.0, 3)
    kept = {logits.untyped_storage().data_ptr(), labels.untyped_storage().data_ptr()}
    saved, loss = saved_storages(lambda: cross_entropy(logits, labels))
    assert kept <= set(saved) and all(nbytes == 4 for ptr, nbytes in saved.items() if ptr not in kept)
    loss.backward()  # the graph is intact
    saved_f, _ = saved_storages(lambda: F.cross_entropy(logits, labels))
    # the oracle keeps a (B, C) of its own
    assert any(nbytes == logits.untyped_storage().nbytes() for ptr, nbytes in saved_f.items() if ptr not in kept)


def test_other_inputs_go_to_f_cross_entropy():
    logits, _ = _case(4, 3, torch.float32, 1.0, 0.0, 4)
    probabilities = torch.softmax(torch.randn(4, 3), dim=1)
    torch.testing.assert_close(cross_entropy(logits, probabilities), F.cross_entropy(logits, probabilities))
    spatial = torch.randn(2, 3, 5)
    targets = torch.randint(0, 3, (2, 5))
    torch.testing.assert_close(cross_entropy(spatial, targets), F.cross_entropy(spatial, targets))
    with pytest.raises(RuntimeError):  # F.cross_entropy's own error for boolean targets
        cross_entropy(logits, torch.tensor([True, False, True, False]))


def test_label_dtypes_are_those_f_cross_entropy_takes():
    logits, labels = _case(4, 3, torch.float32, 1.0, 0.0, 5)
    labels = labels.clamp(min=0)  # uint8 has no -100
    assert torch.equal(cross_entropy(logits, labels.to(torch.uint8)), F.cross_entropy(logits, labels))
    with pytest.raises(RuntimeError) as refusal:  # F.cross_entropy refuses int32 labels (its wording varies
        F.cross_entropy(logits, labels.int())    # across torch versions) ...
    with pytest.raises(RuntimeError) as lean:      # ... and the lean one gives that very error
        cross_entropy(logits, labels.int())
    assert str(lean.value) == str(refusal.value) and "Long" in str(refusal.value)


def test_bad_labels_are_refused():
    logits, _ = _case(4, 3, torch.float32, 1.0, 0.0, 6)
    with pytest.raises(ValueError, match="labels must have one entry per row of logits"):
        cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        cross_entropy(logits, torch.tensor([0, 1, 2, 3]))


def test_torch_compile_fullgraph_matches_f_cross_entropy():
    logits, labels = _case(8, 5, torch.float32, 1.0, 0.3, 7)
    loss = torch.compile(lambda x, y: cross_entropy(2 * x, y), fullgraph=True)(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = F.cross_entropy(2 * logits, labels)
    torch.testing.assert_close(loss, expected, **TOL[torch.float32])
    torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0], **TOL[torch.float32])


def test_torch_func_grad_and_vmap_equal_f_cross_entropys():
    logits, labels = _case(6, 5, torch.float32, 2.0, 0.3, 8)
    x = logits.detach()
    assert _same(torch.func.grad(lambda t: cross_entropy(t, labels))(x),
                 torch.func.grad(lambda t: F.cross_entropy(t, labels))(x))
    batch = torch.randn(3, 6, 5)
    assert _same(torch.vmap(lambda t: cross_entropy(t, labels))(batch),
                 torch.vmap(lambda t: F.cross_entropy(t, labels))(batch))


def test_uint8_labels_take_the_lean_path_too():
    """uint8 labels (which F.cross_entropy takes) keep no (B, C) log-softmax either: every saved
    storage besides the logits is smaller than them (the labels as int64, the 0-d count)."""
    logits, labels = _case(8, 5, torch.float32, 1.0, 0.0, 9)
    labels = labels.clamp(min=0).to(torch.uint8)
    ptr = logits.untyped_storage().data_ptr()
    saved, loss = saved_storages(lambda: cross_entropy(logits, labels))
    assert ptr in saved
    assert all(nbytes < logits.untyped_storage().nbytes() for p, nbytes in saved.items() if p != ptr), saved
    grad = torch.autograd.grad(loss, logits)[0]
    expected = F.cross_entropy(logits, labels.long())
    assert _same(loss, expected) and _same(grad, torch.autograd.grad(expected, logits)[0])
