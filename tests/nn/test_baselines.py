"""Baselines and the feature encoder."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmil_fast.nn import EnsembleModel, JointModel, MLPEncoder


def _x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)


def test_ensemble_averages_the_unimodal_probabilities():
    model = EnsembleModel(None, None, embed_size=6, num_class=3, input_size=8).eval()
    x1, x2 = _x()
    out = model(x1, x2)
    p = (F.softmax(out["v_out"], dim=1) + F.softmax(out["a_out"], dim=1)) / 2
    torch.testing.assert_close(out["out"], p.log())
    torch.testing.assert_close(out["v_out"], model.clf_visual_fc(model.embed_v(x1)))
    io = model.interaction_outputs(x1, x2)
    torch.testing.assert_close(io["logits_12"], p.log())
    torch.testing.assert_close(io["embed_2"], model.embed_a(x2))


def test_joint_classifies_the_concatenation_and_probes_do_not_train_the_embeddings():
    model = JointModel(None, None, embed_size=6, num_class=3, input_size=8, fusion_hidden=4)
    x1, x2 = _x()
    out = model(x1, x2)
    e = torch.cat((model.embed_v(x1), model.embed_a(x2)), dim=1)
    torch.testing.assert_close(out["out"], model.fusion[2](torch.relu(model.fusion[0](e))))
    F.cross_entropy(out["v_out"], torch.tensor([0, 1, 2, 0, 1])).backward()
    assert model.embed_v.weight.grad is None and model.probe_v.weight.grad is not None
    linear = JointModel(None, None, embed_size=6, num_class=3, input_size=8, fusion_hidden=0)
    assert isinstance(linear.fusion, torch.nn.Linear)


def test_interaction_outputs_restore_train_mode():
    model = JointModel(MLPEncoder(8, hidden=4, depth=2, out_dim=8, dropout=0.5), None, embed_size=6,
                       num_class=3, input_size=8).train()
    x1, x2 = _x()
    a, b = model.interaction_outputs(x1, x2), model.interaction_outputs(x1, x2)
    torch.testing.assert_close(a["logits_12"], b["logits_12"])  # eval: dropout off, deterministic
    assert model.training and model.visual_net.training


def test_mlp_encoder_shapes_and_depth():
    enc = MLPEncoder(8, hidden=16, depth=3, out_dim=5)
    linears = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 5)]
    y = enc(torch.randn(4, 8))
    assert y.shape == (4, 5) and (y >= 0).all()
    assert len([m for m in MLPEncoder(8, depth=1, out_dim=5).modules() if isinstance(m, torch.nn.Linear)]) == 1
    with pytest.raises(ValueError, match="depth"):
        MLPEncoder(8, depth=0)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        enc(torch.randn(4, 7))
    assert math.isclose(MLPEncoder(8, dropout=0.25).dropout, 0.25)


@pytest.mark.parametrize("cls, head_1, head_2", [(JointModel, "probe_v", "probe_a"),
                                                  (EnsembleModel, "clf_visual_fc", "clf_audio_fc")])
def test_interaction_outputs_keep_each_modality_in_its_slot(cls, head_1, head_2):
    model = cls(None, None, embed_size=6, num_class=3, input_size=8).eval()
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    io = model.interaction_outputs(x1, x2)
    e1, e2 = model.embed_v(x1), model.embed_a(x2)
    torch.testing.assert_close(io["embed_1"], e1)
    torch.testing.assert_close(io["embed_2"], e2)
    torch.testing.assert_close(io["logits_1"], getattr(model, head_1)(e1))
    torch.testing.assert_close(io["logits_2"], getattr(model, head_2)(e2))


def test_joint_fusion_hidden_defaults_to_the_embedding_width():
    model = JointModel(None, None, embed_size=6, num_class=3, input_size=8)
    assert (model.fusion[0].in_features, model.fusion[0].out_features) == (12, 6)


def test_encoder_dropout_sits_between_layers_only():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    one = MLPEncoder(8, depth=1, out_dim=5, dropout=0.5).train()
    torch.testing.assert_close(one(x), one.eval()(x))  # one layer: nothing in between
    two = MLPEncoder(8, hidden=16, depth=2, out_dim=5, dropout=0.5)
    assert [type(m).__name__ for m in two.net] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]
