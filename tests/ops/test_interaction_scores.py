"""dmil_fast.ops.interaction_scores / adjust_interactions on every backend this machine has,
against the pure-PyTorch oracle and hand-computed values; the C++ ops through torch.library."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dmil_fast as dm
from dmil_fast.ops import BackendUnavailableError, InteractionScores
from dmil_fast.ops._validate import NaNInputError
from dmil_fast.reference.interactions import adjust_interactions_ref, interaction_scores_ref
from tests.conftest import devices, low_precision_dtypes, triton_device

ON_GPU = [d for d in devices() if d == "cuda"]
BACKEND_DEVICES = ([("reference", d) for d in devices()] + [("cpp", "cpu")]
                   + [("cuda", d) for d in ON_GPU] + [("triton", triton_device())])
FUSED_DEVICES = [("cpp", "cpu")] + [("cuda", d) for d in ON_GPU] + [("triton", triton_device())]
CPP_DEVICES = [("cpp", "cpu")] + [("cuda", d) for d in ON_GPU]
GPU_KERNEL_DEVICES = [("cuda", d) for d in ON_GPU] + [("triton", triton_device())]  # kernels that NaN bad rows


def _backends():
    import sys
    return sys.modules["dmil_fast.ops.interaction_scores"].BACKENDS


def require(backend, device, dtype=torch.float32):
    reason = _backends().checks[backend](torch.device(device), dtype)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {reason}")


def make_logits(b, c, layout="contiguous", *, device="cpu", dtype=torch.float32, scale=2.0,
                gen=None):
    """(B, C) logits: contiguous, transposed (column-major) or a strided slice."""
    if layout == "transposed":
        return (torch.randn(c, b, generator=gen, dtype=torch.float64) * scale).to(device, dtype).t()
    if layout == "sliced":
        full = torch.randn(b, 2 * c + 1, generator=gen, dtype=torch.float64) * scale
        return full.to(device, dtype)[:, 1::2]
    return (torch.randn(b, c, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def make_case(b, c, *, redundancy="lsmi", prior=False, device="cpu", dtype=torch.float32,
              layout="contiguous", scale=2.0, seed=0):
    """Keyword arguments of interaction_scores (without backend) for one random case."""
    gen = torch.Generator().manual_seed(seed)
    logits = [make_logits(b, c, layout, device=device, dtype=dtype, scale=scale, gen=gen)
              for _ in range(3)]
    labels = torch.randint(0, c, (b,), generator=gen).to(device)
    ent = [(torch.randn(b, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
           for _ in range(2)]
    case = dict(logits_1=logits[0], logits_2=logits[1], logits_12=logits[2], labels=labels,
                redundancy=redundancy)
    if redundancy == "lsmi":
        case.update(entropy_1=ent[0], entropy_2=ent[1])
    if prior:
        case["log_prior"] = torch.log_softmax(torch.randn(c, generator=gen), 0).to(device, dtype)
    return case


DIFF_KEYS = ("logits_1", "logits_2", "logits_12", "entropy_1", "entropy_2")


def run_with_grads(fn, case, grads):
    """Scores and the gradients of sum_k <field_k, grads[k]> w.r.t. logits and entropies."""
    case = {k: (v.detach().clone().requires_grad_() if k in DIFF_KEYS else v)
            for k, v in case.items()}
    out = fn(**case)
    inputs = [case[k] for k in DIFF_KEYS if k in case]
    got = torch.autograd.grad(list(out), inputs, list(grads), allow_unused=True)
    return out, got


def assert_close_scores(out, ref, *, rtol, atol):
    assert isinstance(out, InteractionScores)
    for name, a, b in zip(InteractionScores._fields, out, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def tolerances(dtype, scale=1.0):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 * scale)
    return dict(rtol=2e-5, atol=2e-5 * scale)


def assert_matches_reference(fn, case, grads, *, rtol, atol):
    """fn(**case)'s scores, and its gradients for ``grads`` (see run_with_grads), against the
    reference's on the same case; returns fn's (scores, gradients)."""
    out, got = run_with_grads(fn, case, grads)
    ref, want = run_with_grads(interaction_scores_ref, case, grads)
    assert_close_scores(out, ref, rtol=rtol, atol=atol)
    for name, g, w in zip([k for k in DIFF_KEYS if k in case], got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return out, got


def assert_gradients_accurate_far_from_zero(fn, b, c, device):
    """Logits offset by 1e4: fn's float32 gradients against the float64 reference on the same
    values, within float32 round-off."""
    case = make_case(b, c, device=device, seed=c)
    shifted = {k: (v + 1e4 if k.startswith("logits") else v) for k, v in case.items()}
    grads = [torch.randn(b, generator=torch.Generator().manual_seed(k)).to(device) for k in range(7)]
    _, got = run_with_grads(fn, shifted, grads)
    exact = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in shifted.items()}
    _, want = run_with_grads(interaction_scores_ref, exact, [g.double() for g in grads])
    for name, a, w in zip(DIFF_KEYS, got, want):
        torch.testing.assert_close(a.double(), w, rtol=2e-6, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---- forward and gradients against the reference -------------------------------------------------

@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
@given(b=st.integers(1, 300), c=st.integers(1, 300), redundancy=st.sampled_from(["lsmi", "mmi"]),
       prior=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(backend, device, b, c, redundancy, prior, dtype, seed):
    require(backend, device, dtype)
    case = make_case(b, c, redundancy=redundancy, prior=prior, device=device, dtype=dtype,
                     seed=seed)
    grads = torch.randn(7, b, generator=torch.Generator().manual_seed(seed + 1),
                        dtype=torch.float64).to(device, dtype)
    assert_matches_reference(lambda **k: dm.ops.interaction_scores(**k, backend=backend), case,
                             grads, **tolerances(dtype, 10.0))


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("grad_layout", ["expanded", "strided"])
def test_noncontiguous_inputs_and_grads(backend, device, layout, grad_layout):
    require(backend, device)
    b, c = 23, 17
    case = make_case(b, c, device=device, layout=layout, prior=True, seed=3)
    assert not case["logits_1"].is_contiguous()
    if grad_layout == "expanded":
        grads = torch.randn(7, 1, device=device).expand(7, b)
    else:
        grads = torch.randn(b, 14, device=device)[:, ::2].t()  # (7, B), non-contiguous rows
    contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out, got = run_with_grads(lambda **k: dm.ops.interaction_scores(**k, backend=backend), case,
                              grads)
    ref, want = run_with_grads(interaction_scores_ref, contiguous, grads.contiguous())
    assert_close_scores(out, ref, **tolerances(torch.float32, 10.0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerances(torch.float32, 10.0))


def fused_op(backend):
    if backend == "triton":
        return torch.ops.dmil_fast.interaction_scores_triton, \
            torch.ops.dmil_fast.interaction_scores_triton_backward
    return torch.ops.dmil_fast.interaction_scores, torch.ops.dmil_fast.interaction_scores_backward


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
@pytest.mark.parametrize("grad_layout", ["expanded", "transposed"])
def test_op_level_noncontiguous_grad_scores(backend, device, grad_layout):
    """grad_scores reaching the fused backward op itself is expanded or column-major."""
    require(backend, device)
    b, c = 9, 6
    case = make_case(b, c, device=device, seed=5)
    leaves = [case[k].detach().clone().requires_grad_() for k in DIFF_KEYS]
    scores, _ = fused_op(backend)[0](
        leaves[0], leaves[1], leaves[2], case["labels"], leaves[3], leaves[4], None, 0)
    if grad_layout == "expanded":
        g = torch.randn(1, 7, device=device).expand(b, 7)
    else:
        g = torch.randn(7, b, device=device).t()
    got = torch.autograd.grad(scores, leaves, g)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = interaction_scores_ref(*ref_leaves[:3], case["labels"], entropy_1=ref_leaves[3],
                                 entropy_2=ref_leaves[4])
    want = torch.autograd.grad(torch.stack(tuple(ref), 1), ref_leaves, g.contiguous())
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=2e-5, atol=2e-4)


def separated_case(redundancy, *, b=4, c=5, seed=0):
    """float64 inputs whose min() choices are far (>= 0.3) from ties, for finite differences."""
    case = make_case(b, c, redundancy="mmi", dtype=torch.float64, seed=seed)
    labels = case["labels"]
    rows = torch.arange(b)
    for _ in range(20):
        i = interaction_scores_ref(**case)
        close = (i.pmi_1 - i.pmi_2).abs() < 0.3
        if not close.any():
            break
        case["logits_1"][rows[close], labels[close]] += 1.0
    i = interaction_scores_ref(**case)
    if redundancy == "lsmi":
        # h1 - h2 = (i1 - i2) - s with (h1 - i1) - (h2 - i2) = s = +-1; flip s when h1 ~ h2.
        s = torch.where(torch.arange(b) % 2 == 0, 1.0, -1.0).double()
        s = torch.where(((i.pmi_1 - i.pmi_2) + s).abs() < 0.3, -s, s)
        case.update(entropy_1=i.pmi_1 + 0.5 + s, entropy_2=i.pmi_2 + 0.5, redundancy="lsmi")
    return case


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
@pytest.mark.parametrize("prior", [False, True])
def test_gradcheck_float64(backend, redundancy, prior):
    require(backend, "cpu", torch.float64)
    case = separated_case(redundancy, seed=11)
    if prior:
        case["log_prior"] = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    keys = [k for k in DIFF_KEYS if k in case]
    fixed = {k: v for k, v in case.items() if k not in keys}

    def fn(*xs):
        out = dm.ops.interaction_scores(**fixed, **dict(zip(keys, xs)), backend=backend)
        return torch.stack(tuple(out), 1)

    inputs = [case[k].detach().clone().requires_grad_() for k in keys]
    # The Triton interpreter is slow per call: its check uses random projections (fast mode).
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7,
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
@pytest.mark.parametrize("c", [2, 40])
def test_gradients_stay_accurate_far_from_zero(backend, device, c):
    """Logits offset by 1e4, float32 against the float64 reference on the same values, within
    float32 round-off of the gradients (a float32 log-sum-exp saved for the backward costs half
    an ulp of 1e4, 5e-4, in every gradient)."""
    require(backend, device)
    assert_gradients_accurate_far_from_zero(
        lambda **kw: dm.ops.interaction_scores(**kw, backend=backend), 16, c, device)


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
def test_fused_backends_refuse_a_second_derivative(backend, device):
    """Differentiable once: the second backward raises instead of returning zeros (what PyTorch's
    fallback for an op without an autograd kernel gives). The reference's second derivative, by
    torch autograd of log_softmax, is nonzero here, so zeros would be wrong."""
    require(backend, device, torch.float64)
    case = make_case(3, 4, redundancy="mmi", device=device, dtype=torch.float64, seed=5)

    def second(fn):
        a = case["logits_1"].clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(dict(case, logits_1=a)).pmi_1.sum(), a, create_graph=True)
        return torch.autograd.grad((g * g).sum(), a)[0]

    assert second(lambda c: interaction_scores_ref(**c)).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="backward"):
        second(lambda c: dm.ops.interaction_scores(**c, backend=backend))


# ---- hand-computed cases ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_uniform_logits_give_zero(backend, device):
    """Uniform logits: softmax = 1/C = the default prior, so every pmi is 0; with h1 = 1, h2 = 2,
    r = min(1, 2) - min(1 - 0, 2 - 0) = 0, hence u1 = u2 = s = 0 too (mmi: r = min(0, 0) = 0)."""
    require(backend, device)
    z = torch.zeros(3, 4, device=device)
    labels = torch.tensor([0, 3, 1], device=device)
    for kw in (dict(entropy_1=torch.ones(3, device=device), entropy_2=torch.full((3,), 2.0,
                                                                                  device=device)),
               dict(redundancy="mmi")):
        out = dm.ops.interaction_scores(z, z + 5.0, z - 1.0, labels, backend=backend, **kw)
        for name, field in zip(InteractionScores._fields, out):
            assert torch.equal(field, torch.zeros(3, device=device)), name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_hand_computed_two_classes(backend, device):
    """C = 2, label 0, default prior 1/2:
    logits_1 = [ln 3, 0]  -> p = 3/4, i1 = ln(3/4 / 1/2) = ln 1.5 ~ 0.405465
    logits_2 = [0, 0]     -> p = 1/2, i2 = 0
    logits_12 = [ln 7, 0] -> p = 7/8, i12 = ln 1.75 ~ 0.559616
    lsmi, h1 = 1, h2 = 2: r = min(1, 2) - min(1 - 0.405465, 2 - 0) = 0.405465 = ln 1.5,
        u1 = 0, u2 = -ln 1.5, s = i12 - r - u1 - u2 = ln 1.75.
    mmi: r = min(ln 1.5, 0) = 0, u1 = ln 1.5, u2 = 0, s = ln 1.75 - ln 1.5 = ln(7/6).
    Gradient of pmi_1 w.r.t. logits_1 = onehot(0) - softmax = [1/4, -1/4]."""
    require(backend, device, torch.float64)
    opts = dict(device=device, dtype=torch.float64)
    l1 = torch.tensor([[math.log(3.0), 0.0]], **opts, requires_grad=True)
    l2 = torch.zeros(1, 2, **opts)
    l12 = torch.tensor([[math.log(7.0), 0.0]], **opts)
    y = torch.zeros(1, dtype=torch.long, device=device)
    a, b7 = math.log(1.5), math.log(1.75)
    lsmi = dm.ops.interaction_scores(l1, l2, l12, y, entropy_1=torch.ones(1, **opts),
                                     entropy_2=torch.full((1,), 2.0, **opts), backend=backend)
    mmi = dm.ops.interaction_scores(l1, l2, l12, y, redundancy="mmi", backend=backend)
    expect = {"lsmi": [a, 0.0, b7, a, 0.0, -a, b7], "mmi": [a, 0.0, b7, 0.0, a, 0.0, math.log(7 / 6)]}
    for name, out in (("lsmi", lsmi), ("mmi", mmi)):
        got = torch.stack(tuple(out), 1)[0].tolist()
        assert got == pytest.approx(expect[name], abs=1e-12), name
    (g,) = torch.autograd.grad(mmi.pmi_1.sum(), l1)
    assert g[0].tolist() == pytest.approx([0.25, -0.25], abs=1e-12)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_ties_send_the_redundancys_gradient_to_the_first_modality(backend, device, redundancy):
    """logits_2 = logits_1 (and h2 = h1) make every min in r a tie, which goes to the first argument
    with its gradient: mmi r = i1, lsmi r = h1 - (h1 - i1) = i1, so d r / d logits_1 = onehot(y) -
    softmax(logits_1), d r / d logits_2 = 0 and (lsmi) d r / d h1 = d r / d h2 = 0."""
    require(backend, device)
    gen = torch.Generator().manual_seed(8)
    l1 = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    l2 = l1.detach().clone().requires_grad_()
    l12 = torch.randn(6, 5, generator=gen).to(device)
    y = torch.tensor([0, 4, 2, 2, 1, 3], device=device)
    h = torch.rand(6, generator=gen).to(device) + 1.0
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    kw = dict(entropy_1=h1, entropy_2=h2) if redundancy == "lsmi" else {}
    out = dm.ops.interaction_scores(l1, l2, l12, y, redundancy=redundancy, backend=backend, **kw)
    leaves = [l1, l2] + ([h1, h2] if kw else [])
    grads = torch.autograd.grad(out.redundancy.sum(), leaves, allow_unused=True)
    want_l1 = torch.nn.functional.one_hot(y, 5).float() - torch.softmax(l1.detach(), -1)
    torch.testing.assert_close(grads[0], want_l1, rtol=1e-5, atol=1e-6)
    for name, g in zip(["logits_2", "entropy_1", "entropy_2"], grads[1:]):
        assert g is None or torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_hand_computed_log_prior(backend, device):
    """With prior p(y) = [3/4, 1/4] and p(y | x1) = [3/4, 1/4] the pmi is ln(3/4) - ln(3/4) = 0
    for label 0 and ln(1/4) - ln(1/4) = 0 for label 1; logits [0, 0] give ln(1/2) - ln(3/4) =
    ln(2/3) for label 0 and ln 2 for label 1."""
    require(backend, device)
    prior = torch.tensor([math.log(0.75), math.log(0.25)], device=device)
    l1 = torch.tensor([[math.log(3.0), 0.0]] * 2, device=device)
    zeros = torch.zeros(2, 2, device=device)
    y = torch.tensor([0, 1], device=device)
    out = dm.ops.interaction_scores(l1, zeros, l1, y, log_prior=prior, redundancy="mmi",
                                    backend=backend)
    assert out.pmi_1.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert out.pmi_2.tolist() == pytest.approx([math.log(2 / 3), math.log(2.0)], abs=1e-6)


def _scores(r, u1, u2, s, dtype=torch.float64):
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    zero = torch.zeros(len(r), dtype=dtype)
    return InteractionScores(zero, zero, zero, t(r), t(u1), t(u2), t(s))


@pytest.mark.parametrize("given,expected", [
    # mean R = -0.75 < 0, mean S = 0.5: c = -min(-0.75, 0.5) = 0.75
    (([-1.0, -0.5], [1.0, 1.0], [2.0, 2.0], [0.5, 0.5]),
     ([-0.25, 0.25], [0.25, 0.25], [1.25, 1.25], [1.25, 1.25])),
    # mean R = 1, mean S = -1 < 0: c = 1
    (([1.0, 1.0], [0.0, 2.0], [3.0, 3.0], [-2.0, 0.0]),
     ([2.0, 2.0], [-1.0, 1.0], [2.0, 2.0], [-1.0, 1.0])),
    # both negative, mean R = -1, mean S = -2: c = 2
    (([-1.0, -1.0], [1.0, 1.0], [1.0, 1.0], [-2.0, -2.0]),
     ([1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0], [0.0, 0.0])),
    # R, S >= 0, mean U1 = -0.5 < 0, mean U2 = 0.5: c = min(-0.5, 0.5) = -0.5
    (([1.0, 1.0], [-1.0, 0.0], [0.5, 0.5], [1.0, 1.0]),
     ([0.5, 0.5], [-0.5, 0.5], [1.0, 1.0], [0.5, 0.5])),
    # nothing negative on average: unchanged
    (([0.5, -0.1], [0.2, 0.2], [0.0, 0.0], [0.3, 0.3]),
     ([0.5, -0.1], [0.2, 0.2], [0.0, 0.0], [0.3, 0.3])),
])
def test_adjust_interactions_hand_cases(given, expected):
    out = dm.ops.adjust_interactions(_scores(*given))
    got = (out.redundancy, out.unique_1, out.unique_2, out.synergy)
    for g, e in zip(got, expected):
        assert g.tolist() == pytest.approx(e, abs=1e-12)
    ref = adjust_interactions_ref(_scores(*given))
    for name in InteractionScores._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-12)


@given(b=st.integers(1, 50), seed=st.integers(0, 2**31 - 1), shift=st.floats(-2.0, 2.0))
def test_adjust_interactions_matches_reference(b, seed, shift):
    gen = torch.Generator().manual_seed(seed)
    fields = [torch.randn(b, generator=gen) + shift for _ in range(7)]
    out = dm.ops.adjust_interactions(InteractionScores(*fields))
    ref = adjust_interactions_ref(InteractionScores(*fields))
    for name in InteractionScores._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend,device", CPP_DEVICES)
@pytest.mark.parametrize("c", [1, 6, 16, 17, 100, 128, 129, 309])
def test_class_counts_at_the_cuda_kernels_group_edges(backend, device, c):
    """The CUDA kernel takes 1, 8 or 32 lanes per sample by C (edges at 16/17 and 128/129); 515
    rows span three blocks of the one-lane kernel and end in a partly filled warp. The C++ CPU
    kernel runs the same cases."""
    require(backend, device)
    case = make_case(515, c, prior=c % 2 == 0, device=device, seed=c)
    grads = torch.randn(7, 515, generator=torch.Generator().manual_seed(c)).to(device)
    assert_matches_reference(lambda **k: dm.ops.interaction_scores(**k, backend=backend), case,
                             grads, **tolerances(torch.float32, 10.0))


# ---- extremes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape,scale", [((7, 9), 1e4), ((5, 1), 3.0), ((3, 10000), 3.0),
                                         ((1, 13), 2.0), ((1, 1), 1e4)])
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_extremes_finite_and_equal_reference(backend, device, shape, scale, redundancy):
    require(backend, device)
    case = make_case(*shape, redundancy=redundancy, device=device, scale=scale, seed=7)
    grads = torch.randn(7, shape[0], device=device)
    out, got = run_with_grads(lambda **k: dm.ops.interaction_scores(**k, backend=backend), case,
                              grads)
    ref, want = run_with_grads(interaction_scores_ref, case, grads)
    for field in out:
        assert torch.isfinite(field).all()
    assert_close_scores(out, ref, rtol=2e-5, atol=2e-5 * scale)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=2e-5, atol=1e-4)


# ---- torch.library: opcheck and torch.compile ---------------------------------------------------

def _op_args(case):
    return (case["logits_1"], case["logits_2"], case["logits_12"], case["labels"],
            case.get("entropy_1"), case.get("entropy_2"), case.get("log_prior"),
            0 if case["redundancy"] == "lsmi" else 1)


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
@pytest.mark.parametrize("redundancy,prior", [("lsmi", False), ("lsmi", True), ("mmi", True)])
def test_opcheck(backend, device, redundancy, prior):
    require(backend, device)
    case = make_case(6, 5, redundancy=redundancy, prior=prior, device=device, seed=2)
    args = list(_op_args(case))
    for i in (0, 1, 2, 4, 5):
        if args[i] is not None:
            args[i] = args[i].detach().clone().requires_grad_()
    forward, backward = fused_op(backend)
    torch.library.opcheck(forward, tuple(args))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    scores, lse = forward(*detached)
    grad = torch.randn_like(scores)
    torch.library.opcheck(backward, (grad, scores, lse, *detached[:6], detached[7]))
    # Without save_lse (a forward no backward follows): the same scores, no log-sum-exps.
    torch.library.opcheck(forward, (*detached, False))
    bare_scores, bare_lse = forward(*detached, False)
    assert bare_lse.shape == (0, 3) and lse.shape == (6, 3) and lse.dtype == torch.float64
    assert torch.equal(bare_scores, scores)


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
def test_the_log_sum_exps_are_saved_only_when_a_backward_can_follow(backend, device):
    """The public op passes save_lse=True exactly when grad mode is on and an input it
    differentiates requires grad (seen in the op calls a TorchDispatchMode records)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    require(backend, device)
    op_name = "interaction_scores_triton" if backend == "triton" else "interaction_scores"

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.save_lse = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] == op_name:
                self.save_lse.append(args[8] if len(args) > 8 else kwargs.get("save_lse", True))
            return func(*args, **(kwargs or {}))

    case = make_case(5, 4, device=device, seed=3)

    def calls(requires_grad, key="logits_2", grad_mode=True):
        given = dict(case, **{key: case[key].clone().requires_grad_(requires_grad)})
        with Calls() as mode, torch.set_grad_enabled(grad_mode):
            dm.ops.interaction_scores(**given, backend=backend)
        return mode.save_lse

    assert calls(False) == [False]
    assert calls(True) == [True]
    assert calls(True, key="entropy_1") == [True]
    assert calls(True, grad_mode=False) == [False]


