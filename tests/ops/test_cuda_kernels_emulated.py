"""The CUDA interaction-scoring kernels, executed on the CPU, against the pure-PyTorch oracle.

csrc/interaction_scores/interaction_scores_cuda_kernels.cuh holds the kernels and the host side
of their launch. Here they are compiled as host code (tests/ops/cuda_emulation) and run with each
warp's 32 lanes in lockstep, so that their indexing, masking, shuffle reductions, NaN rows and
dtype handling (float16 and bfloat16 included) are checked on machines without a GPU, where the
CUDA build cannot run. What this cannot check is the GPU itself: its exp and log under
--use_fast_math, its memory model, its speed; the CUDA tests of the other modules do that where a
GPU is present.
"""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils import cpp_extension

from dmil_fast.ops import InteractionScores
from dmil_fast.ops.interaction_scores import _backward_through, _fused_op_args, _setup_context
from dmil_fast.reference.interactions import interaction_scores_ref
from tests.ops.test_interaction_scores import (
    DIFF_KEYS,
    assert_gradients_accurate_far_from_zero,
    assert_low_precision_within_twice_pytorch,
    assert_matches_reference,
    assert_rounded_tie_takes_the_forwards_branch,
    make_case,
    run_with_grads,
    tolerances,
)

ROOT = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulated kernels, built once per test session (about 40 s on two cores)."""
    build = tmp_path_factory.mktemp("warp_emulation")
    return cpp_extension.load(
        name="dmil_fast_warp_emulation",
        sources=[str(EMULATION / "emulated_interaction_scores.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(EMULATION)],
        extra_cflags=["-O1"],
        build_directory=str(build),
    )


@pytest.fixture(autouse=True)
def unwritten_outputs_are_nan():
    """torch.empty fills new tensors with NaN here (integers with their maximum), so that an
    output element a kernel never writes cannot pass as a value."""
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_new_tensors_are_filled_with_nan_in_this_module(emu):
    assert torch.isnan(torch.empty(8)).all()


def emulated_op(emu):
    """interaction_scores(**case) through the emulated kernels, with the argument conversions
    and the autograd glue of the public op's fused path."""

    class Emulated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = emu.interaction_scores(*inputs, True)
            _setup_context(ctx, inputs, output)
            return output

        backward = staticmethod(_backward_through(emu.interaction_scores_backward))

    def call(logits_1, logits_2, logits_12, labels, *, entropy_1=None, entropy_2=None,
             log_prior=None, redundancy="lsmi"):
        scores, _ = Emulated.apply(*_fused_op_args(logits_1, logits_2, logits_12, labels,
                                                  entropy_1, entropy_2, log_prior, redundancy))
        return InteractionScores(*scores.unbind(1))

    return call


# ---- the emulation itself -----------------------------------------------------------------------

FULL = 0xFFFFFFFF


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 16, 5, 31])
def test_a_shuffle_returns_the_xor_partners_value(emu, offset):
    out = emu.shuffle_probe(3, offset, 32, 32, FULL)
    t = torch.arange(3 * 64)
    block, thread = t // 64, t % 64
    partner = (thread - thread % 32) + ((thread % 32) ^ offset)
    assert torch.equal(out, (100 * block + partner).float())


def test_lanes_may_exit_before_a_shuffle_that_does_not_read_them(emu):
    """As in CUDA: the upper half of each warp has left; the lower half shuffles within itself."""
    out = emu.shuffle_probe(1, 4, 16, 32, FULL)
    thread = torch.arange(64)
    lane = thread % 32
    want = torch.where(lane < 16, (thread - lane) + (lane ^ 4), -1).float()
    assert torch.equal(out, want)


def test_reading_a_lane_that_has_exited_is_reported(emu):
    with pytest.raises(RuntimeError, match="reads a lane that has exited"):
        emu.shuffle_probe(1, 16, 16, 32, FULL)


def test_lanes_at_different_shuffles_are_reported(emu):
    with pytest.raises(RuntimeError, match="not exited is at another shuffle"):
        emu.shuffle_probe(1, 1, 32, 16, FULL)


def test_a_partial_mask_is_reported(emu):
    with pytest.raises(RuntimeError, match="mask other than all 32 lanes"):
        emu.shuffle_probe(1, 1, 32, 32, 0x0000FFFF)


# ---- the kernels against the reference ----------------------------------------------------------

