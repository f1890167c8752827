"""DMILModel against the plain-PyTorch reference model (dmil_fast.reference.model) and the
published semantics of the current official revision: outputs of every stage, the order of the
noise draws, unweighted KLs, freezing, pooling. State_dict layout: test_dmil_state_dict.py."""

import pytest
import torch
from torch import nn

import dmil_fast as dm
from dmil_fast.nn import STAGE1_MODULES
from dmil_fast.nn.decomposition import first_level
from dmil_fast.reference import ReferenceDMILModel
from dmil_fast.reference.model import average_pool
from dmil_fast.train import DMILConfig, dmil_loss
from tests.conftest import triton_device

E, C, D, B = 6, 4, 5, 7

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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_env_var_reference_reproduces_reference_draw_for_draw(stage, monkeypatch):
    """DMIL_FAST_BACKEND=reference with backend=None is the same choice as backend="reference":
    the plain path in the official draw order, read at forward time."""
    model, ref = _pair(backend=None)
    monkeypatch.setenv("DMIL_FAST_BACKEND", "reference")
    assert model.check_backend() == "reference"
    for m in (model, ref):
        m.train()
        m.configure_stage(stage)
    x1, x2 = _inputs()
    torch.manual_seed(11)
    out = model(x1, x2)
    torch.manual_seed(11)
    expected = ref(x1, x2)
    assert set(out) == set(expected)
    for key in expected:
        assert torch.equal(_flat(out[key]), _flat(expected[key])), key
    assert not torch.equal(model(x1, x2)["out"], out["out"])  # sampling happened


def _lin(layer, x):
    return x @ layer.weight.T + layer.bias


def _sampled(model, name, x, eps):
    """Head ``name`` on x: mu + exp(logvar / 2) * eps, written out from the published semantics."""
    h = _lin(getattr(model, name).fc, x)  # (B, 2E)
    return h[:, :E] + torch.exp(0.5 * h[:, E:]) * eps


def _expected_draws(model, stage, x1, x2, eps):
    """Outputs that reveal which draw fed which latent, with the official order of the current
    revision, and the number of (B, E) draws one forward makes."""
    e1, e2 = _lin(model.embed_v, x1), _lin(model.embed_a, x2)
    mu = lambda name, x: _lin(getattr(model, name).fc, x)[:, :E]  # noqa: E731
    if stage == 1:  # m1 tr, m1 ir, m2 tr, m2 ir
        z_tr1, z_ir1 = _sampled(model, "IB_m1_tr", e1, eps[0]), _sampled(model, "IB_m1_ir", e1, eps[1])
        z_tr2, z_ir2 = _sampled(model, "IB_m2_tr", e2, eps[2]), _sampled(model, "IB_m2_ir", e2, eps[3])
        rec = ((e2 - model.recon_2(torch.cat((z_tr2, z_ir2), 1))) ** 2).sum() / (B * E)
        return {"v_out": model.tr1_fc(z_tr1), "a_out": model.tr2_fc(z_tr2), "rec_a": rec}, 4
    m1, m2 = mu("IB_m1_tr", e1), mu("IB_m2_tr", e2)
    if stage == 2:  # tr means only; m1 ir, m2 ir; then red, unique 1, unique 2 and 2 discarded draws
        z_ir1, z_ir2 = _sampled(model, "IB_m1_ir", e1, eps[0]), _sampled(model, "IB_m2_ir", e2, eps[1])
        first, v_out, a_out = 2, model.tr1_fc(m1), model.tr2_fc(m2)
    else:  # m1 tr, m2 tr, m1 ir, m2 ir; then the second level
        z_tr1, z_tr2 = _sampled(model, "IB_m1_tr", e1, eps[0]), _sampled(model, "IB_m2_tr", e2, eps[1])
        z_ir1, z_ir2 = _sampled(model, "IB_m1_ir", e1, eps[2]), _sampled(model, "IB_m2_ir", e2, eps[3])
        first, v_out, a_out = 4, model.tr1_fc(z_tr1), model.tr2_fc(z_tr2)
    z_red = _sampled(model, "IB_redundancy", torch.cat((m1, m2), 1), eps[first])
    z_u1 = _sampled(model, "IB_m1_unique", m1, eps[first + 1])
    z_u2 = _sampled(model, "IB_m2_unique", m2, eps[first + 2])
    z_syn = _lin(model.cross_modality.fc_out, torch.cat((z_ir1, z_ir2, z_ir1 * z_ir2), 1))
    return {"v_out": v_out, "a_out": a_out, "out_red": model.red_fc(z_red), "out_unique_1": model.unique1_fc(z_u1),
            "out_unique_2": model.unique2_fc(z_u2), "out_synergy": model.synergy_fc(z_syn)}, first + 5