@pytest.mark.parametrize("backend,device", FUSED_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    require(backend, device)
    case = make_case(10, 7, prior=True, device=device, seed=4)

    def loss(l1, l2, l12, labels, h1, h2, log_prior):
        out = dm.ops.interaction_scores(l1, l2, l12, labels, entropy_1=h1, entropy_2=h2,
                                        log_prior=log_prior, backend=backend)
        return out.synergy.square().sum() + out.redundancy.sum() - out.unique_1.sum()

    keys = ("logits_1", "logits_2", "logits_12", "labels", "entropy_1", "entropy_2", "log_prior")
    diff = [1 if k in DIFF_KEYS else 0 for k in keys]
    eager_in = [case[k].clone().requires_grad_(bool(d)) for k, d in zip(keys, diff)]
    comp_in = [case[k].clone().requires_grad_(bool(d)) for k, d in zip(keys, diff)]
    want = loss(*eager_in)
    got = torch.compile(loss, fullgraph=True)(*comp_in)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    for a, b in zip(comp_in, eager_in):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)


# ---- bad input --------------------------------------------------------------------------------

def _bad_cases():
    ok = make_case(4, 3, prior=True, seed=1)
    yield "not_tensor", dict(logits_1=ok["logits_1"].tolist()), TypeError, "logits_1"
    yield "logits_1_1d", dict(logits_1=ok["logits_1"][0]), ValueError, "logits_1"
    yield "int_logits", dict(logits_1=ok["logits_1"].long()), TypeError, "logits_1"
    yield "batch_mismatch", dict(logits_2=ok["logits_2"][:3]), ValueError, "logits_2"
    yield "class_mismatch", dict(logits_12=ok["logits_12"][:, :2]), ValueError, "logits_12"
    yield "dtype_mismatch", dict(logits_2=ok["logits_2"].double()), TypeError, "logits_2"
    yield "empty_batch", dict(logits_1=ok["logits_1"][:0], logits_2=ok["logits_2"][:0],
                              logits_12=ok["logits_12"][:0], labels=ok["labels"][:0],
                              entropy_1=ok["entropy_1"][:0], entropy_2=ok["entropy_2"][:0]
                              ), ValueError, "logits_1"
    yield "float_labels", dict(labels=ok["labels"].float()), TypeError, "labels"
    yield "bool_labels", dict(labels=ok["labels"] > 0), TypeError, "labels"
    yield "labels_2d", dict(labels=ok["labels"][:, None]), ValueError, "labels"
    yield "labels_length", dict(labels=ok["labels"][:3]), ValueError, "labels"
    yield "label_too_big", dict(labels=torch.tensor([0, 1, 3, 2])), ValueError, "labels"
    yield "label_negative", dict(labels=torch.tensor([0, -1, 2, 2])), ValueError, "labels"
    yield "missing_entropy", dict(entropy_1=None), ValueError, "entropy_1"
    yield "entropy_shape", dict(entropy_2=ok["entropy_2"][:2]), ValueError, "entropy_2"
    yield "entropy_2d", dict(entropy_1=ok["entropy_1"][:, None]), ValueError, "entropy_1"
    yield "int_entropy", dict(entropy_1=ok["entropy_1"].long()), TypeError, "entropy_1"
    yield "prior_length", dict(log_prior=ok["log_prior"][:2]), ValueError, "log_prior"
    yield "prior_2d", dict(log_prior=ok["log_prior"][None]), ValueError, "log_prior"
    yield "redundancy", dict(redundancy="pid"), ValueError, "redundancy"
    yield "mixed_devices", dict(entropy_2=ok["entropy_2"].to("meta")), ValueError, "entropy_2"
    nan = ok["logits_2"].clone()
    nan[1, 0] = float("nan")
    yield "nan_logits", dict(logits_2=nan), ValueError, "logits_2"
    nan_h = ok["entropy_1"].clone()
    nan_h[2] = float("nan")
    yield "nan_entropy", dict(entropy_1=nan_h), ValueError, "entropy_1"
    zero_prior = ok["log_prior"].clone()
    zero_prior[ok["labels"][0]] = -float("inf")  # a class of prior probability 0 at a label
    yield "prior_inf_at_label", dict(log_prior=zero_prior), ValueError, "log_prior holds infinities"
    inf = ok["logits_12"].clone()
    inf[0, 1] = float("inf")
    yield "inf_logits", dict(logits_12=inf), ValueError, "logits_12 hold infinities"
    yield "bad_backend", dict(backend="fortran"), ValueError, "backend"


