"""logic_gate against the truth tables; LOGIC_GATE_TRUTH against a closed-form decomposition.

The reference decomposition is computed in the test from each gate's exact joint distribution
(uniform inputs) with the minimum-mutual-information redundancy R = min(I(x1; y), I(x2; y)), which
agrees with the published BROJA values on these gates, and against the published numbers in bits.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from dmil_fast.data import LOGIC_GATE_TRUTH, LOGIC_GATES, logic_gate

TABLES = {
    "and": lambda a, b: a & b,
    "or": lambda a, b: a | b,
    "xor": lambda a, b: a ^ b,
    "copy_x1": lambda a, b: a,
    "copy_both": lambda a, b: a,
}


@pytest.mark.parametrize("name", LOGIC_GATES)
def test_outputs_follow_truth_table(name):
    x1, x2, y = logic_gate(name, 2000, noise=0.05, seed=1)
    assert x1.shape == (2000, 1) and x2.shape == (2000, 1) and y.shape == (2000,)
    assert x1.dtype == x2.dtype == torch.float32 and y.dtype == torch.int64
    b1, b2 = x1.round().long().squeeze(1), x2.round().long().squeeze(1)
    assert set(b1.tolist()) <= {0, 1} and set(b2.tolist()) <= {0, 1}
    for a, b, out in zip(b1.tolist(), b2.tolist(), y.tolist()):
        assert out == TABLES[name](a, b)
    if name == "copy_both":
        assert torch.equal(b1, b2)
    # Uniform over the input combinations (4, or 2 for copy_both): 2000 draws, 4 sigma < 0.05.
    combos = 2 if name == "copy_both" else 4
    freq = np.bincount((2 * b1 + b2).numpy(), minlength=4) / 2000
    assert np.all(np.abs(freq[freq > 0] - 1 / combos) < 0.05) and (freq > 0).sum() == combos


def test_jitter_std_and_determinism():
    x1, x2, _ = logic_gate("xor", 20000, noise=0.1, seed=5)
    for x in (x1, x2):
        assert abs(float((x - x.round()).std()) - 0.1) < 0.005
    again = logic_gate("xor", 20000, noise=0.1, seed=5)
    assert torch.equal(x1, again[0]) and torch.equal(x2, again[1])
    assert not torch.equal(x1, logic_gate("xor", 20000, noise=0.1, seed=6)[0])
    x1, _, _ = logic_gate("and", 50, noise=0.0)
    assert set(x1.squeeze(1).tolist()) <= {0.0, 1.0}


def _entropy(p):
    p = np.asarray([v for v in p if v > 0])
    return float(-(p * np.log(p)).sum())


def _mmi_pid(name):
    """Exact R/U1/U2/S (nats) of a gate with uniform inputs, from its truth table."""
    inputs = [(a, a) for a in (0, 1)] if name == "copy_both" else list(itertools.product((0, 1), repeat=2))
    joint = {}
    for a, b in inputs:
        key = (a, b, TABLES[name](a, b))
        joint[key] = joint.get(key, 0.0) + 1 / len(inputs)

    def marginal(idx):
        out = {}
        for key, p in joint.items():
            k = tuple(key[i] for i in idx)
            out[k] = out.get(k, 0.0) + p
        return out.values()

    h_y = _entropy(marginal([2]))
    i1 = _entropy(marginal([0])) + h_y - _entropy(marginal([0, 2]))
    i2 = _entropy(marginal([1])) + h_y - _entropy(marginal([1, 2]))
    i12 = _entropy(marginal([0, 1])) + h_y - _entropy(joint.values())
    r = min(i1, i2)
    return {"redundancy": r, "unique_1": i1 - r, "unique_2": i2 - r, "synergy": i12 - i1 - i2 + r}


@pytest.mark.parametrize("name", LOGIC_GATES)
def test_truth_matches_closed_form(name):
    assert set(LOGIC_GATE_TRUTH[name]) == {"redundancy", "unique_1", "unique_2", "synergy"}
    for key, value in _mmi_pid(name).items():
        assert LOGIC_GATE_TRUTH[name][key] == pytest.approx(value, abs=1e-12)


def test_truth_matches_published_bits():
    ln2 = math.log(2)
    assert LOGIC_GATE_TRUTH["xor"]["synergy"] / ln2 == pytest.approx(1.0)
    for gate in ("and", "or"):
        assert LOGIC_GATE_TRUTH[gate]["redundancy"] / ln2 == pytest.approx(0.311, abs=5e-4)
        assert LOGIC_GATE_TRUTH[gate]["synergy"] / ln2 == pytest.approx(0.5)
        assert LOGIC_GATE_TRUTH[gate]["redundancy"] == pytest.approx(0.2158, abs=5e-5)
        assert LOGIC_GATE_TRUTH[gate]["synergy"] == pytest.approx(0.3466, abs=5e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="and.*or.*xor.*copy_x1.*copy_both"):
        logic_gate("nand", 10)
    with pytest.raises(ValueError, match="n must be"):
        logic_gate("and", 0)
    with pytest.raises(ValueError, match="noise must be"):
        logic_gate("and", 10, noise=-1.0)


def test_the_two_modalities_jitter_independently():
    x1, x2, _ = logic_gate("xor", 20000, noise=0.1, seed=5)
    residuals = torch.stack([(x1 - x1.round())[:, 0], (x2 - x2.round())[:, 0]])
    assert abs(float(torch.corrcoef(residuals)[0, 1])) < 0.05
