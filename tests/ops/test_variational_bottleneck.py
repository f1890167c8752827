"""dmil_fast.ops.variational_bottleneck(_grouped) on every backend this machine has, against the
reference oracle. A backend's noise is recovered from a draw with weight = 0 and bias = 0
(mu = logvar = 0, so z = eps exactly) with the same seed and shapes."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dmil_fast as dm
from dmil_fast.ops import BackendUnavailableError
from dmil_fast.reference.gaussian import variational_bottleneck_grouped_ref, variational_bottleneck_ref
from tests.conftest import devices, low_precision_dtypes, triton_device

BACKEND_DEVICES = [("reference", d) for d in devices()] + [("triton", triton_device())]
# the kernels, for comparisons with the reference (its own backend would be compared with itself)
KERNEL_DEVICES = [("triton", triton_device())]
DEVICE = triton_device()  # where the low-precision cases run: the GPU, else the interpreter


def _max_sizes(backend, device):
    """(B, D, E, G) upper bounds: small under the CPU interpreter."""
    return (48, 24, 16, 3) if backend == "triton" and device == "cpu" else (300, 64, 64, 4)


def make(shape, layout, *, device, dtype=torch.float32, scale=1.0):
    """A 2-D tensor: contiguous, transposed (column-major) or a strided slice."""
    rows, cols = shape
    if layout == "transposed":
        return (torch.randn(cols, rows, device=device, dtype=dtype) * scale).t()
    if layout == "sliced":
        return (torch.randn(rows, 2 * cols + 1, device=device, dtype=dtype) * scale)[:, 1::2]
    return torch.randn(rows, cols, device=device, dtype=dtype) * scale


def make_grad(out, layout):
    if out.dim() == 0 or layout == "contiguous":
        return torch.randn_like(out)
    if layout == "expanded":
        return torch.randn(out.shape[-1], device=out.device, dtype=out.dtype).expand(out.shape)
    return torch.randn(*out.shape[:-1], 2 * out.shape[-1], device=out.device, dtype=out.dtype)[..., ::2]


def recovered_eps(b, d, e, groups, seed, backend, device, dtype=torch.float32):
    """(B, G, E) noise of the grouped op for this seed and shape."""
    x = torch.randn(b, d, device=device, dtype=dtype)
    zero_w = torch.zeros(groups * 2 * e, d, device=device, dtype=dtype)
    zero_b = torch.zeros(groups * 2 * e, device=device, dtype=dtype)
    return dm.ops.variational_bottleneck_grouped(x, zero_w, zero_b, groups, seed=seed, backend=backend)[0]


def _fresh(t):
    return None if t is None else t.detach().clone().requires_grad_()


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@given(data=st.data(), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       sample=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**63 - 1),
       used=st.sampled_from(["all", "z", "kl", "mu_logvar"]),
       grad_layout=st.sampled_from(["contiguous", "expanded", "strided"]), recompute=st.booleans())
def test_grouped_matches_reference(backend, device, data, layout, sample, with_bias, seed, used, grad_layout,
                                   recompute):
    max_b, max_d, max_e, max_g = _max_sizes(backend, device)
    b, d = data.draw(st.integers(1, max_b), label="B"), data.draw(st.integers(1, max_d), label="D")
    e, g = data.draw(st.integers(1, max_e), label="E"), data.draw(st.integers(1, max_g), label="G")
    x = make((b, d), layout, device=device).requires_grad_()
    weight = make((g * 2 * e, d), layout, device=device, scale=d ** -0.5).requires_grad_()
    bias = torch.randn(g * 2 * e, device=device).requires_grad_() if with_bias else None
    eps = recovered_eps(b, d, e, g, seed, backend, device) if sample else None
    out = dm.ops.variational_bottleneck_grouped(x, weight, bias, g, sample=sample, seed=seed, backend=backend,
                                                recompute=recompute)
    ref_in = (_fresh(x), _fresh(weight), _fresh(bias))
    ref = variational_bottleneck_grouped_ref(*ref_in, g, sample=sample, eps=eps)
    for name, o, r in zip(("z", "mu", "logvar", "kl"), out, ref):
        assert o.shape == r.shape, name
        torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5, msg=name)
    picked = {"all": (0, 1, 2, 3), "z": (0,), "kl": (3,), "mu_logvar": (1, 2)}[used]
    grads = [make_grad(out[i], grad_layout) for i in picked]
    inputs = [t for t in (x, weight, bias) if t is not None]
    ref_inputs = [t for t in ref_in if t is not None]
    ours = torch.autograd.grad([out[i] for i in picked], inputs, grads)
    theirs = torch.autograd.grad([ref[i] for i in picked], ref_inputs, grads)
    for o, r in zip(ours, theirs):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", KERNEL_DEVICES)
@given(data=st.data(), sample=st.booleans(), transposed_weight=st.booleans(), recompute=st.booleans())
def test_single_head_matches_reference(backend, device, data, sample, transposed_weight, recompute):
    max_b, max_d, max_e, _ = _max_sizes(backend, device)
    b, d = data.draw(st.integers(1, max_b), label="B"), data.draw(st.integers(1, max_d), label="D")
    e = data.draw(st.integers(1, max_e), label="E")
    x = torch.randn(b, d, device=device, requires_grad=True)
    layout = "transposed" if transposed_weight else "contiguous"
    weight = make((2 * e, d), layout, device=device, scale=d ** -0.5).requires_grad_()
    bias = torch.randn(2 * e, device=device, requires_grad=True)
    eps = recovered_eps(b, d, e, 1, 99, backend, device)[:, 0] if sample else None
    out = dm.ops.variational_bottleneck(x, weight, bias, sample=sample, seed=99, backend=backend,
                                        recompute=recompute)
    ref_in = (_fresh(x), _fresh(weight), _fresh(bias))
    ref = variational_bottleneck_ref(*ref_in, sample=sample, eps=eps)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5)
    grads = [torch.randn_like(o) for o in out]
    for o, r in zip(torch.autograd.grad(out, (x, weight, bias), grads),
                    torch.autograd.grad(ref, ref_in, grads)):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_one_group_draws_what_the_single_head_and_the_sampler_draw(backend, device):
    x = torch.randn(13, 7, device=device)
    weight, bias = torch.randn(10, 7, device=device), torch.randn(10, device=device)
    z, mu, logvar, kl = dm.ops.variational_bottleneck(x, weight, bias, seed=31, backend=backend)
    zg, mug, lvg, klg = dm.ops.variational_bottleneck_grouped(x, weight, bias, 1, seed=31, backend=backend)
    zs = dm.ops.gaussian_sample(mu, logvar, seed=31, backend=backend)
    assert torch.equal(z, zg[:, 0]) and torch.equal(z, zs)
    assert torch.equal(mu, mug[:, 0]) and torch.equal(logvar, lvg[:, 0])
    if backend == "triton":  # head g of row b draws at the logical offsets (b * G + g) * E + e
        eps = recovered_eps(5, 3, 4, 3, 31, backend, device)  # (B, G, E)
        line = torch.zeros(1, 5 * 3 * 4, device=device)
        assert torch.equal(eps.reshape(1, -1), dm.ops.gaussian_sample(line, line, seed=31, backend=backend))
    torch.testing.assert_close(kl, klg[0])  # the reference reduces in another order


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_eval_mode_returns_mean_keeps_kl_and_draws_nothing(backend, device):
    x = torch.randn(6, 5, device=device)
    weight, bias = torch.randn(8, 5, device=device), torch.randn(8, device=device)
    torch.manual_seed(0)
    z, mu, logvar, kl = dm.ops.variational_bottleneck(x, weight, bias, sample=False, backend=backend)
    after = torch.rand(3, device=device)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3, device=device))  # the generator did not advance
    assert torch.equal(z, mu)
    h = x @ weight.t() + bias
    torch.testing.assert_close(mu, h[:, :4])
    torch.testing.assert_close(kl, 0.5 * (h[:, :4] ** 2 + h[:, 4:].exp() - h[:, 4:] - 1).mean())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_seed_determinism(backend, device):
    x = torch.randn(9, 4, device=device)
    weight, bias = torch.randn(12, 4, device=device), torch.randn(12, device=device)
    a = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, seed=5, backend=backend)[0]
    b = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, seed=5, backend=backend)[0]
    c = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, seed=6, backend=backend)[0]
    torch.manual_seed(8)
    d = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, backend=backend)[0]
    torch.manual_seed(8)
    e = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, backend=backend)[0]
    assert torch.equal(a, b) and torch.equal(d, e)
    assert (a != c).float().mean() > 0.99
    assert torch.equal(dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, seed=np.uint32(5),
                                                             backend=backend)[0], a)  # NumPy seeds
    eps = recovered_eps(9, 4, 3, 2, 5, backend, device)
    assert (eps[:, 0] != eps[:, 1]).all()  # each head draws its own noise


def test_triton_mu_and_logvar_are_views_of_one_projection():
    device = triton_device()
    x = torch.randn(5, 3, device=device)
    _, mu, logvar, _ = dm.ops.variational_bottleneck_grouped(
        x, torch.randn(12, 3, device=device), None, 2, backend="triton")
    assert mu._base is not None and mu._base is logvar._base
    assert mu._base.shape == (5, 12)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKEND_DEVICES if d == "cpu"])
def test_gradcheck_float64(backend, device):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: dm.ops.variational_bottleneck_grouped(x, w, b, 2, seed=4, backend=backend),
        (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, w: dm.ops.variational_bottleneck(x, w, None, sample=False, backend=backend),
        (x, weight[:4]))


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_keeps_no_projection_for_the_backward(recompute):
    """recompute=True: the backward keeps x, W, b and the seed, not h (B, G*2E); without it, h."""
    device = triton_device()
    x = torch.randn(6, 5, device=device, requires_grad=True)
    weight = torch.randn(2 * 2 * 3, 5, device=device, requires_grad=True)
    bias = torch.randn(12, device=device, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        z, mu, logvar, kl = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, seed=5, backend="triton",
                                                                  recompute=recompute)
    h_storage = mu.untyped_storage().data_ptr()
    assert any(t.untyped_storage().data_ptr() == h_storage for t in kept) is (not recompute)
    assert any(t is bias for t in kept) is recompute
    (z.sum() + kl.sum()).backward()  # the recomputed h gives finite gradients everywhere
    assert all(torch.isfinite(p.grad).all() for p in (x, weight, bias))


def test_opcheck_registered_ops():
    device = triton_device()
    x = torch.randn(3, 4, device=device, requires_grad=True)
    weight = torch.randn(4, 12, device=device).t().requires_grad_()
    bias = torch.randn(12, device=device, requires_grad=True)
    seed = torch.tensor([3], device=device)
    for args in ((x, weight, bias, seed, 2, True, False), (x, weight, None, seed, 3, False, False),
                 (x, weight, bias, seed, 2, True, True), (x, weight, None, seed, 3, False, True)):
        torch.library.opcheck(torch.ops.dmil_fast.variational_bottleneck, args)
    h = torch.randn(3, 12, device=device)
    backward = torch.ops.dmil_fast.variational_bottleneck_backward
    torch.library.opcheck(backward, (torch.randn(3, 12, device=device), torch.randn(3, 2, 3, device=device),
                                     torch.randn(3, 2, device=device), h, seed, 2))
    torch.library.opcheck(backward, (None, None, torch.randn((), device=device).expand(3, 1), h, seed, 1))


@pytest.mark.slow  # an inductor compile of forward and backward on CPU
def test_compile_fullgraph():
    device = triton_device()
    x = torch.randn(6, 5, device=device, requires_grad=True)
    weight = torch.randn(12, 5, device=device, requires_grad=True)
    bias = torch.randn(12, device=device, requires_grad=True)

    def f(x, weight, bias):
        unseeded = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, backend="triton")
        seeded = dm.ops.variational_bottleneck(x, weight, bias, seed=12, backend="triton")
        default = dm.ops.variational_bottleneck(x, weight, bias)
        return unseeded[0], seeded[0], seeded[3], default[0]

    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(2)
    first = compiled(x, weight, bias)
    torch.manual_seed(2)
    again = compiled(x, weight, bias)
    assert torch.equal(first[0], again[0]) and torch.equal(first[3], again[3])
    eps = recovered_eps(6, 5, 6, 1, 12, "triton", device)[:, 0]
    ref_in = (_fresh(x), _fresh(weight), _fresh(bias))
    z_ref, _, _, kl_ref = variational_bottleneck_ref(*ref_in, eps=eps)
    torch.testing.assert_close(first[1], z_ref)
    torch.testing.assert_close(first[2], kl_ref)
    for o, r in zip(torch.autograd.grad(first[1].sum() + first[2], (x, weight, bias)),
                    torch.autograd.grad(z_ref.sum() + kl_ref, ref_in)):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_validation_errors():
    x, w, b = torch.randn(4, 3), torch.randn(6, 3), torch.randn(6)
    vb, vbg = dm.ops.variational_bottleneck, dm.ops.variational_bottleneck_grouped
    with pytest.raises(ValueError, match=r"weight must have shape \(2E\*groups, D\) with D = x.shape\[1\]"):
        vb(x, torch.randn(6, 4), b)
    with pytest.raises(ValueError, match="not divisible by 2\\*groups = 2"):
        vb(x, torch.randn(5, 3), torch.randn(5))
    with pytest.raises(ValueError, match="not divisible by 2\\*groups = 4"):
        vbg(x, w, b, 2)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        vb(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        vb(x, w, torch.randn(1, 6))
    with pytest.raises(ValueError, match="x must be 2-D"):
        vb(torch.randn(2, 4, 3), w, b)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32"):
        vb(x, w.double(), b)
    with pytest.raises(TypeError, match="x must have dtype in"):
        vb(torch.ones(4, 3, dtype=torch.int64), w, b)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        vb(x, w, torch.empty(6, device="meta"))
    with pytest.raises(ValueError, match="x is empty"):
        vb(torch.randn(0, 3), w, b)
    with pytest.raises(ValueError, match="groups must be an int >= 1, got 0"):
        vbg(x, w, b, 0)
    with pytest.raises(TypeError, match="groups must be an int >= 1, got float"):
        vbg(x, w, b, 1.0)
    with pytest.raises(TypeError, match="sample must be a bool"):
        vb(x, w, b, sample=1)
    with pytest.raises(TypeError, match="recompute must be a bool, got int"):
        vbg(x, w, b, 1, recompute=1)
    with pytest.raises(TypeError, match="seed must be None or an int"):
        vb(x, w, b, seed="7")
    for backend, reason in (("cpp", "no C\\+\\+ kernel"), ("cuda", "no CUDA kernel")):
        with pytest.raises(BackendUnavailableError, match=reason):
            vb(x, w, b, backend=backend)


@pytest.mark.parametrize("dtype", low_precision_dtypes())
def test_low_precision_error_at_most_twice_pytorch(dtype):
    b, d, g, e = 257, 96, 3, 40
    params = (torch.randn(b, d, device=DEVICE).to(dtype),
              (torch.randn(g * 2 * e, d, device=DEVICE) * d ** -0.5).to(dtype),
              torch.randn(g * 2 * e, device=DEVICE).to(dtype))
    grad_z, grad_kl = torch.randn(b, g, e, device=DEVICE).to(dtype), torch.randn(g, device=DEVICE).to(dtype)
    eps = recovered_eps(b, d, e, g, 21, "triton", DEVICE)  # float32 noise

    def run(fn, inputs, grad_dtype):
        inputs = [t.clone().requires_grad_() for t in inputs]
        z, kl = fn(*inputs)
        grads = torch.autograd.grad((z, kl), inputs, (grad_z.to(grad_dtype), grad_kl.to(grad_dtype)))
        return [z, kl, *grads]

    def native(x, weight, bias):  # PyTorch's own computation in this dtype, same noise
        h = torch.nn.functional.linear(x, weight, bias).view(b, g, 2 * e)
        mu, logvar = h[..., :e], h[..., e:]
        z = mu + torch.exp(0.5 * logvar) * eps.to(x.dtype)
        return z, (0.5 * (mu ** 2 + logvar.exp() - logvar - 1)).mean(dim=(0, 2))

    exact = run(native, [t.float() for t in params], torch.float32)
    ours = run(lambda *t: dm.ops.variational_bottleneck_grouped(*t, g, seed=21, backend="triton")[::3],
               params, dtype)
    theirs = run(native, params, dtype)
    for name, o, n, r in zip(("z", "kl", "grad_x", "grad_weight", "grad_bias"), ours, theirs, exact):
        assert o.dtype == dtype, name
        assert (o.float() - r).abs().max() <= 2 * (n.float() - r).abs().max(), name


# ---- autocast -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouped", [False, True])
def test_autocast_casts_like_linear(device, x_dtype, grouped):
    """Under bf16 autocast a float32 or bf16 x meets float32 parameters, as in a trained model:
    the head runs in bf16 and its mean is torch's own autocast Linear."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(33, 20, generator=gen).to(device, x_dtype)
    weight = torch.randn(2 * 2 * 8, 20, generator=gen).to(device)  # G=2 heads of E=8, float32
    bias = torch.randn(2 * 2 * 8, generator=gen).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        want = torch.nn.functional.linear(x, weight, bias)  # (B, 2*2E) in bf16
        if grouped:
            z, mu, logvar, kl = dm.ops.variational_bottleneck_grouped(x, weight, bias, 2, seed=5)
        else:
            z, mu, logvar, kl = dm.ops.variational_bottleneck(x, weight[:16], bias[:16], seed=5)
            want = want[:, :16]
    want = want.view(33, -1, 16)
    for out in (z, mu, logvar, kl):
        assert out.dtype == torch.bfloat16
    torch.testing.assert_close(mu.reshape(33, -1, 8), want[..., :8], rtol=0, atol=0)
    torch.testing.assert_close(logvar.reshape(33, -1, 8), want[..., 8:], rtol=0, atol=0)


def test_autocast_leaves_float64_alone_and_names_the_mismatch():
    x = torch.randn(4, 6, dtype=torch.float64)
    weight = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="weight"):
            dm.ops.variational_bottleneck(x, weight, None)
        z, mu, logvar, kl = dm.ops.variational_bottleneck(x, weight.double(), None, sample=False)
    assert mu.dtype == torch.float64 and kl.dtype == torch.float64