BAD = list(_bad_cases())


# Triton's interpreter computes with NumPy, which warns on inf - inf (the NaN the check then reports).
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", [None, "reference", "cpp", "triton"])
@pytest.mark.parametrize("label,change,exc,name", BAD, ids=[c[0] for c in BAD])
def test_bad_input_names_the_argument(backend, label, change, exc, name):
    kwargs = dict(make_case(4, 3, prior=True, seed=1), backend=backend)
    if backend is not None and label != "bad_backend":
        require(backend, "cpu")
    kwargs.update(change)
    with pytest.raises(exc, match=name):
        dm.ops.interaction_scores(**kwargs)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bad", [3, -1])
def test_out_of_range_labels_are_refused_on_every_device(backend, device, bad):
    """On CUDA the fused backends check the labels after the launch (their kernels NaN such a
    row without reading through it), elsewhere before: the same error either way."""
    require(backend, device)
    case = make_case(4, 3, prior=True, device=device, seed=1)
    case["labels"] = torch.tensor([0, 1, bad, 2], device=device)
    low, high = min(bad, 0), max(bad, 2)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, C\) = \[0, 3\), got values from {low} to {high}"):
        dm.ops.interaction_scores(**case, backend=backend)


def test_the_check_after_a_gpu_launch_finds_bad_labels_and_names_a_nan_input():
    """The one-sync check of the CUDA path, on what such a launch leaves: a NaN row for a bad label."""
    from dmil_fast.ops.interaction_scores import _check_outputs

    case = make_case(4, 3, prior=True, seed=1)
    inputs = {k: case[k] for k in DIFF_KEYS + ("log_prior",)}
    scores = torch.zeros(4, 7)
    assert _check_outputs(scores, case["labels"], 3, **inputs) is None
    with pytest.raises(ValueError, match=r"labels must lie in \[0, C\) = \[0, 3\), got values from 0 to 5"):
        _check_outputs(torch.where(torch.arange(4)[:, None] == 2, float("nan"), scores),
                       torch.tensor([0, 1, 5, 2]), 3, **inputs)
    inputs["entropy_2"] = inputs["entropy_2"].clone()
    inputs["entropy_2"][3] = float("nan")
    with pytest.raises(ValueError, match="entropy_2 contains NaN"):
        _check_outputs(scores, case["labels"], 3, **inputs)