@pytest.mark.parametrize("which", ["reference_model", "reference_backend"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_train_mode_draws_follow_the_official_order(stage, which):
    model, ref = _pair(backend="reference")
    m = ref if which == "reference_model" else model
    m.train()
    m.configure_stage(stage)
    x1, x2 = _inputs()
    torch.manual_seed(23)
    eps = [torch.randn(B, E) for _ in range(10)]
    torch.manual_seed(23)
    out = m(x1, x2)
    after = torch.randn(B, E)
    with torch.no_grad():
        expected, n_draws = _expected_draws(m, stage, x1, x2, eps)
    assert torch.equal(after, eps[n_draws])  # exactly n_draws (B, E) draws were made
    got = {"v_out": out["v_out"], "a_out": out["a_out"]}
    if stage == 1:
        got["rec_a"] = out["loss_rec_input"][1].reshape(())
    else:
        got.update(out_red=out["out_red"], out_unique_1=out["out_unique"][0], out_unique_2=out["out_unique"][1],
                   out_synergy=out["out_synergy"])
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _kl_closed_form(mu, logvar, p_mu=0.0, p_logvar=0.0):
    d = logvar - p_logvar
    return 0.5 * torch.mean(-d + torch.exp(d) + (mu - p_mu) ** 2 / torch.exp(torch.as_tensor(p_logvar)) - 1)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_kl_outputs_are_unweighted(backend):
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=3, backend=backend).eval()
    x1, x2 = _inputs()
    out = model(x1, x2)
    with torch.no_grad():
        e1, e2 = _lin(model.embed_v, x1), _lin(model.embed_a, x2)
        heads = {name: _lin(getattr(model, name).fc, x) for name, x in
                 (("IB_m1_tr", e1), ("IB_m1_ir", e1), ("IB_m2_tr", e2), ("IB_m2_ir", e2))}
        kl = {name: _kl_closed_form(h[:, :E], h[:, E:]) for name, h in heads.items()}
        m1, m2 = heads["IB_m1_tr"][:, :E], heads["IB_m2_tr"][:, :E]
        red = _lin(model.IB_redundancy.fc, torch.cat((m1, m2), 1))
        r1 = _lin(model.IB_m1_r.fc, m1)
        u2 = _lin(model.IB_m2_unique.fc, m2)
    expected = {
        "loss_IB_1": kl["IB_m1_tr"] + kl["IB_m1_ir"], "loss_IB_2": kl["IB_m2_tr"] + kl["IB_m2_ir"],
        "loss_red": _kl_closed_form(red[:, :E], red[:, E:]),
        "loss_inter_1": _kl_closed_form(red[:, :E], red[:, E:], r1[:, :E], r1[:, E:]),
        "loss_uni_2": _kl_closed_form(u2[:, :E], u2[:, E:]),
    }
    got = {"loss_IB_1": out["loss_IB"][0], "loss_IB_2": out["loss_IB"][1], "loss_red": out["loss_red"],
           "loss_inter_1": out["loss_inter"][0], "loss_uni_2": out["loss_uni"][1]}
    for key, value in expected.items():
        assert got[key].shape == (1,), key
        torch.testing.assert_close(got[key].reshape(()), value, rtol=1e-5, atol=1e-6, msg=key)


def test_optional_synergy_hidden_layer():
    default = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    assert not hasattr(default.cross_modality, "fc_hidden")
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=3, synergy_hidden=9).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["cross_modality.fc_hidden.weight"] == (9, 3 * E) and shapes["cross_modality.fc_out.weight"] == (E, 9)
    assert set(shapes) - set(default.state_dict()) == {"cross_modality.fc_hidden.weight",
                                                       "cross_modality.fc_hidden.bias"}
    x1, x2 = _inputs()
    out = model(x1, x2)
    with torch.no_grad():
        z1 = _lin(model.IB_m1_ir.fc, _lin(model.embed_v, x1))[:, :E]
        z2 = _lin(model.IB_m2_ir.fc, _lin(model.embed_a, x2))[:, :E]
        h = torch.relu(_lin(model.cross_modality.fc_hidden, torch.cat((z1, z2, z1 * z2), 1)))
        expected = _lin(model.synergy_fc, _lin(model.cross_modality.fc_out, h))
    torch.testing.assert_close(out["out_synergy"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="synergy_hidden"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, synergy_hidden=-1)


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


class _BNEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("stages", [(1,), (2,), (3,), (2, 3), (2, 1)])
def test_each_stage_freezes_what_the_reference_model_freezes(stages):
    """Per parameter (requires_grad), against the official model's own list of stage-1 modules,
    after the same sequence of configure_stage calls; per module (training) after one call (leaving
    stage 2, this model puts the modules it froze back into training mode, the official one leaves
    that to the next train())."""
    torch.manual_seed(0)
    ref = ReferenceDMILModel(_BNEncoder(), _BNEncoder(), embed_size=E, num_class=C, input_size=D)
    model = dm.DMILModel(_BNEncoder(), _BNEncoder(), embed_size=E, num_class=C, input_size=D)
    for stage in stages:
        ref.configure_stage(stage)
        model.configure_stage(stage)
    want = {name: p.requires_grad for name, p in ref.named_parameters()}
    got = {name: p.requires_grad for name, p in model.named_parameters()}
    assert got == want
    assert any(want.values()) and (stages[-1] != 2 or not all(want.values()))
    if len(stages) == 1:
        modes = {name: m.training for name, m in ref.named_modules()}
        assert {name: m.training for name, m in model.named_modules() if name in modes} == modes


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
    (3, None),  # everything
])
def test_gradients_reach_exactly_the_stage_modules(stage, trained):
    model = dm.DMILModel(nn.Linear(D, D), nn.Linear(D, D), embed_size=E, num_class=C, input_size=D)
    model.configure_stage(stage)
    model.train()
    x1, x2 = _inputs()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    loss, _ = dmil_loss(model(x1, x2), y, stage=stage, config=DMILConfig())
    loss.backward()
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        expect = top in trained if trained is not None else True
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


