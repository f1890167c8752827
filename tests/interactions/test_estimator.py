"""LSMI estimator: exact logic-gate decompositions, per-sample alignment, priors, streaming from a
feature dataset, gradients never accumulated, and input validation."""

import math

import numpy as np
import pytest
import torch

from dmil_fast.data import LOGIC_GATE_TRUTH, FeatureDataset, logic_gate, make_synthetic
from dmil_fast.interactions import LSMIEstimator
from dmil_fast.interactions._inputs import Source
from dmil_fast.reference.interactions import interaction_scores_ref

COMPONENTS = ("redundancy", "unique_1", "unique_2", "synergy")


@pytest.mark.parametrize("gate", ["xor", "or", "and", "copy_x1", "copy_both"])
def test_logic_gates_match_exact_decomposition(gate):
    """Dataset-level means in nats on held-out samples, against the exact PID of each gate
    (XOR: S = ln 2; OR / AND: R = 3/4 ln 4/3, S = 1/2 ln 2; copy_x1: U1 = ln 2; copy_both: R = ln 2)."""
    x1, x2, y = logic_gate(gate, 1500, seed=0)
    t1, t2, ty = logic_gate(gate, 1500, seed=1)
    est = LSMIEstimator(2, seed=0, progress=False).fit(x1, x2, y)
    means = est.score(t1, t2, ty).means()
    truth = LOGIC_GATE_TRUTH[gate]
    for key in COMPONENTS:
        assert abs(means[key] - truth[key]) < 0.05, (gate, key, means, truth)


@pytest.fixture(scope="module")
def flagged_task():
    """x = [bit, flag]: where flag = 1, y = bit (i(x; y) = ln 2); where flag = 0, y is a fair coin
    independent of x (i = 0). Modality 2 is a noisy copy of modality 1."""
    gen = torch.Generator().manual_seed(11)
    n = 1600
    bit = torch.randint(0, 2, (n,), generator=gen)
    flag = torch.randint(0, 2, (n,), generator=gen)
    coin = torch.randint(0, 2, (n,), generator=gen)
    y = torch.where(flag == 1, bit, coin)
    x1 = torch.stack([bit, flag], 1).float() + 0.05 * torch.randn(n, 2, generator=gen)
    x2 = torch.stack([bit, flag], 1).float() + 0.05 * torch.randn(n, 2, generator=gen)
    est = LSMIEstimator(2, seed=0, progress=False).fit(x1[:1000], x2[:1000], y[:1000])
    return est, x1[1000:], x2[1000:], y[1000:], flag[1000:]


def test_scores_stay_aligned_with_their_samples(flagged_task):
    est, x1, x2, y, flag = flagged_task
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    scores = est.score(x1[perm], x2[perm], y[perm], adjust=False)
    informative = flag[perm] == 1
    i12 = scores.pmi_12
    assert abs(float(i12[informative].mean()) - math.log(2)) < 0.1
    assert abs(float(i12[~informative].mean())) < 0.1
    # Sample by sample: informative samples carry clearly more information than the others.
    assert float((i12[informative] > 0.5 * math.log(2)).float().mean()) > 0.95
    assert float((i12[~informative] < 0.5 * math.log(2)).float().mean()) > 0.95


