"""dmil_loss and baseline_loss against totals computed by hand from chosen numbers."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmil_fast.train import DMILConfig, baseline_loss, dmil_loss

LN2, LN4, LN6 = math.log(2), math.log(4), math.log(6)
L3 = math.log(3)
LABELS = torch.tensor([0, 1])
# Cross-entropies of these logits by hand: OUT ln 4; V ln 2 (p = 3/6 on both rows);
# A (ln 6 + ln 4) / 2 (p = 1/6 on row 0, 1/4 on row 1).
OUT = torch.zeros(2, 4)
V = torch.tensor([[L3, 0.0, 0.0, 0.0], [0.0, L3, 0.0, 0.0]])
A = torch.tensor([[0.0, L3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
CE_OUT, CE_V, CE_A = LN4, LN2, (LN6 + LN4) / 2


def _at_labels(k0, k1):
    """Logits with ln k at the label of each row (zeros elsewhere), and their CE by hand:
    p = k / (k + 3) on a row of four classes."""
    logits = torch.zeros(2, 4)
    logits[0, 0], logits[1, 1] = math.log(k0), math.log(k1)
    return logits, (math.log((k0 + 3) / k0) + math.log((k1 + 3) / k1)) / 2


# The four parts' logits: each its own CE, none equal to another's or to OUT's, V's or A's.
(SYN, CE_SYN), (RED, CE_RED), (UNI_1, CE_UNI_1), (UNI_2, CE_UNI_2) = (
    _at_labels(2, 5), _at_labels(7, 1), _at_labels(4, 9), _at_labels(1, 6))


def _t(x):
    return torch.tensor([x])


def _outputs(stage, kl_scale=1.0):
    """The model's outputs of ``stage``; ``kl_scale`` multiplies every KL (0.1: an older official
    model, which scaled them inside)."""
    out = {"out": OUT, "v_out": V, "a_out": A}
    if stage in (1, 3):
        out.update(loss_IB=(_t(0.3 * kl_scale), _t(0.5 * kl_scale)), loss_rec_input=(_t(2.0), _t(4.0)))
    if stage in (2, 3):
        out.update(out_synergy=SYN, out_red=RED, out_unique=(UNI_1, UNI_2), loss_red=_t(0.7 * kl_scale),
                   loss_inter=(_t(0.1 * kl_scale), _t(0.2 * kl_scale)),
                   loss_uni=(_t(0.3 * kl_scale), _t(0.4 * kl_scale)), loss_rec_tr=(_t(1.0), _t(3.0)))
    return out


COMPONENTS = CE_SYN + CE_RED + CE_UNI_1 + CE_UNI_2
# The published configuration of the current official revision: lambda 0.02, reconstruction weights
# 1.0 / 5.0 (stage 1), 2.5 (stage 2), 3.0 and 1.0 (stage 3); the KL outputs above are unweighted.
EXPECTED_PUBLISHED = {
    1: (CE_V + CE_A) + 0.02 * (0.4 * 0.3 + 2.0 * 0.5 + 0.1 * 1.0 * 2.0 + 0.1 * 5.0 * 4.0),
    2: CE_OUT + 0.02 * (1.0 * 0.7 + 1.0 * (0.1 + 0.2) + 1.0 * (0.3 + 0.4) + 0.1 * 2.5 * (1.0 + 3.0)) + 0.5 * COMPONENTS,
    3: (CE_OUT + 0.5 * (CE_V + CE_A) + 0.02 * 1.0 * (0.3 + 0.5) + 0.05 * 0.02 * 3.0 * (2.0 + 4.0)
        + 0.02 * (0.4 * 0.7 + 0.4 * (0.1 + 0.2) + 0.4 * (0.3 + 0.4) + 0.05 * 1.0 * (1.0 + 3.0)) + 0.8 * COMPONENTS),
}
# An older official revision: the model scaled every KL by 0.1, lambda 0.2 and the reconstruction
# weights a tenth of the current ones.
OLD_REVISION = dict(lamb=0.2, stage1_visual_beta_rec=0.1, stage1_audio_beta_rec=0.5, stage2_beta_rec_tr=0.25,
                    stage3_beta_rec_stage1=0.3, stage3_beta_rec_tr=0.1)


@pytest.mark.parametrize("ce", [None, F.cross_entropy], ids=["default_ce", "f_cross_entropy"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_published_weights(stage, ce):
    kwargs = {} if ce is None else {"cross_entropy": ce}
    total, parts = dmil_loss(_outputs(stage), LABELS, stage=stage, config=DMILConfig(), **kwargs)
    assert total.shape == ()
    assert math.isclose(total.item(), EXPECTED_PUBLISHED[stage], rel_tol=1e-6)
    assert math.isclose(parts["ce_out"].item(), CE_OUT, rel_tol=1e-6)
    if stage != 2:
        assert math.isclose(parts["ce_a"].item(), CE_A, rel_tol=1e-6)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_an_old_revisions_configuration_on_its_scaled_kls_is_the_published_objective(stage):
    total, _ = dmil_loss(_outputs(stage, kl_scale=0.1), LABELS, stage=stage, config=DMILConfig(**OLD_REVISION))
    assert math.isclose(total.item(), EXPECTED_PUBLISHED[stage], rel_tol=1e-6)


def test_weights_come_from_the_config():
    cfg = DMILConfig(lamb=1.0, beta_cls=2.0, stage1_visual_beta_kl=1.0, stage1_audio_beta_kl=0.0,
                     stage1_visual_beta_rec=10.0, stage1_audio_beta_rec=0.0)
    total, _ = dmil_loss(_outputs(1), LABELS, stage=1, config=cfg)
    expected = 2.0 * (CE_V + CE_A) + 1.0 * (1.0 * 0.3 + 0.1 * 10.0 * 2.0)
    assert math.isclose(total.item(), expected, rel_tol=1e-6)


def test_stage2_and_stage3_weights_come_from_the_config():
    """Every beta of stages 2 and 3 its own value, so a weight on the wrong term changes the total."""
    cfg = DMILConfig(lamb=0.5, beta_cls=3.0, stage2_beta_red=2.0, stage2_beta_inter=5.0, stage2_beta_uni=7.0,
                     stage2_beta_rec_tr=11.0, stage3_beta_cls_stage1=13.0, stage3_beta_kl_stage1=17.0,
                     stage3_beta_rec_stage1=19.0, stage3_beta_red=23.0, stage3_beta_inter=29.0,
                     stage3_beta_uni=31.0, stage3_beta_rec_tr=37.0)
    total_2, _ = dmil_loss(_outputs(2), LABELS, stage=2, config=cfg)
    expected_2 = (3.0 * CE_OUT + 0.5 * (2.0 * 0.7 + 5.0 * (0.1 + 0.2) + 7.0 * (0.3 + 0.4) + 0.1 * 11.0 * (1.0 + 3.0))
                  + 0.5 * COMPONENTS)
    assert math.isclose(total_2.item(), expected_2, rel_tol=1e-6)
    total_3, _ = dmil_loss(_outputs(3), LABELS, stage=3, config=cfg)
    expected_3 = (3.0 * CE_OUT + 13.0 * (CE_V + CE_A) + 0.5 * 17.0 * (0.3 + 0.5) + 0.05 * 0.5 * 19.0 * (2.0 + 4.0)
                  + 0.5 * (23.0 * 0.7 + 29.0 * (0.1 + 0.2) + 31.0 * (0.3 + 0.4) + 0.05 * 37.0 * (1.0 + 3.0))
                  + 0.8 * COMPONENTS)
    assert math.isclose(total_3.item(), expected_3, rel_tol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_each_parts_cross_entropy_is_its_own_logits(stage):
    _, parts = dmil_loss(_outputs(stage), LABELS, stage=stage, config=DMILConfig())
    for key, want in (("ce_out", CE_OUT), ("ce_synergy", CE_SYN), ("ce_red", CE_RED),
                      ("ce_unique_1", CE_UNI_1), ("ce_unique_2", CE_UNI_2)):
        assert math.isclose(parts[key].item(), want, rel_tol=1e-6), key


def test_baseline_losses():
    out = {"out": OUT, "v_out": V, "a_out": A}
    joint, _ = baseline_loss(out, LABELS, method="joint")
    ensemble, _ = baseline_loss(out, LABELS, method="ensemble")
    assert math.isclose(joint.item(), CE_OUT + CE_V + CE_A, rel_tol=1e-6)
    assert math.isclose(ensemble.item(), CE_V + CE_A, rel_tol=1e-6)


def test_bad_stage_or_missing_output():
    with pytest.raises(ValueError, match="stage"):
        dmil_loss(_outputs(1), LABELS, stage=4, config=DMILConfig())
    with pytest.raises(KeyError, match="loss_inter"):
        dmil_loss({k: v for k, v in _outputs(2).items() if k != "loss_inter"}, LABELS, stage=2, config=DMILConfig())
    stage1 = {k: _outputs(1)[k] for k in ("out", "v_out", "a_out", "loss_IB", "loss_rec_input")}
    with pytest.raises(KeyError, match=r"'loss_red', 'loss_inter'.*stage-2 objective.*configure_stage\(2\)"):
        dmil_loss(stage1, LABELS, stage=2, config=DMILConfig())  # a stage-1 model's outputs
    with pytest.raises(TypeError, match=r"labels must be int64 \(or uint8\) class indices.*got torch.int32; "
                                        r"convert them with labels.long\(\)"):
        dmil_loss(_outputs(1), LABELS.int(), stage=1, config=DMILConfig())
    with pytest.raises(ValueError, match="class-probability labels must have the shape of outputs"):
        dmil_loss(_outputs(1), LABELS.float(), stage=1, config=DMILConfig())
    with pytest.raises(ValueError, match=rf"labels must have shape \({LABELS.shape[0]},\)"):
        dmil_loss(_outputs(1), LABELS[:-1], stage=1, config=DMILConfig())
    with pytest.raises(KeyError, match="'v_out'.*the joint objective"):
        baseline_loss({"out": OUT, "a_out": A}, LABELS, method="joint")
    with pytest.raises(TypeError, match="config must be a DMILConfig.*got NoneType"):
        dmil_loss(_outputs(1), LABELS, stage=1, config=None)
    num_classes = OUT.shape[1]
    for labels in (LABELS + num_classes, LABELS - num_classes):  # out of range above and below
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, C\) = \[0, {num_classes}\)"):
            dmil_loss(_outputs(1), labels, stage=1, config=DMILConfig())
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, C\) = \[0, {num_classes}\)"):
            baseline_loss({"out": OUT, "v_out": OUT, "a_out": A}, labels, method="joint")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the label range on a GPU: needs a GPU")
def test_label_range_on_a_gpu_is_read_under_anomaly_detection():
    """Under torch.autograd.detect_anomaly() a bad label on a GPU is a ValueError before
    F.cross_entropy's device assert (which would leave the CUDA context unusable)."""
    outputs = {k: (tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda())
               for k, v in _outputs(1).items()}
    bad = (LABELS + OUT.shape[1]).cuda()
    with torch.autograd.detect_anomaly():
        with pytest.raises(ValueError, match=r"labels must lie in \[0, C\)"):
            dmil_loss(outputs, bad, stage=1, config=DMILConfig())
    loss, _ = dmil_loss(outputs, LABELS.cuda(), stage=1, config=DMILConfig())  # good labels: no sync needed
    assert torch.isfinite(loss)


