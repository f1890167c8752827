"""Every code path of the C++ CPU interaction_scores kernel against the float64 PyTorch oracle.

The kernel takes samples in tiles of 64; up to 32 classes it transposes a tile (forward) or takes
it as one flat array (backward), above that it walks each row in float vectors (8 lanes, 16 in the
AVX-512 clone; two at a time) with a ragged last vector, over log-sum-exp chunks of 2048 columns
summed under a shift from the row's first vector. The class counts and batch sizes below sit at
and around each of those boundaries; float64 runs the scalar build of the same kernels. Every
float test runs once per instruction-set clone this CPU has (``DMIL_FAST_CPU_ISA``).
"""

import os
import platform

import pytest
import torch

import dmil_fast as dm
from dmil_fast.reference.interactions import interaction_scores_ref


def _isas():
    try:
        from dmil_fast import _C
    except ImportError:  # _require_cpp fails every test with the reason
        return ["auto"]
    return _C.cpu_kernel_isas()


@pytest.fixture(autouse=True, params=_isas())
def isa(request, monkeypatch):
    """The clone of the float kernels under test (float64 has one build: the portable one)."""
    monkeypatch.setenv("DMIL_FAST_CPU_ISA", request.param)
    return request.param


CLASS_COUNTS = (1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 2047, 2048, 2049)
BATCH_SIZES = (1, 63, 64, 65, 129)
DTYPES = (torch.float32, torch.float64)
FIELDS = ("pmi_1", "pmi_2", "pmi_12", "redundancy", "unique_1", "unique_2", "synergy")


