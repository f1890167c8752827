"""DMILModel against the plain-PyTorch reference model (dmil_fast.reference.model) and the
official layout: outputs of every stage, state_dict names, freezing, pooling."""

import pytest
import torch
from torch import nn

import dmil_fast as dm
from dmil_fast.nn import STAGE1_MODULES
from dmil_fast.reference.model import ReferenceDMILModel
from dmil_fast.train import DMILConfig, dmil_loss

E, C, D, B = 6, 4, 5, 7

# The official model's parameters, written out from its published structure: name -> shape.
_HEAD = lambda din: {"fc.weight": (2 * E, din), "fc.bias": (2 * E,)}  # noqa: E731
_LIN = lambda din, dout: {"weight": (dout, din), "bias": (dout,)}  # noqa: E731
_MLP = {"0.weight": (E // 2, 2 * E), "0.bias": (E // 2,), "2.weight": (E, E // 2), "2.bias": (E,)}
OFFICIAL_SHAPES = {}
for _name, _sub in [("embed_v", _LIN(D, E)), ("embed_a", _LIN(D, E)), ("clf_audio_fc", _LIN(E, C)),
                    ("clf_visual_fc", _LIN(E, C)), ("clf_joint_fc", _LIN(2 * E, C)),
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


def _pair(backend=None, seed=0):
    torch.manual_seed(seed)
    ref = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend=backend)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def _flat(value):
    if isinstance(value, tuple):
        return torch.cat([v.reshape(-1) for v in value])
    return value


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)


def test_state_dict_names_and_shapes_are_the_official_ones():
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == OFFICIAL_SHAPES


def test_state_dict_round_trips_strict_both_ways():
    model, ref = _pair()
    torch.manual_seed(3)
    other = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    model.load_state_dict(other.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)
    for k, v in other.state_dict().items():
        assert torch.equal(ref.state_dict()[k], v)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_eval_outputs_match_reference(stage):
    model, ref = _pair()
    model.configure_stage(stage)
    ref.configure_stage(stage)
    model.eval()
    ref.eval()
    x1, x2 = _inputs()
    out, expected = model(x1, x2), ref(x1, x2)
    assert set(out) == set(expected)
    for key in expected:
        torch.testing.assert_close(_flat(out[key]), _flat(expected[key]), rtol=1e-5, atol=1e-5, msg=key)
        if isinstance(expected[key], tuple):
            assert [t.shape for t in out[key]] == [t.shape for t in expected[key]]
        else:
            assert out[key].shape == expected[key].shape


@pytest.mark.parametrize("stage,modality", [(1, "both"), (1, "visual"), (1, "audio"), (2, "both"), (3, "both")])
def test_train_mode_reference_backend_reproduces_reference_draw_for_draw(stage, modality):
    model, ref = _pair(backend="reference")
    for m in (model, ref):
        m.train()
        m.configure_stage(stage)
    x1, x2 = _inputs()
    torch.manual_seed(11)
    out = model(x1, x2, modality)
    torch.manual_seed(11)
    expected = ref(x1, x2, modality)
    assert set(out) == set(expected)
    for key in expected:
        assert torch.equal(_flat(out[key]), _flat(expected[key])), key
    # sampling happened: a second draw differs
    assert not torch.equal(model(x1, x2, modality)["out"], out["out"])


def _quiet_noise(*models):
    """Log-variances of -60 in every sampled head: samples equal the means to ~1e-13, so train
    mode is deterministic. (IB_m*_r heads are only read through their mean and log-variance.)"""
    for m in models:
        for name, module in m.named_modules():
            if name.startswith("IB_") and "." not in name and name not in ("IB_m1_r", "IB_m2_r"):
                with torch.no_grad():
                    module.fc.bias[E:] = -60.0
                    module.fc.weight[E:] = 0.0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fused_train_mode_matches_reference_without_noise(stage):
    model, ref = _pair()
    _quiet_noise(model, ref)
    for m in (model, ref):
        m.train()
        m.configure_stage(stage)
    x1, x2 = _inputs()
    out, expected = model(x1, x2), ref(x1, x2)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    cfg = DMILConfig()
    loss, _ = dmil_loss(out, y, stage=stage, config=cfg)
    loss_ref, _ = dmil_loss(expected, y, stage=stage, config=cfg)
    for key in expected:
        torch.testing.assert_close(_flat(out[key]), _flat(expected[key]), rtol=1e-5, atol=1e-5, msg=key)
    loss.backward()
    loss_ref.backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        q = grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_same_seed_gives_same_initialisation_as_reference():
    torch.manual_seed(5)
    ref = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    torch.manual_seed(5)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


class _BNEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_stage2_freezes_stage1_modules_and_train_keeps_them_in_eval():
    model = dm.DMILModel(_BNEncoder(), _BNEncoder(), embed_size=E, num_class=C, input_size=D)
    model.configure_stage(2)
    model.train()
    frozen = {name for name in STAGE1_MODULES}
    for name, module in model.named_children():
        params = list(module.parameters())
        if name in frozen:
            assert all(not p.requires_grad for p in params), name
            assert not module.training and all(not m.training for m in module.modules()), name
        else:
            assert all(p.requires_grad for p in params), name
            assert module.training, name
    running = model.visual_net.bn.running_mean.clone()
    x1, x2 = _inputs()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loss, _ = dmil_loss(model(x1, x2), y, stage=2, config=DMILConfig())
    loss.backward()
    assert torch.equal(model.visual_net.bn.running_mean, running)  # BatchNorm statistics untouched
    trained = {"IB_redundancy", "IB_m1_r", "IB_m2_r", "IB_m1_unique", "IB_m2_unique", "cross_modality",
               "recon_tr_1", "recon_tr_2", "red_fc", "unique1_fc", "unique2_fc", "synergy_fc", "gating_network"}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        assert (p.grad is not None) == (top in trained), name
    # leaving stage 2 makes them trainable and training again
    model.configure_stage(3)
    assert all(p.requires_grad for p in model.parameters())
    assert model.visual_net.training and model.IB_m1_tr.training


@pytest.mark.parametrize("stage,trained", [
    (1, {"visual_net", "audio_net", "embed_v", "embed_a", "IB_m1_tr", "IB_m1_ir", "IB_m2_tr", "IB_m2_ir",
         "recon_1", "recon_2", "tr1_fc", "tr2_fc"}),
    (3, None),  # everything but the unused clf_* layers
])
def test_gradients_reach_exactly_the_stage_modules(stage, trained):
    model = dm.DMILModel(nn.Linear(D, D), nn.Linear(D, D), embed_size=E, num_class=C, input_size=D)
    model.configure_stage(stage)
    model.train()
    x1, x2 = _inputs()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loss, _ = dmil_loss(model(x1, x2), y, stage=stage, config=DMILConfig())
    loss.backward()
    unused = {"clf_audio_fc", "clf_visual_fc", "clf_joint_fc"}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        expect = top in trained if trained is not None else top not in unused
        assert (p.grad is not None) == expect, name


def test_four_d_encoder_maps_are_averaged_over_time_and_space():
    T, H, W = 3, 2, 4

    class Maps(nn.Module):  # (B, D) -> (B*T, D, H, W), frame t of sample b at row b*T + t
        def forward(self, x):
            b = x.shape[0]
            t = torch.arange(T * H * W, dtype=x.dtype).reshape(1, T, 1, H, W)
            maps = x.reshape(b, 1, D, 1, 1) * (1 + t)  # (B, T, D, H, W)
            return maps.reshape(b * T, D, H, W)

    model = dm.DMILModel(Maps(), Maps(), embed_size=E, num_class=C, input_size=D)
    x1, x2 = _inputs()
    e1, e2 = model.embed(x1, x2)
    factor = sum(1 + k for k in range(T * H * W)) / (T * H * W)  # mean of (1 + t) over T, H, W
    torch.testing.assert_close(e1, model.embed_v(x1 * factor))
    torch.testing.assert_close(e2, model.embed_a(x2 * factor))
    flat = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    with pytest.raises(ValueError, match="video_model"):
        flat.embed(torch.randn(2, 3, D), x2[:2])  # 3-D output: neither (B, D) nor (B*T, C, H, W)


def test_interaction_outputs_are_eval_semantics_and_restore_modes():
    model, ref = _pair()
    model.configure_stage(3)
    ref.configure_stage(3)
    model.train()
    x1, x2 = _inputs()
    out = model.interaction_outputs(x1, x2)
    assert model.training and model.IB_m1_tr.training
    ref.eval()
    expected = ref(x1, x2)
    torch.testing.assert_close(out["logits_12"], expected["out"])
    torch.testing.assert_close(out["logits_1"], ref.tr1_fc(ref.IB_m1_tr(ref.embed_v(x1))[0]))
    torch.testing.assert_close(out["logits_2"], ref.tr2_fc(ref.IB_m2_tr(ref.embed_a(x2))[0]))
    torch.testing.assert_close(out["embed_1"], ref.embed_v(x1))
    assert out["embed_2"].shape == (B, E)


def test_constructor_and_forward_validate_arguments():
    with pytest.raises(ValueError, match="stage"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=4)
    with pytest.raises(ValueError, match="backend"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="gpu")
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    x1, x2 = _inputs()
    with pytest.raises(ValueError, match="train_modality"):
        model(x1, x2, "text")
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(B, D + 1), x2)


def test_triton_backend_matches_reference_in_stage3_train_mode():
    """The fused Triton path (the CPU interpreter here, TRITON_INTERPRET=1 from conftest)."""
    model, ref = _pair(backend="triton")
    _quiet_noise(model, ref)
    for m in (model, ref):
        m.train()
        m.configure_stage(3)
    x1, x2 = _inputs()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    out, expected = model(x1, x2), ref(x1, x2)
    for key in expected:
        torch.testing.assert_close(_flat(out[key]), _flat(expected[key]), rtol=1e-5, atol=1e-5, msg=key)
    dmil_loss(out, y, stage=3, config=DMILConfig())[0].backward()
    dmil_loss(expected, y, stage=3, config=DMILConfig())[0].backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