@pytest.mark.parametrize("stage", [2, 3])
def test_default_cross_entropy_gives_f_cross_entropys_loss_and_gradients_bit_for_bit(stage):
    """The default sends the parts' logits to lean_cross_entropy; on a model's own outputs the
    total and every parameter gradient equal those with F.cross_entropy for every term."""
    from dmil_fast.nn import DMILModel

    torch.manual_seed(0)
    model = DMILModel(None, None, embed_size=6, num_class=5, input_size=4).train()
    model.configure_stage(stage)
    g = torch.Generator().manual_seed(1)
    x1, x2, y = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g), torch.randint(0, 5, (9,), generator=g)
    outputs = model(x1, x2)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for kwargs in ({}, {"cross_entropy": F.cross_entropy}):
        total, _ = dmil_loss(outputs, y, stage=stage, config=DMILConfig(), **kwargs)
        results.append((total, torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)))
    assert torch.equal(results[0][0], results[1][0])
    for name, ga, gb in zip([n for n, p in model.named_parameters() if p.requires_grad], results[0][1], results[1][1]):
        assert (ga is None) == (gb is None), name
        if ga is not None:
            assert torch.equal(ga, gb), name
    assert any(g is not None and g.abs().max() > 0 for g in results[1][1])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_class_probability_labels_are_passed_to_the_cross_entropy(stage):
    """Soft targets, as F.cross_entropy takes them: each CE term equals F.cross_entropy of its
    logits against the same probabilities."""
    soft = torch.softmax(torch.randn(LABELS.shape[0], OUT.shape[1], generator=torch.Generator().manual_seed(2)), -1)
    _, parts = dmil_loss(_outputs(stage), soft, stage=stage, config=DMILConfig())
    named = {"ce_out": OUT, "ce_v": V, "ce_a": A, "ce_synergy": SYN, "ce_red": RED, "ce_unique_1": UNI_1,
             "ce_unique_2": UNI_2}
    checked = [k for k in named if k in parts]
    assert len(checked) == {1: 3, 2: 5, 3: 7}[stage]
    for key in checked:
        torch.testing.assert_close(parts[key], F.cross_entropy(named[key], soft), msg=key)