def test_check_backend_refuses_before_a_forward_what_the_forward_would_refuse(monkeypatch):
    x1, x2 = _inputs()
    assert dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="reference").check_backend() \
        == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="triton")
    for call in (lambda: model.check_backend("cpu"), lambda: model(x1, x2)):
        with pytest.raises(dm.ops.BackendUnavailableError, match="TRITON_INTERPRET=1 is not set"):
            call()
    monkeypatch.setenv("DMIL_FAST_BACKEND", "cpp")
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    for call in (lambda: model.check_backend(), lambda: model(x1, x2)):
        with pytest.raises(dm.ops.BackendUnavailableError, match="has no C\\+\\+ kernel"):
            call()
    monkeypatch.setenv("DMIL_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert model.check_backend("cpu") == "triton"
    with pytest.raises(dm.ops.BackendUnavailableError, match="bfloat16"):  # the interpreter's bf16 is refused
        model.check_backend("cpu", torch.bfloat16)


def test_check_backend_dtype_defaults_to_the_parameters_dtype(monkeypatch):
    """Triton's interpreter refuses bfloat16: a bfloat16 model's check says so without a dtype
    argument, as a forward would; an explicit dtype still wins."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="triton")
    assert model.check_backend("cpu") == "triton"
    model.to(torch.bfloat16)
    with pytest.raises(dm.ops.BackendUnavailableError, match="bfloat16"):
        model.check_backend("cpu")
    assert model.check_backend("cpu", torch.float32) == "triton"


@pytest.mark.parametrize("stage", [True, False, 2.0, 1.5, "2", None])
def test_stage_must_be_an_int(stage):
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=stage)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        model.configure_stage(stage)
    assert model.stage == 1


def test_stage_accepts_numpy_integers_as_plain_ints():
    np = pytest.importorskip("numpy")
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=np.int64(2))
    assert model.stage == 2 and type(model.stage) is int


def test_constructor_and_forward_validate_arguments():
    with pytest.raises(ValueError, match="stage"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=4)
    with pytest.raises(ValueError, match="backend"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="gpu")
    for backend in ("cpp", "cuda"):  # backends of other ops: the heads' ops have no such kernel
        with pytest.raises(ValueError, match=f"have no {backend} kernel"):
            dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend=backend)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    x1, x2 = _inputs()
    with pytest.raises(ValueError, match="train_modality"):
        model(x1, x2, "text")
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(B, D + 1), x2)


def test_triton_backend_matches_reference_in_stage3_train_mode():
    """The fused Triton path (on the GPU where there is one, else the CPU interpreter)."""
    device = triton_device()
    model, ref = _pair(backend="triton")
    _quiet_noise(model, ref)
    for m in (model, ref):
        m.to(device).train()
        m.configure_stage(3)
    x1, x2 = (x.to(device) for x in _inputs())
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2], device=device)
    out, expected = model(x1, x2), ref(x1, x2)
    for key in expected:
        torch.testing.assert_close(_flat(out[key]), _flat(expected[key]), rtol=1e-5, atol=1e-5, msg=key)
    dmil_loss(out, y, stage=3, config=DMILConfig())[0].backward()
    dmil_loss(expected, y, stage=3, config=DMILConfig())[0].backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_recompute_changes_no_value_and_no_gradient(stage):
    """recompute=True (the default) against recompute=False on the fused Triton path, same weights
    and the same draws: the projections rebuilt in the backward give the same gradients."""
    device = triton_device()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2], device=device)
    results = []
    for recompute in (True, False):
        torch.manual_seed(0)
        model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="triton",
                             recompute=recompute)
        model.to(device).train()
        model.configure_stage(stage)
        x1, x2 = (x.to(device) for x in _inputs())
        torch.manual_seed(5)
        out = model(x1, x2)
        dmil_loss(out, y, stage=stage, config=DMILConfig())[0].backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (out_kept, grads_kept) = results
    for key in out:
        torch.testing.assert_close(_flat(out[key]), _flat(out_kept[key]), rtol=1e-6, atol=1e-6, msg=key)
    assert grads.keys() == grads_kept.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_kept[name], rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_must_be_a_bool():
    with pytest.raises(TypeError, match="recompute must be a bool, got str"):
        dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, recompute="yes")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_float64_model_under_autocast_runs_as_without_it(stage):
    """Autocast leaves float64 alone (as torch's Linear does), so the heads' op keeps float64: the
    recompute decision must ask about float64 too, not the autocast dtype (which the Triton backend
    may not run here), and the outputs equal those outside autocast."""
    device = triton_device()
    torch.manual_seed(0)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend="triton")
    model.to(device, torch.float64).train()
    model.configure_stage(stage)
    x1, x2 = (x.to(device, torch.float64) for x in _inputs())
    torch.manual_seed(5)
    plain = model(x1, x2)
    torch.manual_seed(5)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        cast = model(x1, x2)
    for key in plain:
        assert _flat(cast[key]).dtype == torch.float64, key
        assert torch.equal(_flat(cast[key]), _flat(plain[key])), key


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_fused_model_trains_as_the_eager_one(stage):
    """torch.compile (aot_eager: eager's kernels) through the parts path's and the lean CE's
    autograd Functions: the same loss and gradients as eager."""
    model, ref = _pair()
    _quiet_noise(model, ref)
    model.train()
    model.configure_stage(stage)
    x1, x2 = _inputs()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for forward in (model, torch.compile(model, backend="aot_eager")):
        loss, _ = dmil_loss(forward(x1, x2), y, stage=stage, config=DMILConfig())
        results.append((loss, torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _FrameMaps(nn.Module):
    """(B, D) -> (B*T, D, H, W): frame t of sample b at row b*T + t, equal to x_b * (1 + k) at
    position k of the (T, H, W) grid, so that the mean over (T, H, W) is x_b * FRAME_FACTOR."""

    T, H, W = 3, 2, 4

    def forward(self, x):
        b = x.shape[0]
        k = torch.arange(self.T * self.H * self.W, dtype=x.dtype).reshape(1, self.T, 1, self.H, self.W)
        return (x.reshape(b, 1, D, 1, 1) * (1 + k)).reshape(b * self.T, D, self.H, self.W)


FRAME_FACTOR = sum(1 + k for k in range(3 * 2 * 4)) / (3 * 2 * 4)


def test_reference_model_averages_each_samples_own_frames():
    """The oracle's pooling, by hand: sample b's frames are rows [b*T, (b+1)*T) (the official
    normal_reshape), averaged over (T, H, W)."""
    x1, x2 = _inputs()
    torch.testing.assert_close(average_pool(_FrameMaps()(x1), B), x1 * FRAME_FACTOR)
    torch.testing.assert_close(average_pool(x1, B), x1)  # (B, D) passes through
    torch.manual_seed(0)
    maps = ReferenceDMILModel(_FrameMaps(), _FrameMaps(), embed_size=E, num_class=C, input_size=D).eval()
    flat = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D).eval()
    flat.load_state_dict(maps.state_dict(), strict=True)
    with torch.no_grad():
        got, expected = maps(x1, x2), flat(x1 * FRAME_FACTOR, x2 * FRAME_FACTOR)
    for key in ("v_out", "a_out", "out"):
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.parametrize("reference", [False, True])
def test_first_level_ir_only_gives_the_tr_means_even_when_sampling(reference):
    """Stage 2's draw order "ir_only": z_tr (and the first half of z_cat) is the tr head's mean,
    by hand the first E columns of its Linear; only the ir head is sampled."""
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D)
    heads = (model.IB_m1_tr, model.IB_m1_ir)
    x = torch.randn(B, E)
    with torch.no_grad():
        (pair,) = first_level([(x, heads)], sample=True, reference=reference, draw="ir_only")
        mu_tr, mu_ir = _lin(heads[0].fc, x)[:, :E], _lin(heads[1].fc, x)[:, :E]
    torch.testing.assert_close(pair.z_tr, mu_tr)
    torch.testing.assert_close(pair.z_cat[:, :E], mu_tr)
    torch.testing.assert_close(pair.z_cat[:, E:], pair.z_ir)
    assert not torch.allclose(pair.z_ir, mu_ir)  # the ir head was sampled


# The official model's stage-1 modules (its configure_stage freezes exactly these in stage 2),
# written out here rather than taken from dmil_fast.nn.STAGE1_MODULES.
OFFICIAL_STAGE1 = {"visual_net", "audio_net", "embed_v", "embed_a", "IB_m1_tr", "IB_m1_ir", "IB_m2_tr",
                   "IB_m2_ir", "recon_1", "recon_2", "tr1_fc", "tr2_fc"}


class _Linear(nn.Module):  # an encoder with parameters, so that its freezing shows
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x)


def test_reference_model_freezes_exactly_the_official_stage1_modules_in_stage2():
    ref = ReferenceDMILModel(_Linear(), _Linear(), embed_size=E, num_class=C, input_size=D).train()
    ref.configure_stage(2)
    for name, module in ref.named_children():
        params = list(module.parameters())
        assert params, name
        frozen = name in OFFICIAL_STAGE1
        assert all(p.requires_grad is not frozen for p in params), name
        assert module.training is not frozen, name
    ref.configure_stage(3)
    assert all(p.requires_grad for p in ref.parameters())


def test_reference_model_fuses_the_four_parts_with_the_gate_in_the_official_order():
    """Stage-3 eval forward of the oracle, by hand: means everywhere, the gate on [u1, u2, r, s],
    out = g0 * unique1_fc(u1) + g1 * unique2_fc(u2) + g2 * red_fc(r) + g3 * synergy_fc(s)."""
    torch.manual_seed(0)
    ref = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D, stage=3).eval()
    x1, x2 = _inputs()
    with torch.no_grad():
        out = ref(x1, x2)
        mean = lambda head, x: _lin(getattr(ref, head).fc, x)[:, :E]  # noqa: E731
        e1, e2 = _lin(ref.embed_v, x1), _lin(ref.embed_a, x2)
        m1, m2 = mean("IB_m1_tr", e1), mean("IB_m2_tr", e2)
        ir1, ir2 = mean("IB_m1_ir", e1), mean("IB_m2_ir", e2)
        r, u1, u2 = mean("IB_redundancy", torch.cat((m1, m2), 1)), mean("IB_m1_unique", m1), mean("IB_m2_unique", m2)
        s = _lin(ref.cross_modality.fc_out, torch.cat((ir1, ir2, ir1 * ir2), 1))
        gate = ref.gating_network
        g = torch.softmax(_lin(gate[2], torch.relu(_lin(gate[0], torch.cat((u1, u2, r, s), 1)))), 1)
        fused = (g[:, 0:1] * _lin(ref.unique1_fc, u1) + g[:, 1:2] * _lin(ref.unique2_fc, u2)
                 + g[:, 2:3] * _lin(ref.red_fc, r) + g[:, 3:4] * _lin(ref.synergy_fc, s))
    torch.testing.assert_close(out["gate_weights"], g)
    torch.testing.assert_close(out["out"], fused)
    assert not torch.allclose(g[:, 0], g[:, 1])  # the gate tells u1 from u2 here