def _require_cpp():
    from dmil_fast.ops.interaction_scores import BACKENDS

    reason = BACKENDS.checks["cpp"](torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.fail(f"the C++ CPU kernel must be built for these tests: {reason}")


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def _case(b, c, dtype, *, redundancy="lsmi", prior=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [(2.0 * torch.randn(b, c, generator=gen, dtype=torch.float64)).to(dtype)
              for _ in range(3)]
    case = dict(logits_1=logits[0], logits_2=logits[1], logits_12=logits[2],
                labels=torch.randint(0, c, (b,), generator=gen), redundancy=redundancy)
    if redundancy == "lsmi":
        case["entropy_1"] = (3.0 * torch.randn(b, generator=gen, dtype=torch.float64)).to(dtype)
        case["entropy_2"] = (3.0 * torch.randn(b, generator=gen, dtype=torch.float64)).to(dtype)
    if prior:
        case["log_prior"] = torch.log_softmax(torch.randn(c, generator=gen, dtype=torch.float64),
                                              0).to(dtype)
    return case


def _inputs(case):
    return [k for k in ("logits_1", "logits_2", "logits_12", "entropy_1", "entropy_2")
            if k in case]


def _run_cpp(case, grad_out):
    """Scores and input gradients of the C++ kernel (through the public op and autograd)."""
    leaves = {k: case[k].detach().clone().requires_grad_() for k in _inputs(case)}
    out = dm.ops.interaction_scores(**{**case, **leaves}, backend="cpp")
    grads = torch.autograd.grad(tuple(out), tuple(leaves.values()), grad_out.unbind(0))
    return torch.stack(tuple(out)).detach(), dict(zip(leaves, grads))


def _run_oracle(case, grad_out):
    """The same in float64 through the reference, cast back to the case's dtype at the end."""
    dtype = case["logits_1"].dtype
    wide = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in case.items()}
    leaves = {k: wide[k].detach().clone().requires_grad_() for k in _inputs(case)}
    out = interaction_scores_ref(**{**wide, **leaves})
    grads = torch.autograd.grad(tuple(out), tuple(leaves.values()), grad_out.double().unbind(0))
    return (torch.stack(tuple(out)).detach().to(dtype),
            {k: g.to(dtype) for k, g in zip(leaves, grads)})


def _check_against_oracle(case):
    b = case["labels"].shape[0]
    dtype = case["logits_1"].dtype
    grad_out = torch.randn(7, b, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype)
    scores, grads = _run_cpp(case, grad_out)
    want_scores, want_grads = _run_oracle(case, grad_out)
    for i, name in enumerate(FIELDS):
        torch.testing.assert_close(scores[i], want_scores[i], **_tol(dtype),
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], **_tol(dtype),
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_class_count_boundaries(c, dtype):
    _require_cpp()
    _check_against_oracle(_case(65, c, dtype, prior=c % 2 == 1, seed=c))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", (9, 33))
@pytest.mark.parametrize("b", BATCH_SIZES)
def test_tile_boundaries(b, c, dtype):
    _require_cpp()
    _check_against_oracle(_case(b, c, dtype, redundancy="mmi" if b % 2 else "lsmi", seed=b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", (9, 33, 2049))
def test_minus_infinity_off_label_gets_zero_gradient(c, dtype):
    """-inf logits (masked classes) add nothing to the softmax and get an exact zero gradient."""
    _require_cpp()
    case = _case(70, c, dtype, seed=3)
    cols = [0, c // 2, c - 1]
    labels = case["labels"].clone()
    labels[torch.isin(labels, torch.tensor(cols))] = 1  # the label logit stays finite
    case["labels"] = labels
    for k in ("logits_1", "logits_12"):
        case[k][:, cols] = float("-inf")
    _check_against_oracle(case)
    grad_out = torch.ones(7, 70, dtype=dtype)
    _, grads = _run_cpp(case, grad_out)
    assert (grads["logits_1"][:, cols] == 0).all()


# (C, column of the NaN): in the vector body and in the ragged tail of each path; 2049 puts the
# tail in a second log-sum-exp chunk.
NAN_SPOTS = [(9, 2), (9, 8), (33, 3), (33, 32), (2049, 100), (2049, 2048)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c, col", NAN_SPOTS)
def test_nan_off_label_raises_naming_the_logits(c, col, dtype):
    _require_cpp()
    case = _case(66, c, dtype, seed=7)
    row = 65  # the second tile
    labels = case["labels"].clone()
    labels[row] = 0 if col != 0 else 1
    case["labels"] = labels
    bad = case["logits_2"].clone()
    bad[row, col] = float("nan")
    case["logits_2"] = bad
    with pytest.raises(ValueError, match="logits_2"):
        dm.ops.interaction_scores(**case, backend="cpp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", (7, 33, 2049))
def test_two_threads_equal_one_thread(c, dtype):
    """Blocks of rows split across threads give bit-identical scores and gradients."""
    _require_cpp()
    b = 1000 if c < 100 else 130
    case = _case(b, c, dtype, prior=True, seed=11)
    grad_out = torch.randn(7, b, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_cpp(case, grad_out)
        torch.set_num_threads(2)
        two = _run_cpp(case, grad_out)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0])
    for name in one[1]:
        assert torch.equal(one[1][name], two[1][name]), name
    _check_against_oracle(case)


# Rows of more than 32 classes are summed under a shift: the larger of the maximum of the row's
# first vector (8 or 16 floats; 1 double) and the label's logit, kept while no chunk's maximum lies more
# than 8 above it, else the chunk is summed again under its maximum. (C, column of a bump, its
# height above the row's logits): a bump past the first vector, in the ragged tail, in a later
# chunk; just under the threshold and well over it (the chunk summed again, the running sum
# rescaled).
BUMPS = [(40, 20, 7.5), (40, 39, 100.0), (2049, 2048, 100.0), (4100, 3000, 100.0),
         (4100, 3000, 7.5), (4100, 4099, 100.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c, col, height", BUMPS)
def test_row_maximum_far_above_the_first_vector(c, col, height, dtype):
    _require_cpp()
    case = _case(70, c, dtype, prior=True, seed=col)
    bumped = torch.arange(70) % 3 != 0  # the other rows keep the first shift
    for k in ("logits_1", "logits_12"):
        case[k][bumped, col] += height
    _check_against_oracle(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", (40, 2049))
def test_first_vector_of_minus_infinity(c, dtype):
    """A row whose first vector holds no number above -inf takes each chunk's maximum first."""
    _require_cpp()
    case = _case(70, c, dtype, seed=5)
    labels = case["labels"].clone()
    labels[labels < 8] = 8  # the label logit stays finite
    case["labels"] = labels
    case["logits_2"][:, :8] = float("-inf")
    _check_against_oracle(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", (-1e6, -1e4, -300.0, 300.0, 1e4, 1e6))
def test_logits_far_from_zero(offset, dtype):
    """x - shift stays exact for logits away from zero (the shift is one of the row's values), and
    so does the backward's exp(x - lse): the lse is saved in float64, where the float maximum plus
    the log-sum is exact (a float32 lse, rounded to half an ulp of 1e4, put 5e-4 of error into
    every gradient). At 1e6 the rest of the rounded lse passes 2^-7, past the series for its exp."""
    _require_cpp()
    case = _case(70, 309, dtype, seed=9)
    for k in ("logits_1", "logits_2", "logits_12"):
        case[k] += offset
    _check_against_oracle(case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", (40, 2049))
def test_label_logit_far_above_the_first_vector(c, dtype):
    """The label's logit as the shift: a right, confident classifier's row needs no second pass,
    and keeps the accuracy of a sum under the maximum."""
    _require_cpp()
    case = _case(70, c, dtype, seed=c + 1)
    labels = case["labels"].clone()
    labels[labels < 8] = 8
    case["labels"] = labels
    for k in ("logits_1", "logits_2", "logits_12"):
        case[k][torch.arange(70), labels] += 60.0
    _check_against_oracle(case)


def test_gap_check_survives_rounding_of_huge_logits():
    """Logits of 2^30 + 128 (float32 steps of 128 there): shift + 8 rounds to the shift itself, and
    a chunk maximum one step above the shift is still summed again, not taken as within reach."""
    _require_cpp()
    x = torch.full((1, 40), 2.0**30 + 128)
    x[0, 20] += 128
    y = torch.tensor([3])  # not the maximum: the shift stays the first vector's
    got = dm.ops.interaction_scores(x, x, x, y, redundancy="mmi", backend="cpp").pmi_1
    xd = x.double()
    want = interaction_scores_ref(xd, xd, xd, y, redundancy="mmi").pmi_1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("c", (45, 2048 + 45))
def test_two_pass_rows_count_a_maximum_in_the_ragged_end(c):
    """A row with no number above -inf in its first vector nor at its label (-inf there: scores
    that the public op refuses, but the raw op returns and its backward reads the log-sum-exp)
    takes each chunk's maximum first. A maximum that only the ragged last vector holds must count,
    or exp(x - shift) overflows: the log-sum-exp against torch.logsumexp."""
    _require_cpp()
    gen = torch.Generator().manual_seed(c)
    logits = torch.randn(3, 5, c, generator=gen)
    logits[..., :8] = float("-inf")  # the first vector, the label's column among them
    logits[..., c - 1] = 200.0  # past the last whole vector of the row (and of its last chunk)
    labels = torch.zeros(5, dtype=torch.long)
    _, lse = torch.ops.dmil_fast.interaction_scores(*logits, labels, None, None, None, 1)
    torch.testing.assert_close(lse.t(), torch.logsumexp(logits.double(), -1), rtol=1e-6, atol=1e-5)


def test_the_clones_listed_are_those_this_cpu_runs():
    _require_cpp()
    from dmil_fast import _C

    isas = _C.cpu_kernel_isas()
    assert isas[-1] == "portable" and len(set(isas)) == len(isas)
    if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        has_avx2 = "avx2" in flags and "fma" in flags
        assert ("avx2" in isas) == has_avx2
        assert ("avx512" in isas) == (has_avx2 and "avx512f" in flags)


def test_an_unknown_clone_name_is_an_error_naming_the_variable(monkeypatch):
    _require_cpp()
    monkeypatch.setenv("DMIL_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"DMIL_FAST_CPU_ISA=sse9 .*expected auto, .*portable"):
        dm.ops.interaction_scores(**_case(4, 40, torch.float32), backend="cpp")
    with pytest.raises(RuntimeError, match=r"DMIL_FAST_CPU_ISA=sse9 "):  # double: one build, same check
        dm.ops.interaction_scores(**_case(4, 40, torch.float64), backend="cpp")
