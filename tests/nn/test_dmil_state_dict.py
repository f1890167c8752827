"""DMILModel's state_dict: the parameter names and shapes of the current official model (written
out independently from its published structure), strict loading both ways, and state_dicts of
older official revisions with their three unused classifiers."""

import pytest
import torch
from torch import nn

import dmil_fast as dm
from dmil_fast.nn import LEGACY_STATE_DICT_KEYS
from dmil_fast.reference import ReferenceDMILModel

E, C, D = 6, 4, 5

# The current official model's parameters, written out from its published structure: name -> shape.
_HEAD = lambda din: {"fc.weight": (2 * E, din), "fc.bias": (2 * E,)}  # noqa: E731
_LIN = lambda din, dout: {"weight": (dout, din), "bias": (dout,)}  # noqa: E731
_MLP = {"0.weight": (E // 2, 2 * E), "0.bias": (E // 2,), "2.weight": (E, E // 2), "2.bias": (E,)}
OFFICIAL_SHAPES = {}
for _name, _sub in [("embed_v", _LIN(D, E)), ("embed_a", _LIN(D, E)),
                    ("IB_m1_tr", _HEAD(E)), ("IB_m1_ir", _HEAD(E)), ("IB_m2_tr", _HEAD(E)), ("IB_m2_ir", _HEAD(E)),
                    ("IB_redundancy", _HEAD(2 * E)), ("IB_m1_r", _HEAD(E)), ("IB_m2_r", _HEAD(E)),
                    ("IB_m1_unique", _HEAD(E)), ("IB_m2_unique", _HEAD(E)),
                    ("cross_modality", {"fc_out.weight": (E, 3 * E), "fc_out.bias": (E,)}),
                    ("recon_1", _MLP), ("recon_2", _MLP), ("recon_tr_1", _MLP), ("recon_tr_2", _MLP),
                    ("tr1_fc", _LIN(E, C)), ("tr2_fc", _LIN(E, C)), ("red_fc", _LIN(E, C)),
                    ("unique1_fc", _LIN(E, C)), ("unique2_fc", _LIN(E, C)), ("synergy_fc", _LIN(E, C)),
                    ("gating_network", {"0.weight": (E, 4 * E), "0.bias": (E,), "2.weight": (4, E), "2.bias": (4,)})]:
    for _k, _shape in _sub.items():
        OFFICIAL_SHAPES[f"{_name}.{_k}"] = _shape
# The three unused classifiers that older official revisions also had.
OLD_REVISION_EXTRA = {"clf_audio_fc.weight": (C, E), "clf_audio_fc.bias": (C,), "clf_visual_fc.weight": (C, E),
                      "clf_visual_fc.bias": (C,), "clf_joint_fc.weight": (C, 2 * E), "clf_joint_fc.bias": (C,)}



def _pair(seed=0):
    torch.manual_seed(seed)
    ref = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def test_state_dict_names_and_shapes_are_the_official_ones():
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == OFFICIAL_SHAPES


def _official_state_dict(shapes, seed=4):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def test_a_state_dict_of_the_official_layout_loads_strict():
    state = _official_state_dict(OFFICIAL_SHAPES)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_old_revision_state_dicts_load_strict_without_their_unused_classifiers():
    assert set(LEGACY_STATE_DICT_KEYS) == set(OLD_REVISION_EXTRA)
    state = _official_state_dict({**OFFICIAL_SHAPES, **OLD_REVISION_EXTRA})
    keys_before = set(state)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model.load_state_dict(state, strict=True)
    assert set(state) == keys_before  # the caller's dict is not modified
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # also under a prefix (the model as a submodule), and nothing but those keys is dropped
    wrapper = nn.Sequential(dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D))
    wrapper.load_state_dict({f"0.{k}": v for k, v in state.items()}, strict=True)
    with pytest.raises(RuntimeError, match="clf_extra_fc"):
        model.load_state_dict(dict(state, **{"clf_extra_fc.weight": torch.zeros(C, E)}), strict=True)
    with pytest.raises(RuntimeError, match="IB_m1_tr.fc.bias"):
        model.load_state_dict({k: v for k, v in state.items() if k != "IB_m1_tr.fc.bias"}, strict=True)


def test_state_dict_round_trips_strict_both_ways():
    model, ref = _pair()
    torch.manual_seed(3)
    other = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model.load_state_dict(other.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)


def test_same_seed_gives_same_initialisation_as_reference():
    torch.manual_seed(5)
    ref = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    torch.manual_seed(5)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
