"""dmil_fast.ops.diagonal_gaussian_kl on every backend this machine has, against the reference
oracle and hand-computed closed forms."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dmil_fast as dm
from dmil_fast.ops import BackendUnavailableError
from dmil_fast.reference.gaussian import diagonal_gaussian_kl_ref
from tests.conftest import devices, low_precision_dtypes, triton_device

BACKEND_DEVICES = [("reference", d) for d in devices()] + [("triton", triton_device())]
# the kernels, for comparisons with the reference (its own backend would be compared with itself)
KERNEL_DEVICES = [("triton", triton_device())]
DEVICE = triton_device()  # where the low-precision cases run: the GPU, else the interpreter
PRIORS = ["number", "full", "row_vector", "column", "scalar_tensor"]


def _max_size(backend, device):
    return (64, 40) if backend == "triton" and device == "cpu" else (300, 300)


def make(shape, layout, *, device, dtype=torch.float32, scale=1.0):
    """A (B, E) tensor: contiguous, transposed (column-major) or a strided slice."""
    b, e = shape
    if layout == "transposed":
        return (torch.randn(e, b, device=device, dtype=dtype) * scale).t()
    if layout == "sliced":
        return (torch.randn(b, 2 * e + 1, device=device, dtype=dtype) * scale)[:, 1::2]
    return torch.randn(b, e, device=device, dtype=dtype) * scale


def make_prior(kind, shape, *, device, dtype=torch.float32):
    """A prior argument of the given broadcast kind for q of (B, E)."""
    b, e = shape
    if kind == "number":
        return 0.3
    prior_shape = {"full": (b, e), "row_vector": (e,), "column": (b, 1), "scalar_tensor": ()}[kind]
    return (0.5 * torch.randn(prior_shape, device=device, dtype=dtype)).requires_grad_()


def make_grad(out, layout):
    if out.dim() == 0 or layout == "contiguous":
        return torch.randn_like(out)
    if layout == "expanded":
        return torch.randn((), device=out.device, dtype=out.dtype).expand(out.shape)
    return torch.randn(2 * out.shape[0], device=out.device, dtype=out.dtype)[::2]  # strided


def _grads(out, inputs, grad):
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    return torch.autograd.grad(out, tensors, grad)


def _fresh(t):
    return t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@given(data=st.data(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), p_mu_kind=st.sampled_from(PRIORS),
       p_logvar_kind=st.sampled_from(PRIORS),
       grad_layout=st.sampled_from(["contiguous", "expanded", "strided"]))
def test_forward_and_gradients_match_reference(backend, device, data, layout, reduction, p_mu_kind,
                                               p_logvar_kind, grad_layout):
    max_b, max_e = _max_size(backend, device)
    shape = (data.draw(st.integers(1, max_b), label="B"), data.draw(st.integers(1, max_e), label="E"))
    q_mu = make(shape, layout, device=device).requires_grad_()
    q_lv = make(shape, layout, device=device, scale=1.5).requires_grad_()
    p_mu = make_prior(p_mu_kind, shape, device=device)
    p_lv = make_prior(p_logvar_kind, shape, device=device)
    inputs = (q_mu, q_lv, p_mu, p_lv)
    out = dm.ops.diagonal_gaussian_kl(*inputs, reduction, backend=backend)
    ref_inputs = tuple(_fresh(t) for t in inputs)
    expected = diagonal_gaussian_kl_ref(*ref_inputs, reduction)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=1e-5)
    grad = make_grad(out, grad_layout)
    for g, g_ref in zip(_grads(out, inputs, grad), _grads(expected, ref_inputs, grad)):
        assert g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_leading_dimensions(backend, device):
    q_mu, q_lv = torch.randn(3, 4, 5, device=device), torch.randn(3, 4, 5, device=device)
    p_mu = torch.randn(4, 1, device=device)
    out = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, p_mu, -0.5, "none", backend=backend)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, diagonal_gaussian_kl_ref(q_mu, q_lv, p_mu, -0.5, "none"))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_identical_gaussians_have_zero_kl(backend, device):
    mu, logvar = torch.randn(13, 9, device=device) * 3, torch.randn(13, 9, device=device) * 3
    for reduction in ("mean", "sum", "none"):
        out = dm.ops.diagonal_gaussian_kl(mu, logvar, mu, logvar, reduction, backend=backend)
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_hand_computed_values(backend, device):
    # KL(N(m, e^l) || N(0, 1)) = 0.5 * (m^2 + e^l - l - 1), written out by hand:
    #   m=1, l=0      -> 0.5
    #   m=2, l=0      -> 2.0
    #   m=0, l=ln 2   -> 0.5 * (2 - 0.693147... - 1)  = 0.15342640972
    #   m=0, l=-1     -> 0.5 * (0.367879... + 1 - 1)  = 0.18393972059
    q_mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]], device=device)
    q_lv = torch.tensor([[0.0, 0.0], [math.log(2.0), -1.0]], device=device)
    rows = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, reduction="none", backend=backend)
    torch.testing.assert_close(rows, torch.tensor([1.25, 0.168683065155], device=device))
    total = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, reduction="sum", backend=backend)
    torch.testing.assert_close(total, torch.tensor(2.83736613031, device=device))
    mean = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, backend=backend)
    torch.testing.assert_close(mean, torch.tensor(0.709341532578, device=device))
    # Against a non-standard prior: KL(N(1, 1) || N(0, 4)) = 0.5 * (ln 4 + 1/4 + 1/4 - 1) = 0.44314718056
    kl = dm.ops.diagonal_gaussian_kl(torch.ones(1, 1, device=device), torch.zeros(1, 1, device=device),
                                     0.0, math.log(4.0), backend=backend)
    torch.testing.assert_close(kl, torch.tensor(0.44314718056, device=device))


def test_official_entry_point_is_positional_mean():
    # dm.diagonal_gaussian_kl (dmil_fast.compat) in the op's own terms; its conversions: tests/test_compat.py
    q_mu, q_lv = torch.randn(5, 3), torch.randn(5, 3)
    p_mu, p_lv = torch.randn(5, 3), torch.randn(5, 3)
    d = q_lv - p_lv
    expected = 0.5 * (-d + d.exp() + (q_mu - p_mu) ** 2 * torch.exp(-p_lv) - 1).mean()
    torch.testing.assert_close(dm.diagonal_gaussian_kl(q_mu, q_lv, p_mu, p_lv), expected)
    expected0 = 0.5 * (q_mu ** 2 + q_lv.exp() - q_lv - 1).mean()
    torch.testing.assert_close(dm.diagonal_gaussian_kl(q_mu, q_lv), expected0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_extreme_logvars_finite_and_equal_to_formula(backend, device):
    q_lv = torch.tensor([[80.0, -80.0, 40.0], [-40.0, 0.0, 80.0]], device=device)
    q_mu = torch.tensor([[1.0, -1.0, 2.0], [0.0, 3.0, -2.0]], device=device)
    p_lv = torch.tensor([10.0, -10.0, 0.0], device=device)
    out = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, 0.0, p_lv, "none", backend=backend)
    d = q_lv - p_lv
    assert torch.isfinite(out).all()
    expected = (0.5 * (-d + d.exp() + q_mu ** 2 * torch.exp(-p_lv) - 1)).mean(-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0)
    finite = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, reduction="none", backend=backend)
    assert torch.isfinite(finite).all()
    expected = (0.5 * (q_mu ** 2 + q_lv.exp() - q_lv - 1)).mean(-1)
    torch.testing.assert_close(finite, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKEND_DEVICES if d == "cpu"])
def test_gradcheck_float64(backend, device):
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda qm, ql, pm, pl: dm.ops.diagonal_gaussian_kl(qm, ql, pm, pl, reduction, backend=backend),
            (t(3, 4), t(3, 4), t(4), t(3, 1)))


def test_opcheck_registered_ops():
    device = triton_device()
    q_mu = torch.randn(3, 4, device=device, requires_grad=True)
    q_lv = torch.randn(4, 3, device=device).t().requires_grad_()
    p_mu = torch.randn(4, device=device, requires_grad=True)
    p_lv = torch.randn(3, 1, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dmil_fast.diagonal_gaussian_kl_rows, (q_mu, q_lv, p_mu, p_lv))
    grad_rows = torch.randn((), device=device).expand(3)
    for flags in ((True, True), (False, True), (False, False)):
        torch.library.opcheck(torch.ops.dmil_fast.diagonal_gaussian_kl_rows_backward,
                              (grad_rows, q_mu.detach(), q_lv.detach(), p_mu.detach(), p_lv.detach(), *flags))


@pytest.mark.slow  # an inductor compile of forward and backward on CPU
def test_compile_fullgraph():
    device = triton_device()
    q_mu = torch.randn(5, 6, device=device, requires_grad=True)
    q_lv = torch.randn(5, 6, device=device, requires_grad=True)
    p_mu = torch.randn(6, device=device, requires_grad=True)

    def f(q_mu, q_lv, p_mu):
        return (dm.ops.diagonal_gaussian_kl(q_mu, q_lv, p_mu, 0.5, "none", backend="triton"),
                dm.ops.diagonal_gaussian_kl(q_mu, q_lv))

    rows, mean = torch.compile(f, fullgraph=True)(q_mu, q_lv, p_mu)
    ref = [_fresh(t) for t in (q_mu, q_lv, p_mu)]
    rows_ref = diagonal_gaussian_kl_ref(ref[0], ref[1], ref[2], 0.5, "none")
    torch.testing.assert_close(rows, rows_ref)
    torch.testing.assert_close(mean, diagonal_gaussian_kl_ref(q_mu, q_lv))
    for g, g_ref in zip(torch.autograd.grad(rows.sum(), (q_mu, q_lv, p_mu)),
                        torch.autograd.grad(rows_ref.sum(), ref)):
        torch.testing.assert_close(g, g_ref)


def test_numpy_and_fraction_priors_are_numbers():
    """A NumPy scalar or a Fraction prior is the number it holds: closed form
    KL = 0.5 (lv_p - lv_q + (exp(lv_q) + (mu_q - mu_p)^2) / exp(lv_p) - 1), elementwise mean."""
    import numpy as np
    from fractions import Fraction

    q_mu, q_lv = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    p_mu, p_lv = 0.25, -0.5
    want = (0.5 * (p_lv - q_lv + (q_lv.exp() + (q_mu - p_mu) ** 2) / math.exp(p_lv) - 1)).mean()
    for mu, lv in ((np.float32(p_mu), np.float64(p_lv)), (Fraction(1, 4), Fraction(-1, 2))):
        got = dm.ops.diagonal_gaussian_kl(q_mu, q_lv, mu, lv, backend="reference")
        torch.testing.assert_close(got, want)


def test_validation_errors():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="q_logvar must have the same shape as q_mu"):
        dm.ops.diagonal_gaussian_kl(q, torch.randn(3, 4))
    with pytest.raises(ValueError, match="p_mu must be a number or a tensor broadcastable to q_mu's shape"):
        dm.ops.diagonal_gaussian_kl(q, q, torch.randn(2))
    with pytest.raises(ValueError, match="p_logvar must be a number or a tensor broadcastable"):
        dm.ops.diagonal_gaussian_kl(q, q, 0.0, torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="p_mu has dtype float64 but q_mu has float32"):
        dm.ops.diagonal_gaussian_kl(q, q, torch.randn(3, dtype=torch.float64))
    for not_a_number in ("zero", [0.0, 0.0, 0.0], True):
        with pytest.raises(TypeError, match="p_mu must be a number or a torch.Tensor"):
            dm.ops.diagonal_gaussian_kl(q, q, not_a_number)
    with pytest.raises(TypeError, match="q_mu must have dtype in"):
        dm.ops.diagonal_gaussian_kl(torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="p_logvar is on meta but q_mu is on cpu"):
        dm.ops.diagonal_gaussian_kl(q, q, 0.0, torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="q_mu is empty"):
        dm.ops.diagonal_gaussian_kl(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\)"):
        dm.ops.diagonal_gaussian_kl(q, q, reduction="batchmean")
    for backend, reason in (("cpp", "no C\\+\\+ kernel"), ("cuda", "no CUDA kernel")):
        with pytest.raises(BackendUnavailableError, match=reason):
            dm.ops.diagonal_gaussian_kl(q, q, backend=backend)


@pytest.mark.parametrize("dtype", low_precision_dtypes())
def test_low_precision_error_at_most_twice_pytorch(dtype):
    def lp(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    q_mu, q_lv, p_mu, p_lv = lp(129, 77), lp(129, 77, scale=0.5), lp(77), lp(77, scale=0.5)
    f32 = [t.float().requires_grad_() for t in (q_mu, q_lv, p_mu, p_lv)]
    exact = diagonal_gaussian_kl_ref(*f32, reduction="none")
    grad = lp(129)
    exact_grads = torch.autograd.grad(exact, f32, grad.float())
    ours_in = [t.clone().requires_grad_() for t in (q_mu, q_lv, p_mu, p_lv)]
    ours = dm.ops.diagonal_gaussian_kl(*ours_in, "none", backend="triton")
    ours_grads = torch.autograd.grad(ours, ours_in, grad)
    torch_in = [t.clone().requires_grad_() for t in (q_mu, q_lv, p_mu, p_lv)]
    d = torch_in[1] - torch_in[3]
    native = (0.5 * (-d + d.exp() + (torch_in[0] - torch_in[2]) ** 2 * torch.exp(-torch_in[3]) - 1)).mean(-1)
    native_grads = torch.autograd.grad(native, torch_in, grad)
    assert ours.dtype == dtype

    def err(a, b):
        return (a.float() - b).abs().max()

    assert err(ours, exact) <= 2 * err(native, exact)
    for g, g_native, g_exact in zip(ours_grads, native_grads, exact_grads):
        assert err(g, g_exact) <= 2 * err(g_native, g_exact)
