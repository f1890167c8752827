"""DMILModel's copies of the official model's public methods (get_loss and the three
train_stage_* methods on embeddings) against the plain-PyTorch reference model, whose latent()
and _intra / _consistency / _joint are the official get_loss and stage methods."""

import math

import pytest
import torch

import dmil_fast as dm
from dmil_fast.reference import ReferenceDMILModel
from tests.conftest import triton_device

E, C, D, B = 6, 4, 5, 7


def _pair(backend, device="cpu"):
    torch.manual_seed(0)
    ref = ReferenceDMILModel(None, None, embed_size=E, num_class=C, input_size=D).to(device)
    model = dm.DMILModel(None, None, embed_size=E, num_class=C, input_size=D, backend=backend).to(device)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def _embeddings(device="cpu"):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, E, generator=g).to(device), torch.randn(B, E, generator=g).to(device)


def _flat(value):
    return torch.cat([v.reshape(-1) for v in value]) if isinstance(value, tuple) else value


def _stage_calls(model, ref, v, a):
    """(our method, the reference's) per stage, with the train_modality values of stage 1."""
    return {
        (1, "both"): (lambda: model.train_stage_1_vib(v, a), lambda: ref._intra(v, a, "both")),
        (1, "visual"): (lambda: model.train_stage_1_vib(v, a, "visual"), lambda: ref._intra(v, a, "visual")),
        (1, "audio"): (lambda: model.train_stage_1_vib(v, a, train_modality="audio"),
                       lambda: ref._intra(v, a, "audio")),
        (2, "both"): (lambda: model.train_stage_2_decomposition_routing(v, a), lambda: ref._consistency(v, a)),
        (3, "both"): (lambda: model.train_stage_3_joint_finetune(v, a), lambda: ref._joint(v, a)),
    }


@pytest.mark.parametrize("configured", [1, 2, 3])
@pytest.mark.parametrize("stage,modality", [(1, "both"), (1, "visual"), (1, "audio"), (2, "both"), (3, "both")])
def test_stage_methods_reproduce_the_reference_draw_for_draw(stage, modality, configured):
    """Each method runs its own stage whatever stage the model is configured for (as the official
    methods do); in training mode, with the same torch seed, the reference path draws the same noise."""
    model, ref = _pair("reference")
    for m in (model, ref):
        m.configure_stage(configured)
        m.train()
    v, a = _embeddings()
    ours, theirs = _stage_calls(model, ref, v, a)[(stage, modality)]
    torch.manual_seed(5)
    out = ours()
    torch.manual_seed(5)
    expected = theirs()
    assert model.stage == configured
    assert set(out) == set(expected)
    for key in expected:
        assert torch.equal(_flat(out[key]), _flat(expected[key])), key


@pytest.mark.parametrize("stage,modality", [(1, "both"), (2, "both"), (3, "both")])
def test_stage_methods_on_the_fused_path_match_the_reference_in_eval(stage, modality):
    device = triton_device()
    model, ref = _pair("triton", device)
    model.eval()
    ref.eval()
    v, a = _embeddings(device)
    ours, theirs = _stage_calls(model, ref, v, a)[(stage, modality)]
    out, expected = ours(), theirs()
    assert set(out) == set(expected)
    for key in expected:
        torch.testing.assert_close(_flat(out[key]), _flat(expected[key]), rtol=1e-5, atol=1e-5, msg=key)


def test_stage_method_gradients_reach_the_stage_modules():
    model, _ = _pair(None)
    model.configure_stage(3)
    v, a = _embeddings()
    v.requires_grad_(True)
    out = model.train_stage_3_joint_finetune(v, a)
    (out["out"].sum() + out["loss_IB"][0].sum()).backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    assert model.IB_redundancy.fc.weight.grad is not None and model.IB_m1_tr.fc.weight.grad is not None


def _closed_form_kl(q_mean, q_log_var, p_mean, p_log_var):
    d = q_log_var - p_log_var
    return (0.5 * (-d + d.exp() + (q_mean - p_mean) ** 2 * torch.exp(-p_log_var) - 1)).mean()