def test_unavailable_backend_says_why():
    case = make_case(4, 3, seed=1)
    half = {k: (v.half() if k.startswith("logits") else v) for k, v in case.items()}
    with pytest.raises(BackendUnavailableError, match="dtype float16 is not supported on cpu"):
        dm.ops.interaction_scores(**half, backend="cpp")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            dm.ops.interaction_scores(**case, backend="cuda")


def test_default_backend_choice():
    cpu = torch.device("cpu")
    if _backends().checks["cpp"](cpu, torch.float32) is None:
        assert _backends().choose(None, cpu, torch.float32) == "cpp"
    assert _backends().choose(None, cpu, torch.float16) == "reference"
    assert "dtype float16" in _backends().checks["cpp"](cpu, torch.float16)
    if torch.cuda.is_available() and _backends().checks["cuda"](torch.device("cuda"),
                                                                torch.float16) is None:
        assert _backends().choose(None, torch.device("cuda"), torch.float16) == "cuda"


def test_adjust_interactions_bad_input():
    good = _scores([1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(TypeError, match="scores"):
        dm.ops.adjust_interactions(tuple(good))
    with pytest.raises(ValueError, match="scores.unique_1"):
        dm.ops.adjust_interactions(good._replace(unique_1=torch.zeros(3)))
    with pytest.raises(ValueError, match="scores.synergy"):
        dm.ops.adjust_interactions(good._replace(synergy=torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="scores.redundancy"):
        dm.ops.adjust_interactions(_scores([], [], [], []))
    with pytest.raises(TypeError, match="scores.unique_2"):
        dm.ops.adjust_interactions(good._replace(unique_2=torch.zeros(2, dtype=torch.long)))


@pytest.mark.parametrize("field", ["redundancy", "unique_1", "unique_2", "synergy"])
def test_adjust_interactions_names_a_nan_field(field):
    """One NaN in the four shifted fields would NaN the shift of every sample: refused, named."""
    good = _scores([-1.0, -1.0, -1.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    bad = getattr(good, field).clone()
    bad[2] = float("nan")
    with pytest.raises(NaNInputError, match=rf"^scores\.{field} contains NaN; expected finite values$") as exc:
        dm.ops.adjust_interactions(good._replace(**{field: bad}))
    assert isinstance(exc.value, ValueError) and exc.value.argument == f"scores.{field}"


def test_adjust_interactions_does_not_read_the_pmi_fields():
    # mean R = -1 < 0, mean S = 0.2: c = 1; a NaN pmi is passed through unchanged
    nan_pmi = torch.tensor([0.0, float("nan")], dtype=torch.float64)
    given = _scores([-1.0, -1.0], [0.5, 0.5], [0.5, 0.5], [0.2, 0.2])._replace(pmi_1=nan_pmi)
    out = dm.ops.adjust_interactions(given)
    assert out.redundancy.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert out.synergy.tolist() == pytest.approx([1.2, 1.2], abs=1e-12)
    assert out.unique_1.tolist() == pytest.approx([-0.5, -0.5], abs=1e-12)
    assert out.pmi_1 is nan_pmi


def test_adjust_interactions_compiles_fullgraph_without_value_checks():
    gen = torch.Generator().manual_seed(3)
    fields = [torch.randn(9, generator=gen) - 0.5 for _ in range(7)]
    compiled = torch.compile(lambda *t: tuple(dm.ops.adjust_interactions(InteractionScores(*t))), fullgraph=True)
    want = dm.ops.adjust_interactions(InteractionScores(*fields))
    for got, expected in zip(compiled(*fields), want):
        torch.testing.assert_close(got, expected)
    fields[6] = fields[6].clone()
    fields[6][4] = float("nan")
    out = compiled(*fields)  # the graph carries no value check: NaN in, NaN out
    assert torch.isnan(out[6][4])


def _direct_bad_calls(device):
    case = make_case(4, 3, prior=True, device=device, seed=1)
    l1, l2, l12, y, h1, h2, lp, _ = _op_args(case)
    yield (l1, l2[:3], l12, y, h1, h2, lp, 0), "logits_2"
    yield (l1, l2, l12[:, :2], y, h1, h2, lp, 0), "logits_12"
    yield (l1[0], l2[0], l12[0], y, h1, h2, lp, 0), "logits_1"
    yield (l1, l2.double(), l12, y, h1, h2, lp, 0), "logits_2"
    yield (l1, l2, l12, y[:, None], h1, h2, lp, 0), "labels"
    yield (l1, l2, l12, y.int(), h1, h2, lp, 0), "labels"
    yield (l1, l2, l12, y, None, h2, lp, 0), "entropy_1"
    yield (l1, l2, l12, y, h1, h2[:2], lp, 0), "entropy_2"
    yield (l1, l2, l12, y, h1.double(), h2, lp, 0), "entropy_1"
    yield (l1, l2, l12, y, h1, h2, lp[:2], 0), "log_prior"
    yield (l1, l2, l12, y, h1, h2, lp, 7), "redundancy"
    yield (l1[:, :0], l2[:, :0], l12[:, :0], y, h1, h2, None, 0), "class"
    if device == "cpu":
        yield (l1, l2, l12, torch.tensor([0, 1, 3, 0]), h1, h2, lp, 0), "labels"
        yield (l1.half(), l2.half(), l12.half(), y, h1, h2, lp, 0), "float32 and float64"


@pytest.mark.parametrize("backend,device", CPP_DEVICES)
def test_cpp_op_raises_runtime_error(backend, device):
    require(backend, device)
    for args, name in _direct_bad_calls(device):
        with pytest.raises(RuntimeError, match=name):
            torch.ops.dmil_fast.interaction_scores(*args)
    case = make_case(4, 3, device=device, seed=1)
    args = _op_args(case)
    scores, lse = torch.ops.dmil_fast.interaction_scores(*args)
    with pytest.raises(RuntimeError, match="grad_scores"):
        torch.ops.dmil_fast.interaction_scores_backward(scores[:, :6], scores, lse, *args[:6],
                                                        args[7])
    assert lse.dtype == torch.float64
    with pytest.raises(RuntimeError, match="lse must have dtype Double"):
        torch.ops.dmil_fast.interaction_scores_backward(scores, scores, lse.float(), *args[:6],
                                                        args[7])


# ---- the GPU kernels: half precision and bad labels inside the kernel -------------------------

@pytest.mark.parametrize("backend,device", GPU_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", low_precision_dtypes())
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_low_precision_error_within_twice_pytorch(backend, device, dtype, redundancy):
    require(backend, device, dtype)
    case32 = make_case(257, 131, redundancy=redundancy, prior=True, device=device, seed=9)
    assert_low_precision_within_twice_pytorch(
        lambda **k: dm.ops.interaction_scores(**k, backend=backend), case32, dtype,
        torch.randn(7, 257, device=device))


def assert_low_precision_within_twice_pytorch(fn, case32, dtype, grads):
    """fn on the float32 case's logits rounded to ``dtype``: scores and gradients (for ``grads``)
    within twice the error of PyTorch's own from the same rounded logits, against the float32
    truth."""
    low = {k: (v.to(dtype) if k.startswith("logits") else v) for k, v in case32.items()}
    truth, truth_g = run_with_grads(interaction_scores_ref, case32, grads)
    torch_out, torch_g = run_with_grads(interaction_scores_ref, low, grads.to(dtype))
    ours, ours_g = run_with_grads(fn, low, grads.to(dtype))
    for t, p, o in zip(truth, torch_out, ours):
        assert o.dtype == dtype
        err_torch = (p.float() - t).abs().max().item()
        err_ours = (o.float() - t).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6
    for t, p, o in zip(truth_g, torch_g, ours_g):
        err_torch = (p.float() - t).abs().max().item()
        err_ours = (o.float() - t).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6


# Next to 4 in each dtype: the pmis of [4, 0] and [below, 0] differ in float32 by less than half
# an ulp of the low-precision scores, which so round to one value.
_BELOW_FOUR = {torch.float16: 3.99609375, torch.bfloat16: 3.984375}


@pytest.mark.parametrize("backend,device", GPU_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", low_precision_dtypes())
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_low_precision_gradient_takes_the_forwards_branch_at_a_rounded_tie(backend, device, dtype,
                                                                            redundancy):
    """pmi_1 > pmi_2 by 7e-5 (2.8e-4 in bfloat16), equal once rounded: r = min(...) takes the
    smaller, and so must its gradient, which goes to that modality's logits alone. The branch
    and the gradient are worked out here in float64 (MMI: r = pmi_2; LSMI with the modalities
    swapped and zero entropies: r = -min(-pmi_1, -pmi_2) = max, again the one just above)."""
    require(backend, device, dtype)
    assert_rounded_tie_takes_the_forwards_branch(
        lambda *a, **k: dm.ops.interaction_scores(*a, **k, backend=backend), dtype, redundancy,
        device)


def assert_rounded_tie_takes_the_forwards_branch(fn, dtype, redundancy, device):
    """The case of test_low_precision_gradient_takes_the_forwards_branch_at_a_rounded_tie, for
    fn(logits_1, logits_2, logits_12, labels, redundancy=..., [entropy_1=, entropy_2=])."""
    near = torch.tensor([[4.0, 0.0]], dtype=dtype, device=device)
    far = torch.tensor([[_BELOW_FOUR[dtype], 0.0]], dtype=dtype, device=device)
    # MMI: r = min(pmi_1, pmi_2) = pmi of `far`; LSMI: r = max(pmi_1, pmi_2) = pmi of `near`.
    l1, l2 = (near, far) if redundancy == "mmi" else (far, near)
    chosen = far if redundancy == "mmi" else near
    extra = {} if redundancy == "mmi" else dict(entropy_1=torch.zeros(1, device=device),
                                                entropy_2=torch.zeros(1, device=device))
    a, b = l1.clone().requires_grad_(), l2.clone().requires_grad_()
    out = fn(a, b, torch.zeros_like(near), torch.tensor([0], device=device),
             redundancy=redundancy, **extra)
    assert out.pmi_1.item() == out.pmi_2.item()  # a tie once rounded: the case this is about
    out.redundancy.sum().backward()
    p = torch.softmax(chosen.double(), -1)
    want = (torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=device) - p).to(dtype)
    got_chosen, got_other = (b.grad, a.grad) if chosen is l2 else (a.grad, b.grad)
    assert torch.equal(got_other, torch.zeros_like(got_other)), got_other
    torch.testing.assert_close(got_chosen, want, rtol=1e-2, atol=1e-4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend,device", GPU_KERNEL_DEVICES)
@pytest.mark.parametrize("c", [3, 20, 200])  # 1, 8 and 32 lanes per sample in the CUDA kernel
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_an_infinite_logit_is_refused_on_the_gpu_kernels(backend, device, c, redundancy):
    """+inf away from the label makes log_softmax NaN; the kernels must give NaN too, so that the
    check after the launch names the logits (one lane per sample once gave -inf there)."""
    require(backend, device)
    case = make_case(9, c, redundancy=redundancy, device=device, seed=c)
    x = case["logits_2"].clone()
    x[4, (int(case["labels"][4]) + 1) % c] = float("inf")
    case["logits_2"] = x
    with pytest.raises(ValueError, match="hold infinities"):
        dm.ops.interaction_scores(**case, backend=backend)


@pytest.mark.parametrize("backend,device", GPU_KERNEL_DEVICES)
def test_kernel_bad_label_gives_nan_row(backend, device):
    """Called directly (the public op refuses bad labels), the GPU kernels never read through a bad
    label: that row is NaN and the others are untouched."""
    require(backend, device)
    case = make_case(5, 4, device=device, seed=1)
    args = list(_op_args(case))
    args[3] = torch.tensor([0, 1, 4, 2, -1], device=device)
    scores, lse = fused_op(backend)[0](*args)
    grads = fused_op(backend)[1](torch.ones_like(scores), scores, lse, *args[:6], args[7])
    good = torch.tensor([0, 1, 3])
    ref = interaction_scores_ref(*[a[good] for a in args[:3]], args[3][good],
                                 entropy_1=args[4][good], entropy_2=args[5][good],
                                 log_prior=args[6])
    torch.testing.assert_close(scores[good], torch.stack(tuple(ref), 1))
    assert torch.isnan(scores[[2, 4]]).all()
    assert torch.isnan(grads[0][[2, 4]]).all() and torch.isfinite(grads[0][good]).all()


def test_the_environment_variable_chooses_the_backend_and_an_argument_overrides_it(monkeypatch):
    from dmil_fast.ops._dispatch import choose_backend

    cpu = torch.device("cpu")
    monkeypatch.setenv("DMIL_FAST_BACKEND", "reference")
    assert choose_backend("interaction_scores", None, cpu, torch.float32) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton can run CPU tensors, so the argument is honoured
    assert choose_backend("interaction_scores", "triton", cpu, torch.float32) == "triton"
    monkeypatch.setenv("DMIL_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DMIL_FAST_BACKEND must be one of"):
        choose_backend("interaction_scores", None, cpu, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_hand_computed_lsmi_where_the_second_modality_has_the_lower_entropy(backend, device):
    """The case of test_hand_computed_two_classes with the entropies swapped (h1 = 2, h2 = 1), so
    that each min of r = min(h1, h2) - min(h1 - i1, h2 - i2) takes its second argument:
    i1 = ln 1.5, i2 = 0, i12 = ln 1.75 -> r = min(2, 1) - min(2 - ln 1.5, 1 - 0) = 1 - 1 = 0,
    u1 = ln 1.5, u2 = 0, s = ln 1.75 - ln 1.5 = ln(7/6)."""
    require(backend, device, torch.float64)
    opts = dict(device=device, dtype=torch.float64)
    l1 = torch.tensor([[math.log(3.0), 0.0]], **opts)
    l2 = torch.zeros(1, 2, **opts)
    l12 = torch.tensor([[math.log(7.0), 0.0]], **opts)
    y = torch.zeros(1, dtype=torch.long, device=device)
    h1, h2 = torch.full((1,), 2.0, **opts), torch.ones(1, **opts)
    a = math.log(1.5)
    expect = [a, 0.0, math.log(1.75), 0.0, a, 0.0, math.log(7 / 6)]
    for out in (dm.ops.interaction_scores(l1, l2, l12, y, entropy_1=h1, entropy_2=h2, backend=backend),
                interaction_scores_ref(l1, l2, l12, y, entropy_1=h1, entropy_2=h2)):
        assert torch.stack(tuple(out), 1)[0].tolist() == pytest.approx(expect, abs=1e-12)