def test_scoring_is_permutation_equivariant_and_batch_independent(flagged_task):
    est, x1, x2, y, _ = flagged_task
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    base = est.score(x1, x2, y)
    permuted = est.score(x1[perm], x2[perm], y[perm])
    small_batches = est.score(x1, x2, y, batch_size=7)
    for a, b, c in zip(base, permuted, small_batches):
        torch.testing.assert_close(a[perm], b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_per_sample_scores_follow_the_lsmi_formula(flagged_task):
    """The per-sample outputs equal the reference formula applied to the estimator's own parts."""
    est, x1, x2, y, _ = flagged_task
    scores = est.score(x1, x2, y, adjust=False)
    with torch.no_grad():
        f1, f2, f12 = est.discriminators
        h1, h2 = est.densities[0](x1), est.densities[1](x2)
        expected = interaction_scores_ref(f1(x1), f2(x2), f12(torch.cat([x1, x2], 1)), y, entropy_1=h1,
                                          entropy_2=h2, log_prior=est.log_prior)
    for a, b in zip(scores, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    adjusted = est.score(x1, x2, y)
    means = {k: float(getattr(scores, k).double().mean()) for k in COMPONENTS}
    if means["redundancy"] < 0 or means["synergy"] < 0:
        c = -min(means["redundancy"], means["synergy"])
    elif means["unique_1"] < 0 or means["unique_2"] < 0:
        c = min(means["unique_1"], means["unique_2"])
    else:
        c = 0.0
    torch.testing.assert_close(adjusted.redundancy, scores.redundancy + c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adjusted.unique_1, scores.unique_1 - c, rtol=1e-5, atol=1e-5)


def test_priors():
    x1, x2, y = logic_gate("or", 400, seed=3)
    est = LSMIEstimator(2, epochs=1, progress=False).fit(x1, x2, y)
    freq = np.bincount(y.numpy(), minlength=2) / len(y)
    np.testing.assert_allclose(est.log_prior.cpu().numpy(), np.log(freq), rtol=1e-6)
    uniform = LSMIEstimator(2, prior="uniform", epochs=1, progress=False).fit(x1, x2, y)
    np.testing.assert_allclose(uniform.log_prior.cpu().numpy(), [math.log(0.5)] * 2, rtol=1e-6)


def test_mmi_redundancy_is_min_of_pmis():
    x1, x2, y = logic_gate("and", 300, seed=4)
    est = LSMIEstimator(2, redundancy="mmi", epochs=2, progress=False).fit(x1, x2, y)
    assert est.densities is None
    s = est.score(x1, x2, y, adjust=False)
    torch.testing.assert_close(s.redundancy, torch.minimum(s.pmi_1, s.pmi_2))
    torch.testing.assert_close(s.synergy, s.pmi_12 - s.pmi_1 - s.pmi_2 + s.redundancy, rtol=1e-5, atol=1e-5)


def test_each_discriminator_standardises_its_own_inputs():
    """Modality 2 on another location and scale than modality 1: each standardiser (the joint one
    over the concatenation) maps its fitting inputs to mean 0 and unbiased std 1 per feature."""
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(200, 3, generator=g)
    x2 = 5.0 + 10.0 * torch.randn(200, 3, generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    est = LSMIEstimator(num_classes=2, redundancy="mmi", epochs=1, progress=False).fit(x1, x2, y)
    inputs = (x1, x2, torch.cat([x1, x2], dim=1))
    modules = (est.discriminators[0][0], est.discriminators[1][0], est.discriminators[2].standardize)
    for k, (module, x) in enumerate(zip(modules, inputs)):
        with torch.no_grad():
            torch.testing.assert_close(module(x), (x - x.mean(0)) / x.std(0), rtol=1e-5, atol=1e-5, msg=str(k))


def test_each_model_keeps_its_epoch_of_lowest_held_out_loss():
    """Random labels on few samples: the held-out CE rises as the discriminators memorise. Each
    keeps the parameters of its best held-out epoch, whose loss, recomputed here on the held-out
    rows (the first draw of the seeded generator under mmi), is the history's minimum."""
    g = torch.Generator().manual_seed(4)
    n, seed = 80, 7
    x1, x2 = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    est = LSMIEstimator(num_classes=3, redundancy="mmi", epochs=40, batch_size=16, lr=1e-2, hidden=64,
                        weight_decay=0.0, val_fraction=0.25, seed=seed, progress=False).fit(x1, x2, y)
    held_out = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:20].sort().values
    h1, h2, hy = x1[held_out], x2[held_out], y[held_out]
    f1, f2, f12 = est.discriminators
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(f(x), hy).item()
                  for f, x in ((f1, h1), (f2, h2), (f12, torch.cat([h1, h2], dim=1)))]
    for k, loss in enumerate(losses):
        curve = [record["val"][k] for record in est.history]
        assert min(curve) < curve[-1] - 0.05, k  # the case is one where the last epoch is not the best
        assert math.isclose(loss, min(curve), rel_tol=1e-5, abs_tol=1e-6), k


def test_feature_dataset_streams_like_tensors(tmp_path):
    path = make_synthetic(tmp_path / "syn", n=240, dim=3, num_classes=3, seed=2)
    data = FeatureDataset(path)
    x1, x2, y, _ = data.as_tensors()
    est = LSMIEstimator(3, epochs=2, batch_size=32, progress=False).fit(FeatureDataset(path, "train"))
    assert est.dims == (3, 3)
    for a, b in zip(est.score(data), est.score(x1, x2, y)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="either a dataset"):
        est.score(data, x2, y)


def test_density_gradients_are_zeroed_every_step():
    """Full-batch steps at a vanishing learning rate: the gradient left after 3 steps is one
    step's gradient, not the sum of three."""
    x1, x2, y = logic_gate("xor", 128, seed=5)
    est = LSMIEstimator(2, epochs=3, batch_size=128, lr=1e-12, density_lr=1e-12, val_fraction=0.0,
                        progress=False).fit(x1, x2, y)
    knife = est.densities[0]
    params = [p for p in knife.parameters()]
    fresh = torch.autograd.grad(-knife.log_prob(x1).mean(), params)
    for p, g in zip(params, fresh):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def small_fitted():
    x1, x2, y = logic_gate("xor", 64, seed=6)
    return LSMIEstimator(2, epochs=1, progress=False).fit(x1, x2, y), (x1, x2, y)


@pytest.mark.parametrize("case,error,match", [
    ("short_x2", ValueError, "x2 has 63 samples"),
    ("short_y", ValueError, "y has 63 labels"),
    ("label_range", ValueError, r"y must lie in \[0, 2\).*num_classes is 2, the labels need num_classes >= 3"),
    ("negative_label", ValueError, r"y must lie in \[0, 2\).*num_classes is 2"),
    ("nan_x1", ValueError, "x1 contains NaN"),
    ("inf_x2", ValueError, "x2 contains NaN or infinite"),
    ("dims_x1", ValueError, "x1 must have 1 features"),
    ("rank_x1", ValueError, r"x1 must be 2-D"),
    ("float_y", TypeError, "y must hold integer"),
    ("list_x1", TypeError, "x1 must be a torch.Tensor or numpy.ndarray"),
])
def test_bad_inputs_name_the_argument(small_fitted, case, error, match):
    est, (x1, x2, y) = small_fitted
    x1, x2, y = x1.clone(), x2.clone(), y.clone()
    if case == "short_x2":
        x2 = x2[:-1]
    elif case == "short_y":
        y = y[:-1]
    elif case == "label_range":
        y[3] = 2
    elif case == "negative_label":
        y[0] = -1
    elif case == "nan_x1":
        x1[5, 0] = float("nan")
    elif case == "inf_x2":
        x2[2, 0] = float("inf")
    elif case == "dims_x1":
        x1 = torch.cat([x1, x1], 1)
    elif case == "rank_x1":
        x1 = x1[:, 0]
    elif case == "float_y":
        y = y.float()
    elif case == "list_x1":
        x1 = x1.tolist()
    with pytest.raises(error, match=match):
        est.score(x1, x2, y)
    if case not in ("dims_x1",):  # the same checks guard fit
        with pytest.raises(error, match=match):
            LSMIEstimator(2, epochs=1, progress=False).fit(x1, x2, y)


def test_numpy_numbers_and_0d_tensors_are_numbers():
    est = LSMIEstimator(2, seed=np.int64(3), num_workers=np.int32(0), epochs=np.int64(2), lr=np.float32(0.5),
                        weight_decay=torch.tensor(0.25), progress=False)
    assert (est.seed, est.num_workers, est.epochs, est.lr, est.weight_decay) == (3, 0, 2, 0.5, 0.25)
    assert all(type(v) in (int, float) for v in (est.seed, est.num_workers, est.epochs, est.lr, est.weight_decay))


def test_bad_settings():
    with pytest.raises(ValueError, match="num_classes"):
        LSMIEstimator(1)
    assert LSMIEstimator(np.int64(3)).num_classes == 3
    with pytest.raises(ValueError, match="redundancy"):
        LSMIEstimator(2, redundancy="max")
    with pytest.raises(ValueError, match="prior"):
        LSMIEstimator(2, prior="flat")
    with pytest.raises(ValueError, match="epochs"):
        LSMIEstimator(2, epochs=0)
    for name, value, match in (("lr", "1e-3", "lr must be a finite number > 0"),
                               ("lr", 0.0, "lr must be a finite number > 0"),
                               ("lr", float("inf"), "lr must be a finite number > 0"),
                               ("density_lr", float("nan"), "density_lr must be a finite number > 0"),
                               ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
                               ("val_fraction", 1.0, r"val_fraction must be in \[0, 1\)"),
                               ("seed", 1.7, "seed must be an int >= 0"), ("seed", -2, "seed must be an int >= 0"),
                               ("num_workers", -1, "num_workers must be an int >= 0"),
                               ("device", "gpu", "device must be 'auto' or a torch device"),
                               ("device", "cuda:99", "device 'cuda:99' is not available")):
        with pytest.raises(ValueError, match=match):
            LSMIEstimator(2, **{name: value})
    with pytest.raises(RuntimeError, match="before fit"):
        LSMIEstimator(2).score(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))