@given(b=st.integers(1, 40), c=st.integers(1, 300), redundancy=st.sampled_from(["lsmi", "mmi"]),
       prior=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(emu, b, c, redundancy, prior, dtype, seed):
    """C up to 300: each of the three group sizes (one lane per sample, eight, a warp), with one
    to three strides of the unrolled loop, the last one ragged; B up to 40 rows: up to five
    blocks of eight warps for wide rows."""
    case = make_case(b, c, redundancy=redundancy, prior=prior, dtype=dtype, seed=seed)
    grads = torch.randn(7, b, generator=torch.Generator().manual_seed(seed + 1),
                        dtype=torch.float64).to(dtype)
    assert_matches_reference(emulated_op(emu), case, grads, **tolerances(dtype, 10.0))


# Class counts at the edges of each group size, and a batch per case that fills two blocks and
# part of a third (256, 32 or 8 samples a block), so that warps and groups past the batch occur.
EDGE_CLASSES = [1, 6, 16, 17, 100, 128, 129, 309]


def test_the_edge_cases_cover_every_group_size(emu):
    assert sorted({emu.lanes_per_row(c) for c in EDGE_CLASSES}) == [1, 8, 32]
    assert [emu.lanes_per_row(c) for c in (16, 17, 128, 129)] == [1, 8, 8, 32]


@pytest.mark.parametrize("c", EDGE_CLASSES)
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_every_group_size_across_blocks(emu, c, redundancy):
    rows_per_block = emu.threads_per_block // emu.lanes_per_row(c)
    b = 2 * rows_per_block + 3
    case = make_case(b, c, redundancy=redundancy, prior=c % 2 == 0, seed=c)
    grads = torch.randn(7, b, generator=torch.Generator().manual_seed(c))
    assert_matches_reference(emulated_op(emu), case, grads, **tolerances(torch.float32, 10.0))


@pytest.mark.parametrize("c", [2, 40, 300])
def test_gradients_stay_accurate_far_from_zero(emu, c):
    """Logits offset by 1e4: float32 gradients against the float64 reference on the same values,
    within float32 round-off (the float64 log-sum-exps and the exp(-lo) exp(x - hi) split)."""
    assert_gradients_accurate_far_from_zero(emulated_op(emu), 12, c, "cpu")


@pytest.mark.parametrize("c", [10, 60, 200])
def test_minus_infinity_logits_are_classes_left_out(emu, c):
    """-inf logits away from the label (classes masked out) add nothing to the log-sum-exp and get
    a zero gradient, as in log_softmax; every third class of a row, so in every group size the
    lanes of the unrolled loads meet them."""
    case = make_case(9, c, prior=True, seed=3)
    labels = case["labels"]
    for k, key in enumerate(("logits_1", "logits_2", "logits_12")):
        x = case[key].clone()
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[:, k::3] = True
        masked[torch.arange(9), labels] = False
        case[key] = x.masked_fill(masked, float("-inf"))
    grads = torch.randn(7, 9, generator=torch.Generator().manual_seed(1))
    out, _ = assert_matches_reference(emulated_op(emu), case, grads,
                                      **tolerances(torch.float32, 10.0))
    for field in out:
        assert torch.isfinite(field).all()


@pytest.mark.parametrize("c", [6, 100, 131])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_low_precision_error_within_twice_pytorch(emu, dtype, redundancy, c):
    """Half-precision logits, scores and gradients, in each group size: error against the float32
    truth at most twice that of PyTorch computing from the same rounded logits."""
    case32 = make_case(67, c, redundancy=redundancy, prior=True, seed=9)
    assert_low_precision_within_twice_pytorch(
        emulated_op(emu), case32, dtype, torch.randn(7, 67, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_low_precision_gradient_takes_the_forwards_branch_at_a_rounded_tie(emu, dtype, redundancy):
    """pmi_1 and pmi_2 differ in float32 and round to one half-precision value: the backward
    re-decides r's branch from pmis rebuilt in float32, and the gradient of r goes to the logits
    of the modality the float32 forward chose, worked out here in float64 (as in
    test_interaction_scores)."""
    assert_rounded_tie_takes_the_forwards_branch(emulated_op(emu), dtype, redundancy, "cpu")


@pytest.mark.parametrize("c", [5, 37, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nan_fill", [True, False], ids=["nan-filled", "unfilled"])
def test_a_bad_label_gives_a_nan_row_and_leaves_the_others(emu, dtype, c, nan_fill):
    """The kernels never read through a label outside [0, C): that row's scores, log-sum-exps and
    gradients are NaN; every other row equals the reference on the good rows alone. Run once with
    new tensors NaN-filled (an unwritten good element fails) and once without (an unwritten NaN
    of a bad row fails)."""
    torch.utils.deterministic.fill_uninitialized_memory = nan_fill
    case = make_case(11, c, prior=True, seed=1)
    logits = [case[k].to(dtype) for k in ("logits_1", "logits_2", "logits_12")]
    labels = case["labels"].clone()
    labels[[2, 9]] = torch.tensor([c, -1])
    h1, h2, prior = case["entropy_1"], case["entropy_2"], case["log_prior"]
    scores, lse = emu.interaction_scores(*logits, labels, h1, h2, prior, 0, True)
    g1, g2, g12, g_h = emu.interaction_scores_backward(torch.ones_like(scores), scores, lse,
                                                       *logits, labels, h1, h2, 0)
    bad = torch.tensor([2, 9])
    good = torch.tensor([i for i in range(11) if i not in (2, 9)])
    for t in (scores, lse, g1, g2, g12, g_h):
        assert torch.isnan(t[bad]).all() and torch.isfinite(t[good]).all()
    good_case = dict(logits_1=logits[0][good], logits_2=logits[1][good],
                     logits_12=logits[2][good], labels=labels[good], entropy_1=h1[good],
                     entropy_2=h2[good], log_prior=prior)
    ref, want = run_with_grads(interaction_scores_ref, good_case,
                               torch.ones(7, len(good), dtype=dtype))
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(scores[good], torch.stack(tuple(ref), 1), **tol)
    for name, got, w in zip(DIFF_KEYS, (g1, g2, g12, g_h[:, 0], g_h[:, 1]), want):
        torch.testing.assert_close(got[good], w, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("c", [6, 16, 17, 128, 129])
@pytest.mark.parametrize("redundancy", ["lsmi", "mmi"])
def test_non_finite_logits_give_what_the_reference_gives(emu, c, redundancy):
    """Row 1: +inf away from the label (NaN in log_softmax); row 2: NaN; row 3: -inf at the label
    (pmi -inf); row 4: -inf everywhere (NaN); row 5: -inf everywhere but at the label (the last
    class), so that lanes read nothing but -inf for a while (pmi log C); row 0 finite. The scores
    match the reference's, NaN and infinities in the same places, in each group size."""
    case = make_case(6, c, redundancy=redundancy, seed=c)
    labels = case["labels"]
    x = case["logits_1"].clone()
    other = (labels + 1) % c
    x[1, other[1]] = float("inf")
    x[2, other[2]] = float("nan")
    x[3, labels[3]] = float("-inf")
    x[4] = float("-inf")
    x[5, :-1] = float("-inf")
    labels[5] = c - 1
    case["logits_1"] = x
    with torch.no_grad():
        out = emulated_op(emu)(**case)
        ref = interaction_scores_ref(**case)
    for name, a, b in zip(InteractionScores._fields, out, ref):
        torch.testing.assert_close(a, b, equal_nan=True, **tolerances(torch.float32, 10.0),
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert torch.isnan(out.pmi_1[[1, 2, 4]]).all() and out.pmi_1[3] == float("-inf")
    assert torch.isfinite(out.pmi_1[0]) and out.pmi_1[5].item() == pytest.approx(math.log(c))


def test_more_classes_than_the_kernels_index_are_refused(emu):
    wide = torch.zeros(1, 1).expand(1, 2**31)
    with pytest.raises(RuntimeError, match="takes at most 2147483519 classes, got 2147483648"):
        emu.interaction_scores(wide, wide, wide, torch.zeros(1, dtype=torch.long), None, None,
                               None, 1, False)


def test_without_save_lse_the_scores_are_the_same_and_no_lse_is_written(emu):
    case = make_case(10, 7, redundancy="mmi", prior=True, seed=4)
    args = (case["logits_1"], case["logits_2"], case["logits_12"], case["labels"], None, None,
            case["log_prior"], 1)
    scores, lse = emu.interaction_scores(*args, True)
    bare_scores, bare_lse = emu.interaction_scores(*args, False)
    assert lse.shape == (10, 3) and lse.dtype == torch.float64 and bare_lse.shape == (0, 3)
    assert torch.equal(bare_scores, scores)
    want = torch.stack([torch.logsumexp(case[k].double(), 1)
                        for k in ("logits_1", "logits_2", "logits_12")], 1)
    torch.testing.assert_close(lse, want, rtol=1e-6, atol=1e-6)


def test_an_empty_batch_launches_nothing(emu):
    x = torch.empty(0, 5)
    scores, lse = emu.interaction_scores(x, x, x, torch.empty(0, dtype=torch.long), None, None,
                                         None, 1, True)
    assert scores.shape == (0, 7) and lse.shape == (0, 3)
    grads = emu.interaction_scores_backward(scores, scores, lse, x, x, x,
                                            torch.empty(0, dtype=torch.long), None, None, 1)
    assert [tuple(g.shape) for g in grads] == [(0, 5), (0, 5), (0, 5), (0, 2)]


def test_hand_computed_two_classes(emu):
    """float64, one row: logits_1 = [ln 3, 0], logits_2 = [0, 0], logits_12 = [ln 7, 0], label 0,
    mmi with the uniform prior: i1 = ln 1.5, i2 = 0, i12 = ln 1.75, r = 0, s = ln(7/6)."""
    opts = dict(dtype=torch.float64)
    l1 = torch.tensor([[math.log(3.0), 0.0]], **opts)
    l2 = torch.zeros(1, 2, **opts)
    l12 = torch.tensor([[math.log(7.0), 0.0]], **opts)
    out = emulated_op(emu)(l1, l2, l12, torch.zeros(1, dtype=torch.long), redundancy="mmi")
    a = math.log(1.5)
    expect = [a, 0.0, math.log(1.75), 0.0, a, 0.0, math.log(7 / 6)]
    assert torch.stack(tuple(out), 1)[0].tolist() == pytest.approx(expect, abs=1e-12)
