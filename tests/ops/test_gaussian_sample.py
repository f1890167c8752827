"""dmil_fast.ops.gaussian_sample on every backend this machine has, against the reference formula.

The noise of a backend is recovered from a draw with mu = 0, logvar = 0 and the same seed and
shape (z = eps exactly); every other draw must then equal ``gaussian_sample_ref(mu, logvar, eps)``.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dmil_fast as dm
from dmil_fast.ops import BackendUnavailableError
from dmil_fast.reference.gaussian import gaussian_sample_ref
from tests.conftest import devices, low_precision_dtypes, triton_device

BACKEND_DEVICES = [("reference", d) for d in devices()] + [("triton", triton_device())]
# the kernels, for comparisons with the reference (its own backend would be compared with itself)
KERNEL_DEVICES = [("triton", triton_device())]
DEVICE = triton_device()  # where the low-precision cases run: the GPU, else the interpreter


def _max_size(backend, device):
    return (64, 40) if backend == "triton" and device == "cpu" else (300, 300)


def make(shape, layout, *, device, dtype=torch.float32, scale=1.0):
    """A (B, E) tensor with the given memory layout: contiguous, transposed (column-major) or a
    strided slice of a wider tensor."""
    b, e = shape
    if layout == "transposed":
        return (torch.randn(e, b, device=device, dtype=dtype) * scale).t()
    if layout == "sliced":
        return (torch.randn(b, 2 * e + 1, device=device, dtype=dtype) * scale)[:, 1::2]
    return torch.randn(b, e, device=device, dtype=dtype) * scale


def make_grad(shape, layout, *, device, dtype=torch.float32):
    if layout == "expanded":
        return torch.randn(1, shape[1], device=device, dtype=dtype).expand(shape)
    return make(shape, layout, device=device, dtype=dtype)


def recovered_eps(shape, seed, backend, device, dtype=torch.float32):
    zeros = torch.zeros(shape, device=device, dtype=dtype)
    return dm.ops.gaussian_sample(zeros, zeros, seed=seed, backend=backend)


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@given(data=st.data(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       grad_layout=st.sampled_from(["contiguous", "transposed", "expanded"]),
       seed=st.integers(0, 2**63 - 1))
def test_forward_and_gradients_match_reference(backend, device, data, layout, grad_layout, seed):
    max_b, max_e = _max_size(backend, device)
    b = data.draw(st.integers(1, max_b), label="B")
    e = data.draw(st.integers(1, max_e), label="E")
    mu = make((b, e), layout, device=device).requires_grad_()
    logvar = make((b, e), layout, device=device, scale=2.0).requires_grad_()
    eps = recovered_eps((b, e), seed, backend, device)
    z = dm.ops.gaussian_sample(mu, logvar, seed=seed, backend=backend)
    mu_r = mu.detach().clone().requires_grad_()
    lv_r = logvar.detach().clone().requires_grad_()
    z_r = gaussian_sample_ref(mu_r, lv_r, eps)
    torch.testing.assert_close(z, z_r)
    grad = make_grad((b, e), grad_layout, device=device)
    g_mu, g_lv = torch.autograd.grad(z, (mu, logvar), grad)
    g_mu_r, g_lv_r = torch.autograd.grad(z_r, (mu_r, lv_r), grad)
    torch.testing.assert_close(g_mu, g_mu_r)
    torch.testing.assert_close(g_lv, g_lv_r)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_same_seed_is_bitwise_reproducible_and_seeds_differ(backend, device):
    mu, logvar = torch.randn(9, 13, device=device), torch.randn(9, 13, device=device)
    z1 = dm.ops.gaussian_sample(mu, logvar, seed=1234, backend=backend)
    z2 = dm.ops.gaussian_sample(mu, logvar, seed=1234, backend=backend)
    z3 = dm.ops.gaussian_sample(mu, logvar, seed=1235, backend=backend)
    assert torch.equal(z1, z2)
    assert (z1 != z3).float().mean() > 0.99
    # A NumPy integer seed is the same seed.
    assert torch.equal(dm.ops.gaussian_sample(mu, logvar, seed=np.int64(1234), backend=backend), z1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_seed_none_follows_torch_manual_seed(backend, device):
    mu, logvar = torch.randn(7, 5, device=device), torch.randn(7, 5, device=device)
    torch.manual_seed(42)
    z1 = dm.ops.gaussian_sample(mu, logvar, backend=backend)
    torch.manual_seed(42)
    z2 = dm.ops.gaussian_sample(mu, logvar, backend=backend)
    z3 = dm.ops.gaussian_sample(mu, logvar, backend=backend)
    assert torch.equal(z1, z2)
    assert not torch.equal(z2, z3)


@pytest.mark.parametrize("device", devices())
def test_reference_seed_none_is_the_official_randn_like_draw(device):
    mu, logvar = torch.randn(6, 4, device=device), torch.randn(6, 4, device=device)
    torch.manual_seed(3)
    z = dm.ops.gaussian_sample(mu, logvar, backend="reference")
    torch.manual_seed(3)
    expected = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    torch.testing.assert_close(z, expected)


def test_triton_draw_depends_only_on_the_logical_index():
    device = triton_device()
    mu = torch.randn(6, 4, 10, device=device)
    logvar = torch.randn(6, 4, 10, device=device)
    z = dm.ops.gaussian_sample(mu, logvar, seed=77, backend="triton")
    z_flat = dm.ops.gaussian_sample(mu.reshape(24, 10), logvar.reshape(24, 10), seed=77, backend="triton")
    mu_t = mu.reshape(24, 10).t().contiguous().t()  # same values, column-major
    z_t = dm.ops.gaussian_sample(mu_t, logvar.reshape(24, 10), seed=77, backend="triton")
    assert z.shape == (6, 4, 10)
    assert torch.equal(z.reshape(24, 10), z_flat)
    assert torch.equal(z_t, z_flat)
    # The noise is a function of the flat logical index row * E + col only: one long row of
    # 240 draws gives the same numbers.
    eps = recovered_eps((24, 10), 77, "triton", device)
    eps_line = recovered_eps((1, 240), 77, "triton", device)
    assert torch.equal(eps.reshape(1, 240), eps_line)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noise_moments(backend, device):
    n = 400 * 250
    eps = recovered_eps((400, 250), 2024, backend, device).double().flatten()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    # P(|eps| < 1) of a standard normal is erf(1 / sqrt 2) = 0.682689...
    within = (eps.abs() < 1).double().mean().item()
    assert abs(within - 0.682689) < 5 * math.sqrt(0.682689 * 0.317311 / n)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noise_uncorrelated_across_rows_and_seeds(backend, device):
    rows, cols = 40, 2500
    eps = recovered_eps((rows, cols), 5, backend, device).double()
    corr = torch.corrcoef(eps)  # (rows, rows): row against row
    off_diag = corr[~torch.eye(rows, dtype=torch.bool, device=device)]
    # Independent rows: each correlation ~ N(0, 1/cols); their mean square ~ 1/cols.
    assert off_diag.abs().max() < 5 / math.sqrt(cols)
    assert (off_diag.pow(2).mean() * cols - 1).abs() < 0.3
    other = recovered_eps((rows, cols), 6, backend, device).double()
    across = torch.corrcoef(torch.stack([eps.flatten(), other.flatten()]))[0, 1]
    assert abs(across.item()) < 5 / math.sqrt(rows * cols)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradient_identities(backend, device):
    mu = torch.randn(11, 7, device=device, requires_grad=True)
    logvar = torch.randn(11, 7, device=device, requires_grad=True)
    z = dm.ops.gaussian_sample(mu, logvar, seed=9, backend=backend)
    g_mu, g_lv = torch.autograd.grad(z.sum(), (mu, logvar))
    assert torch.equal(g_mu, torch.ones_like(mu))
    torch.testing.assert_close(g_lv, (z - mu).detach() / 2)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_extreme_logvar_is_finite_and_matches_formula(backend, device):
    logvar = torch.tensor([[-80.0, 80.0, -40.0, 40.0], [80.0, -80.0, 0.0, 1e-3]], device=device)
    mu = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1e3, -1.0, 2.0]], device=device)
    eps = recovered_eps(mu.shape, 8, backend, device)
    z = dm.ops.gaussian_sample(mu, logvar, seed=8, backend=backend)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKEND_DEVICES if d == "cpu"])
def test_gradcheck_float64(backend, device):
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m, lv: dm.ops.gaussian_sample(m, lv, seed=11, backend=backend), (mu, logvar))


def test_opcheck_registered_ops():
    device = triton_device()
    mu = torch.randn(3, 5, device=device, requires_grad=True)
    logvar = torch.randn(5, 3, device=device).t().requires_grad_()
    seed = torch.tensor([17], device=device)
    torch.library.opcheck(torch.ops.dmil_fast.gaussian_sample, (mu, logvar, seed))
    grad_z = torch.randn(1, 5, device=device).expand(3, 5)
    torch.library.opcheck(torch.ops.dmil_fast.gaussian_sample_backward, (grad_z, logvar.detach(), seed))


@pytest.mark.slow  # an inductor compile of forward and backward on CPU
def test_compile_fullgraph():
    device = triton_device()
    mu = torch.randn(4, 6, device=device, requires_grad=True)
    logvar = torch.randn(4, 6, device=device, requires_grad=True)

    def f(mu, logvar):
        unseeded = dm.ops.gaussian_sample(mu, logvar, backend="triton")
        seeded = dm.ops.gaussian_sample(mu, logvar, seed=5, backend="triton")
        default = dm.ops.gaussian_sample(mu, logvar)
        return unseeded, seeded, default

    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(1)
    unseeded, seeded, default = compiled(mu, logvar)
    torch.manual_seed(1)
    unseeded_again, _, default_again = compiled(mu, logvar)
    assert torch.equal(unseeded, unseeded_again) and torch.equal(default, default_again)
    eps = recovered_eps((4, 6), 5, "triton", device)
    torch.testing.assert_close(seeded, gaussian_sample_ref(mu, logvar, eps))
    g_lv = torch.autograd.grad(seeded.sum(), logvar)[0]
    torch.testing.assert_close(g_lv, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_validation_errors():
    mu = torch.randn(4, 3)
    with pytest.raises(ValueError, match="logvar must have the same shape as mu"):
        dm.ops.gaussian_sample(mu, torch.randn(4, 2))
    with pytest.raises(TypeError, match="logvar has dtype float64"):
        dm.ops.gaussian_sample(mu, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="mu must have dtype in"):
        dm.ops.gaussian_sample(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="mu must be a torch.Tensor"):
        dm.ops.gaussian_sample([1.0], mu)
    with pytest.raises(ValueError, match="logvar is on meta but mu is on cpu"):
        dm.ops.gaussian_sample(mu, torch.empty(4, 3, device="meta"))
    with pytest.raises(ValueError, match="mu is empty"):
        dm.ops.gaussian_sample(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(TypeError, match="seed must be None or an int"):
        dm.ops.gaussian_sample(mu, mu, seed=1.5)
    with pytest.raises(ValueError, match=r"seed must be None or an int in \[0, 2\*\*63 - 1\]"):
        dm.ops.gaussian_sample(mu, mu, seed=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        dm.ops.gaussian_sample(mu, mu, backend="numpy")
    for backend, reason in (("cpp", "no C\\+\\+ kernel"), ("cuda", "no CUDA kernel")):
        with pytest.raises(BackendUnavailableError, match=reason):
            dm.ops.gaussian_sample(mu, mu, backend=backend)


@pytest.mark.parametrize("dtype", low_precision_dtypes())
def test_low_precision_error_at_most_twice_pytorch(dtype):
    mu32 = torch.randn(257, 129, device=DEVICE).to(dtype).float()
    lv32 = torch.randn(257, 129, device=DEVICE).to(dtype).float()
    eps = recovered_eps((257, 129), 3, "triton", DEVICE)
    exact = mu32 + torch.exp(0.5 * lv32) * eps
    z = dm.ops.gaussian_sample(mu32.to(dtype), lv32.to(dtype), seed=3, backend="triton")
    mu_lp, lv_lp, eps_lp = mu32.to(dtype), lv32.to(dtype), eps.to(dtype)
    torch_lp = mu_lp + torch.exp(0.5 * lv_lp) * eps_lp
    assert z.dtype == dtype
    assert (z.float() - exact).abs().max() <= 2 * (torch_lp.float() - exact).abs().max()
    # d loss / d logvar for loss = sum(grad * z)
    grad32 = torch.randn(257, 129, device=DEVICE).to(dtype).float()
    exact_g = grad32 * 0.5 * torch.exp(0.5 * lv32) * eps
    lv = lv32.to(dtype).requires_grad_()
    z = dm.ops.gaussian_sample(mu32.to(dtype), lv, seed=3, backend="triton")
    g = torch.autograd.grad(z, lv, grad32.to(dtype))[0]
    torch_g = grad32.to(dtype) * 0.5 * torch.exp(0.5 * lv_lp) * eps_lp
    assert g.dtype == dtype
    assert (g.float() - exact_g).abs().max() <= 2 * (torch_g.float() - exact_g).abs().max()