def test_tensor_batches_shuffle_by_their_generator_and_stay_aligned():
    n = 50
    x = torch.arange(n, dtype=torch.float32)[:, None]
    source = Source(x, -x, torch.arange(n) % 3, num_classes=3)

    def order(seed):
        rows = []
        for b1, b2, by in source.batches(8, device=torch.device("cpu"), shuffle=True,
                                         generator=torch.Generator().manual_seed(seed)):
            assert torch.equal(b2, -b1) and torch.equal(by, b1[:, 0].long() % 3)  # rows stay aligned
            rows.append(b1[:, 0])
        return torch.cat(rows)

    first = order(0)
    assert sorted(first.tolist()) == list(range(n)) and not torch.equal(first, x[:, 0])
    assert torch.equal(first, order(0)) and not torch.equal(first, order(1))


def test_a_dataset_input_leaves_the_global_rng_untouched(tmp_path):
    """fit and score read a FeatureDataset through DataLoaders, whose base seed comes from a
    private generator: the next global draw is the one a fresh manual_seed gives, and the
    results are the same from any global RNG state."""
    torch.manual_seed(123)
    want = torch.randn(1)
    path = make_synthetic(tmp_path / "syn", n=90, dim=3, num_classes=3, seed=4)

    def fit_and_score(global_seed):
        torch.manual_seed(global_seed)
        est = LSMIEstimator(3, epochs=1, batch_size=32, progress=False).fit(FeatureDataset(path, "train"))
        scores = est.score(FeatureDataset(path), batch_size=40)
        return scores, torch.randn(1)

    first, after = fit_and_score(123)
    assert torch.equal(after, want)
    second, _ = fit_and_score(7)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