def test_joint_baseline_trains_its_fusion_head_and_ensemble_does_not():
    """d total / d logits of each CE term is (softmax - onehot) / B by hand; the joint objective
    passes it to ``out`` (the fusion head), the ensemble gives ``out`` no gradient at all."""
    def onehot_grad(logits):
        return (torch.softmax(logits, 1) - F.one_hot(LABELS, 4).float()) / LABELS.shape[0]

    for method in ("joint", "ensemble"):
        leaves = {k: v.clone().requires_grad_() for k, v in (("out", OUT), ("v_out", V), ("a_out", A))}
        total, parts = baseline_loss(leaves, LABELS, method=method)
        grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))
        for key in ("v_out", "a_out"):
            torch.testing.assert_close(grads[key], onehot_grad(leaves[key]), msg=f"{method} {key}")
        if method == "joint":
            torch.testing.assert_close(grads["out"], onehot_grad(OUT))  # (0.25 - onehot) / 2
        else:
            assert grads["out"] is None
        assert all(not p.requires_grad for p in parts.values())


def test_boolean_labels_are_refused_with_the_objectives_own_error():
    with pytest.raises(TypeError, match=r"labels must be int64 \(or uint8\) class indices.*got torch.bool$"):
        dmil_loss(_outputs(1), LABELS.bool(), stage=1, config=DMILConfig())
    with pytest.raises(TypeError, match="got torch.bool"):
        baseline_loss({"out": OUT, "v_out": V, "a_out": A}, LABELS.bool(), method="joint")


@pytest.mark.parametrize("missing", ["loss_red", "loss_IB", "out_unique"])
def test_stage3_names_every_missing_output_before_computing(missing):
    """Stage 3 reads the outputs of stages 1 and 2; each missing one is named, with the hint."""
    outputs = {k: v for k, v in _outputs(3).items() if k != missing}
    with pytest.raises(KeyError, match=rf"'{missing}'.*stage-3 objective.*configure_stage\(3\)"):
        dmil_loss(outputs, LABELS, stage=3, config=DMILConfig())
