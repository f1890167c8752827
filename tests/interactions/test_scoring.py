"""score_model: per-sample interactions of a trained model from its own outputs."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from dmil_fast.data import FeatureDataset, make_synthetic
from dmil_fast.interactions import score_model
from dmil_fast.interactions.knife import KNIFE
from dmil_fast.reference.interactions import adjust_interactions_ref, interaction_scores_ref


class StandIn(nn.Module):
    """A fixed two-modality classifier exposing ``interaction_outputs``; records how it was called."""

    def __init__(self, dim, num_classes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.head_1 = nn.Linear(dim, num_classes)
        self.head_2 = nn.Linear(dim, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        self.calls = []

    def interaction_outputs(self, visual, audio):
        self.calls.append((self.training, torch.is_grad_enabled()))
        l1, l2 = self.head_1(visual), self.head_2(audio)
        return {"logits_1": l1, "logits_2": l2, "logits_12": l1 + l2, "embed_1": visual, "embed_2": audio}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = make_synthetic(tmp_path_factory.mktemp("syn"), n=200, dim=3, num_classes=4, seed=1)
    return FeatureDataset(path, "train")


def _reference(model, dataset):
    x1, x2, y, idx = dataset.as_tensors()
    with torch.no_grad():
        out = model.interaction_outputs(x1, x2)
    freq = np.bincount(y.numpy(), minlength=4) / len(y)
    log_prior = torch.tensor(np.log(np.maximum(freq, 1 / len(y))), dtype=torch.float32)
    return out, y, idx, log_prior


def test_mmi_scores_match_reference_in_dataset_order(dataset):
    model = StandIn(3, 4).train()
    scores, indices = score_model(model, dataset, batch_size=17, redundancy="mmi", adjust=False, progress=False)
    calls = list(model.calls)
    out, y, idx, log_prior = _reference(model, dataset)
    expected = interaction_scores_ref(out["logits_1"], out["logits_2"], out["logits_12"], y,
                                      log_prior=log_prior, redundancy="mmi")
    np.testing.assert_array_equal(indices, idx.numpy())
    for a, b in zip(scores, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Every forward ran in eval mode without gradients; the caller's mode is restored.
    assert calls and all(call == (False, False) for call in calls)
    assert model.training


def test_each_submodule_gets_its_own_mode_back(dataset):
    """A model in training with a frozen part in eval mode (a backbone whose BatchNorm statistics
    stay fixed): both modes come back as they were, not the top module's for all."""
    model = StandIn(3, 4).train()
    model.head_1.eval()
    score_model(model, dataset, batch_size=64, redundancy="mmi", progress=False)
    assert model.calls and all(call == (False, False) for call in model.calls)
    assert model.training and model.head_2.training and not model.head_1.training