def test_get_loss_reference_path_is_the_official_helper():
    model, ref = _pair("reference")
    g = torch.Generator().manual_seed(4)
    mean, log_var = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    p_mean, p_log_var = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    model.train()
    torch.manual_seed(9)
    z, kl = model.get_loss(mean, log_var, p_mean, p_log_var)
    torch.manual_seed(9)
    eps = torch.randn_like(mean)
    assert torch.equal(z, mean + torch.exp(log_var / 2) * eps)
    assert kl.shape == (1,)
    torch.testing.assert_close(kl[0], _closed_form_kl(mean, log_var, p_mean, p_log_var))
    ref.train()
    torch.manual_seed(9)
    z_ref, kl_ref = ref.latent(mean, log_var, p_mean, p_log_var)
    assert torch.equal(z, z_ref) and torch.equal(kl, kl_ref)
    model.eval()
    z_eval, kl_eval = model.get_loss(mean, log_var, 0.0, 0.0)
    assert z_eval is mean
    torch.testing.assert_close(kl_eval[0], _closed_form_kl(mean, log_var, torch.zeros(()), torch.zeros(())))


def test_get_loss_fused_path_samples_in_the_kernel():
    device = triton_device()
    model, _ = _pair("triton", device)
    model.train()
    mean = torch.zeros(64, 32, device=device)
    log_var = torch.full((64, 32), math.log(4.0), device=device)  # standard deviation 2
    torch.manual_seed(0)  # the kernel's seed is drawn from torch's generator
    z, kl = model.get_loss(mean, log_var, 0.0, 0.0)
    assert z.shape == mean.shape and kl.shape == (1,)
    # KL(N(0, 4) || N(0, 1)) = 0.5 * (4 - ln 4 - 1) per element
    torch.testing.assert_close(kl[0].cpu(), torch.tensor(0.5 * (3.0 - math.log(4.0))))
    # 2048 draws of N(0, 4): the sample standard deviation within 10 % of 2
    assert 1.8 < float(z.float().std()) < 2.2


@pytest.mark.parametrize("call,error,words", [
    (lambda m, v, a: m.train_stage_1_vib(v[:, :3], a), ValueError, "v must be embeddings of shape (B, E)"),
    (lambda m, v, a: m.train_stage_2_decomposition_routing(v, a[:3]), ValueError, "same batch size"),
    (lambda m, v, a: m.train_stage_3_joint_finetune(v, a.double()), TypeError, "a is torch.float64"),
    (lambda m, v, a: m.train_stage_3_joint_finetune(v.numpy(), a), TypeError, "v must be a torch.Tensor"),
    (lambda m, v, a: m.train_stage_1_vib(v, a, "both_modalities"), ValueError, "train_modality must be one of"),
    (lambda m, v, a: m.train_stage_2_decomposition_routing(v[:0], a[:0]), ValueError, "B >= 1"),
])
def test_bad_embeddings_are_named(call, error, words):
    model, _ = _pair(None)
    v, a = _embeddings()
    with pytest.raises(error) as info:
        call(model, v, a)
    assert words in str(info.value)


def test_get_loss_takes_the_older_revisions_kl_factor():
    model, _ = _pair("reference")
    model.eval()
    g = torch.Generator().manual_seed(6)
    mean, log_var = torch.randn(B, E, generator=g), torch.randn(B, E, generator=g)
    _, kl = model.get_loss(mean, log_var, 0.0, 0.0, lamb=0.1)
    torch.testing.assert_close(kl[0], 0.1 * _closed_form_kl(mean, log_var, torch.zeros(()), torch.zeros(())))
    with pytest.raises(TypeError, match="lamb must be a finite number"):
        model.get_loss(mean, log_var, 0.0, 0.0, lamb="0.1")
    with pytest.raises(TypeError, match="lamb must be a finite number"):
        model.get_loss(mean, log_var, 0.0, 0.0, lamb=float("nan"))
