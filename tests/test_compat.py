"""dm.diagonal_gaussian_kl (dmil_fast.compat): the official function's names, conversions and
broadcasting, on the reference and Triton backends, against the closed form written out here."""

import numpy as np
import pytest
import torch

import dmil_fast as dm
from tests.conftest import devices, triton_device

BACKEND_DEVICES = [("reference", d) for d in devices()] + [("triton", triton_device())]


def closed_form(q_mean, q_log_var, p_mean, p_log_var):
    """0.5 * mean(-d + e^d + (q_mean - p_mean)^2 e^-p_log_var - 1), d = q_log_var - p_log_var, in float64."""
    qm, ql, pm, pl = (torch.as_tensor(t).detach().double().cpu() for t in (q_mean, q_log_var, p_mean, p_log_var))
    d = ql - pl
    return (0.5 * (-d + d.exp() + (qm - pm) ** 2 * torch.exp(-pl) - 1)).mean()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_official_keyword_names_and_defaults(backend, device):
    q_mean, q_log_var = torch.randn(6, 5, device=device), torch.randn(6, 5, device=device)
    p_mean, p_log_var = torch.randn(6, 5, device=device), torch.randn(5, device=device)
    out = dm.diagonal_gaussian_kl(q_mean=q_mean, q_log_var=q_log_var, p_mean=p_mean, p_log_var=p_log_var,
                                  backend=backend)
    assert out.shape == () and out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), closed_form(q_mean, q_log_var, p_mean, p_log_var))
    positional = dm.diagonal_gaussian_kl(q_mean, q_log_var, p_mean, p_log_var, backend=backend)
    torch.testing.assert_close(positional, out)
    standard = dm.diagonal_gaussian_kl(q_mean, q_log_var, backend=backend)
    torch.testing.assert_close(standard.double().cpu(), closed_form(q_mean, q_log_var, 0.0, 0.0))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_prior_of_another_dtype_is_cast_and_gets_its_gradient(backend, device):
    # The official function casts the priors to q's dtype; the op itself refuses a mixed dtype.
    q_mean = torch.randn(4, 3, device=device, requires_grad=True)
    q_log_var = torch.randn(4, 3, device=device, requires_grad=True)
    p_mean = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    p_log_var = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    out = dm.diagonal_gaussian_kl(q_mean, q_log_var, p_mean, p_log_var, backend=backend)
    assert out.dtype == torch.float32
    expected = closed_form(q_mean, q_log_var, p_mean.float(), p_log_var.float())
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    out.backward()
    # d/dp_mean of the mean: -(q_mean - p_mean) e^-p_log_var / N; d/dp_log_var: summed over the rows.
    n = q_mean.numel()
    qm, ql, pm, pl = (t.detach().double() for t in (q_mean, q_log_var, p_mean, p_log_var))
    g_pm = -(qm - pm) * torch.exp(-pl) / n
    g_pl = (0.5 * (1 - torch.exp(ql - pl) - (qm - pm) ** 2 * torch.exp(-pl)) / n).sum(0)
    assert p_mean.grad.dtype == torch.float64 and p_log_var.grad.shape == (3,)
    torch.testing.assert_close(p_mean.grad, g_pm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p_log_var.grad, g_pl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q_mean.grad.double(), -g_pm, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_numpy_and_list_priors(backend, device):
    q_mean, q_log_var = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    p_mean = np.linspace(-1.0, 1.0, 4)  # float64 array, taken to float32 as the official does
    p_log_var = [0.5, -0.5, 0.0, 1.0]
    out = dm.diagonal_gaussian_kl(q_mean, q_log_var, p_mean, p_log_var, backend=backend)
    expected = closed_form(q_mean, q_log_var, torch.tensor(p_mean).float(), torch.tensor(p_log_var))
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    scalar = dm.diagonal_gaussian_kl(q_mean, q_log_var, np.float32(0.25), 1, backend=backend)
    torch.testing.assert_close(scalar.double().cpu(), closed_form(q_mean, q_log_var, 0.25, 1.0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_broadcasting_as_pytorch_does(backend, device):
    # A prior with more dimensions than q: the mean runs over the broadcast (2, 4, 3) shape.
    q_mean = torch.randn(4, 3, device=device, requires_grad=True)
    q_log_var = torch.randn(1, 3, device=device)
    p_mean = torch.randn(2, 1, 3, device=device)
    out = dm.diagonal_gaussian_kl(q_mean, q_log_var, p_mean, 0.5, backend=backend)
    torch.testing.assert_close(out.double().cpu(), closed_form(q_mean, q_log_var, p_mean, 0.5),
                               rtol=1e-5, atol=1e-6)
    out.backward()
    assert q_mean.grad.shape == (4, 3)
    expected = (q_mean.detach() - p_mean) * np.exp(-0.5) / 24  # d/dq_mean, summed over the broadcast axis
    torch.testing.assert_close(q_mean.grad, expected.sum(0), rtol=1e-5, atol=1e-7)


def test_dtypes_promote_and_zero_dim_inputs():
    q_mean = torch.randn(5, 2)
    q_log_var = torch.randn(5, 2, dtype=torch.float64)
    out = dm.diagonal_gaussian_kl(q_mean, q_log_var, 0.1, 0.2)
    assert out.dtype == torch.float64  # the official result's dtype: float32 and float64 promote
    torch.testing.assert_close(out, closed_form(q_mean, q_log_var, 0.1, 0.2))
    # KL(N(1, 1) || N(0, 1)) = 0.5, from 0-d tensors
    out = dm.diagonal_gaussian_kl(torch.tensor(1.0), torch.tensor(0.0))
    assert out.shape == ()
    torch.testing.assert_close(out, torch.tensor(0.5))


@pytest.mark.parametrize("args,error,words", [
    (("x", torch.zeros(2)), TypeError, "q_mean must be a torch.Tensor"),
    ((torch.zeros(2), torch.zeros(2, dtype=torch.int64)), TypeError, "q_log_var must have dtype"),
    ((torch.zeros(3), torch.zeros(4)), ValueError, "must broadcast together, got shapes (3,), (4,)"),
    ((torch.zeros(3), torch.zeros(3), "prior"), TypeError, "p_mean must be a number, a tensor"),
    ((torch.zeros(3), torch.zeros(3), 0.0, object()), TypeError, "p_log_var must be a number"),
    ((torch.zeros(0, 3), torch.zeros(0, 3)), ValueError, "empty shape (0, 3)"),
    ((torch.tensor([0.0, float("nan")]), torch.zeros(2)), ValueError, "q_mean contains NaN"),
    ((torch.zeros(2), torch.zeros(2), torch.tensor([float("nan")])), ValueError, "p_mean contains NaN"),
])
def test_bad_arguments_are_named(args, error, words):
    with pytest.raises(error) as info:
        dm.diagonal_gaussian_kl(*args)
    assert words in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a prior on the CPU for q on a GPU needs a GPU")
def test_cpu_prior_moves_to_q_device():
    q_mean, q_log_var = torch.randn(4, 3, device="cuda"), torch.randn(4, 3, device="cuda")
    p_log_var = torch.randn(3)  # on the CPU: moved, as the official function moves it
    out = dm.diagonal_gaussian_kl(q_mean, q_log_var, 0.0, p_log_var)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.double().cpu(), closed_form(q_mean, q_log_var, 0.0, p_log_var),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # an inductor compile on the CPU
def test_compile_fullgraph_with_a_converted_prior():
    compiled = torch.compile(lambda q, lv, p: dm.diagonal_gaussian_kl(q, lv, p, 0.5), fullgraph=True)
    q_mean = torch.randn(4, 3, requires_grad=True)
    q_log_var = torch.randn(4, 3)
    p_mean = torch.randn(3, dtype=torch.float64)
    out = compiled(q_mean, q_log_var, p_mean)
    torch.testing.assert_close(out.double(), closed_form(q_mean, q_log_var, p_mean.float(), 0.5))
    out.backward()
    expected = ((q_mean.detach() - p_mean.float()) * np.exp(-0.5) / 12).double()
    torch.testing.assert_close(q_mean.grad.double(), expected, rtol=1e-5, atol=1e-7)