def test_lsmi_scores_use_the_model_pmis_and_densities(dataset):
    model = StandIn(3, 4).eval()
    scores, indices = score_model(model, dataset, batch_size=64, density_epochs=3, progress=False)
    out, y, idx, log_prior = _reference(model, dataset)
    ref = interaction_scores_ref(out["logits_1"], out["logits_2"], out["logits_12"], y, log_prior=log_prior,
                                 redundancy="mmi")
    np.testing.assert_array_equal(indices, idx.numpy())
    for name in ("pmi_1", "pmi_2", "pmi_12"):
        torch.testing.assert_close(getattr(scores, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    # The decomposition identities hold per sample (after the shift c: u1 + r = i1, s + u1 + u2 + r = i12).
    torch.testing.assert_close(scores.unique_1 + scores.redundancy, scores.pmi_1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.synergy + scores.unique_1 + scores.unique_2 + scores.redundancy,
                               scores.pmi_12, rtol=1e-5, atol=1e-5)
    assert not model.training
    assert all(torch.isfinite(t).all() for t in scores)


def _hand_fitted_entropies(out, *, components, seed):
    """Pointwise entropies of each modality's embeddings under a KNIFE density fitted here with the
    documented settings (3 epochs, batch 64, lr 1e-2; modality m's density seeded with seed + m - 1)."""
    entropies = []
    for k, key in enumerate(("embed_1", "embed_2")):
        knife = KNIFE(out[key].shape[1], components)
        knife.fit(out[key], epochs=3, batch_size=64, lr=1e-2, seed=seed + k)
        with torch.no_grad():
            entropies.append(knife(out[key]))
    return entropies


def test_lsmi_redundancy_comes_from_each_modalitys_own_density(dataset):
    """Against the reference fed the pointwise entropies of KNIFE densities fitted by hand with the
    fit's documented settings (modality 1's density seeded with seed, modality 2's with seed + 1),
    before and after the shift."""
    model = StandIn(3, 4)
    kwargs = dict(batch_size=64, density_epochs=3, density_components=5, density_lr=1e-2, seed=4, progress=False)
    raw, _ = score_model(model, dataset, adjust=False, **kwargs)
    shifted, _ = score_model(model, dataset, **kwargs)
    out, y, _, log_prior = _reference(model, dataset)
    entropies = _hand_fitted_entropies(out, components=5, seed=4)
    assert not torch.allclose(entropies[0], entropies[1], atol=1e-2)  # a swap would show
    ref = interaction_scores_ref(out["logits_1"], out["logits_2"], out["logits_12"], y, entropy_1=entropies[0],
                                 entropy_2=entropies[1], log_prior=log_prior, redundancy="lsmi")
    for name, a, b in zip(ref._fields, raw, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for name, a, b in zip(ref._fields, shifted, adjust_interactions_ref(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_uniform_prior(dataset):
    model = StandIn(3, 4)
    scores, _ = score_model(model, dataset, redundancy="mmi", prior="uniform", progress=False)
    out, y, _, _ = _reference(model, dataset)
    log_p = torch.log_softmax(out["logits_1"], -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(scores.pmi_1, log_p + math.log(4), rtol=1e-5, atol=1e-5)


def test_bad_arguments(dataset):
    with pytest.raises(TypeError, match="interaction_outputs"):
        score_model(nn.Linear(3, 4), dataset, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        score_model(StandIn(3, 4), dataset, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="redundancy"):
        score_model(StandIn(3, 4), dataset, redundancy="max", progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        score_model(StandIn(3, 2), dataset, redundancy="mmi", progress=False)
    for name, value, match in (("density_components", 0, "density_components must be a positive int"),
                               ("density_lr", 0.0, "density_lr must be a finite number > 0"),
                               ("density_epochs", 1.5, "density_epochs must be a positive int"),
                               ("seed", -1, "seed must be an int >= 0"), ("seed", 1.5, "seed must be an int >= 0"),
                               ("num_workers", -1, "num_workers must be an int >= 0"),
                               ("device", "tpu", "device must be 'auto' or a torch device")):
        with pytest.raises(ValueError, match=match):
            score_model(StandIn(3, 4), dataset, progress=False, **{name: value})


def test_a_class_absent_from_the_data_counts_once_in_the_empirical_prior(dataset):
    """The docstring's rule, by hand: prior c_y / sum(c) with the absent class's count set to 1."""
    keep = [i for i in range(len(dataset)) if dataset.labels[i] != 3]
    model = StandIn(3, 4)
    scores, _ = score_model(model, Subset(dataset, keep), redundancy="mmi", adjust=False, progress=False)
    x1, x2, y, _ = dataset.as_tensors()
    x1, x2, y = x1[keep], x2[keep], y[keep]
    counts = np.bincount(y.numpy(), minlength=4).astype(float)
    assert counts[3] == 0
    counts[3] = 1.0
    log_prior = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)
    with torch.no_grad():
        log_p = torch.log_softmax(model.interaction_outputs(x1, x2)["logits_1"], -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(scores.pmi_1, log_p - log_prior[y], rtol=1e-5, atol=1e-5)


def test_density_components_reach_the_densities(dataset):
    """density_components=2 (not the default 5): the redundancy equals the reference fed the
    entropies of two-component KNIFE densities fitted by hand with the same seeds."""
    model = StandIn(3, 4)
    raw, _ = score_model(model, dataset, batch_size=64, density_epochs=3, density_components=2, seed=4,
                         adjust=False, progress=False)
    out, y, _, log_prior = _reference(model, dataset)
    entropies = _hand_fitted_entropies(out, components=2, seed=4)
    ref = interaction_scores_ref(out["logits_1"], out["logits_2"], out["logits_12"], y, entropy_1=entropies[0],
                                 entropy_2=entropies[1], log_prior=log_prior, redundancy="lsmi")
    torch.testing.assert_close(raw.redundancy, ref.redundancy, rtol=1e-5, atol=1e-5)


def test_a_dataset_without_row_indices_gets_its_positions(dataset):
    x1, x2, y, _ = dataset.as_tensors()
    _, rows = score_model(StandIn(3, 4), TensorDataset(x1, x2, y), batch_size=17, redundancy="mmi",
                          adjust=False, progress=False)
    np.testing.assert_array_equal(rows, np.arange(len(y)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.complex64])
def test_labels_that_are_not_integers_are_refused(dataset, dtype):
    """Float labels would be truncated to classes and bool ones read as 0/1: both refused."""
    x1, x2, y, _ = dataset.as_tensors()
    labels = (y % 2).to(dtype) if dtype == torch.bool else y.to(dtype) + 0.25
    with pytest.raises(TypeError, match=rf"^dataset labels must hold integer class labels, got dtype {dtype}$"):
        score_model(StandIn(3, 4), TensorDataset(x1, x2, labels), redundancy="mmi", progress=False)


def test_scoring_leaves_the_global_rng_untouched(dataset):
    """Neither the loader (its base seed) nor building the densities draws from the global RNG:
    the next draw after scoring is the one right after seeding, and the scores do not depend on it."""
    model = StandIn(3, 4).eval()
    torch.manual_seed(123)
    expected = torch.randn(1)
    results = []
    for start in (123, 7):
        torch.manual_seed(start)
        scores, _ = score_model(model, dataset, batch_size=64, density_epochs=2, progress=False)
        if start == 123:
            assert torch.equal(torch.randn(1), expected)
        results.append(scores)
    for a, b in zip(*results):
        assert torch.equal(a, b)
