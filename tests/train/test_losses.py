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


def _t(x):
    return torch.tensor([x])


def _outputs(stage):
    out = {"out": OUT, "v_out": V, "a_out": A}
    if stage in (1, 3):
        out.update(loss_IB=(_t(0.3), _t(0.5)), loss_rec_input=(_t(2.0), _t(4.0)))
    if stage in (2, 3):
        out.update(out_synergy=OUT, out_red=V, out_unique=(A, OUT), loss_red=_t(0.7),
                   loss_inter=(_t(0.1), _t(0.2)), loss_uni=(_t(0.3), _t(0.4)), loss_rec_tr=(_t(1.0), _t(3.0)))
    return out


COMPONENTS = CE_OUT + CE_V + CE_A + CE_OUT  # synergy, red, unique_1, unique_2
# The published configuration of the current official revision: lambda 0.02, reconstruction weights
# 1.0 / 5.0 (stage 1), 2.5 (stage 2), 3.0 and 1.0 (stage 3); the KL outputs above are unweighted.
EXPECTED_PUBLISHED = {
    1: (CE_V + CE_A) + 0.02 * (0.4 * 0.3 + 2.0 * 0.5 + 0.1 * 1.0 * 2.0 + 0.1 * 5.0 * 4.0),
    2: CE_OUT + 0.02 * (1.0 * 0.7 + 1.0 * (0.1 + 0.2) + 1.0 * (0.3 + 0.4) + 0.1 * 2.5 * (1.0 + 3.0)) + 0.5 * COMPONENTS,
    3: (CE_OUT + 0.5 * (CE_V + CE_A) + 0.02 * 1.0 * (0.3 + 0.5) + 0.05 * 0.02 * 3.0 * (2.0 + 4.0)
        + 0.02 * (0.4 * 0.7 + 0.4 * (0.1 + 0.2) + 0.4 * (0.3 + 0.4) + 0.05 * 1.0 * (1.0 + 3.0)) + 0.8 * COMPONENTS),
}
# The older official revision: KL outputs scaled by 0.1 in the model, lambda 0.2, reconstruction
# weights a tenth of the current ones. Written out with this file's numbers it is the same objective.
EXPECTED_OLD_REVISION = {
    1: (CE_V + CE_A) + 0.2 * (0.4 * 0.03 + 2.0 * 0.05 + 0.1 * 0.1 * 2.0 + 0.1 * 0.5 * 4.0),
    2: CE_OUT + 0.2 * (0.07 + (0.01 + 0.02) + (0.03 + 0.04) + 0.1 * 0.25 * (1.0 + 3.0)) + 0.5 * COMPONENTS,
    3: (CE_OUT + 0.5 * (CE_V + CE_A) + 0.2 * 1.0 * (0.03 + 0.05) + 0.05 * 0.2 * 0.3 * (2.0 + 4.0)
        + 0.2 * (0.4 * 0.07 + 0.4 * (0.01 + 0.02) + 0.4 * (0.03 + 0.04) + 0.05 * 0.1 * (1.0 + 3.0)) + 0.8 * COMPONENTS),
}


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
def test_published_objective_equals_the_old_revisions(stage):
    assert math.isclose(EXPECTED_PUBLISHED[stage], EXPECTED_OLD_REVISION[stage], rel_tol=1e-12)


def test_weights_come_from_the_config():
    cfg = DMILConfig(lamb=1.0, beta_cls=2.0, stage1_visual_beta_kl=1.0, stage1_audio_beta_kl=0.0,
                     stage1_visual_beta_rec=10.0, stage1_audio_beta_rec=0.0)
    total, _ = dmil_loss(_outputs(1), LABELS, stage=1, config=cfg)
    expected = 2.0 * (CE_V + CE_A) + 1.0 * (1.0 * 0.3 + 0.1 * 10.0 * 2.0)
    assert math.isclose(total.item(), expected, rel_tol=1e-6)


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
