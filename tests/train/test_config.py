"""DMILConfig: published defaults, YAML loading with official names, presets, scaling."""

import pytest
import torch
from torch import nn

from dmil_fast.train import DMILConfig, build_model
from dmil_fast.train.factory import METHODS

# The settings of the current official cfgs/methods/DMIL.yaml (values only).
OFFICIAL_METHOD_YAML = """\
# @package methods
method_name: DMIL
lamb: 0.02
stage1_epochs: 10
stage2_epochs: 5
stage1_lr: 4e-3
stage2_lr: 1e-3
stage3_lr: 1e-5
beta_cls: 1.0
stage1_visual_beta_kl: 0.4
stage1_visual_beta_rec: 1.0
stage1_audio_beta_kl: 2.0
stage1_audio_beta_rec: 5.0
stage2_beta_red: 1.0
stage2_beta_inter: 1.0
stage2_beta_uni: 1.0
stage2_beta_rec_tr: 2.5
stage3_beta_kl_stage1: 1.0
stage3_beta_rec_stage1: 3.0
stage3_beta_cls_stage1: 0.5
stage3_beta_red: 0.4
stage3_beta_inter: 0.4
stage3_beta_uni: 0.4
stage3_beta_rec_tr: 1.0
"""
# An older revision's file: lambda 0.2 for KLs scaled by 0.1 in the model, a tenth of the
# reconstruction weights, and stage2_beta_all.
OLD_METHOD_YAML = """\
lamb: 0.2
stage1_visual_beta_rec: 0.1
stage1_audio_beta_rec: 0.5
stage2_beta_rec_tr: 0.25
stage2_beta_all: 0.5
stage3_beta_rec_stage1: 0.3
stage3_beta_rec_tr: 0.1
"""


def test_defaults_are_the_published_configuration():
    c = DMILConfig()
    assert (c.n_epochs, c.batch_size, c.optimizer, c.momentum, c.weight_decay, c.random_seed) == (70, 64, "SGD", 0.9, 1e-4, 2024)
    assert (c.stage1_epochs, c.stage1_lr, c.stage2_epochs, c.stage2_lr, c.stage3_lr) == (10, 4e-3, 5, 1e-3, 1e-5)
    assert (c.lamb, c.beta_cls, c.stage1_visual_beta_kl, c.stage1_audio_beta_kl) == (0.02, 1.0, 0.4, 2.0)
    assert (c.stage1_visual_beta_rec, c.stage1_audio_beta_rec, c.stage2_beta_rec_tr) == (1.0, 5.0, 2.5)
    assert (c.stage2_beta_red, c.stage2_beta_inter, c.stage2_beta_uni) == (1.0, 1.0, 1.0)
    assert (c.stage3_beta_kl_stage1, c.stage3_beta_rec_stage1, c.stage3_beta_cls_stage1) == (1.0, 3.0, 0.5)
    assert (c.stage3_beta_red, c.stage3_beta_inter, c.stage3_beta_uni, c.stage3_beta_rec_tr) == (0.4, 0.4, 0.4, 1.0)
    assert c.synergy_hidden == 0  # the published synergy module
    assert c.seed == 2024 and c.preset == "published"


def test_official_method_file_loads_with_yaml_1_1_exponents(tmp_path):
    path = tmp_path / "DMIL.yaml"
    path.write_text(OFFICIAL_METHOD_YAML.replace("stage3_lr: 1e-5", "stage3_lr: 2e-4"))
    c = DMILConfig.from_yaml(path)
    assert c.stage3_lr == 2e-4 and c.stage1_lr == 4e-3 and isinstance(c.stage1_epochs, int)
    assert c == DMILConfig(stage3_lr=2e-4)
    path.write_text(OLD_METHOD_YAML)
    old = DMILConfig.from_yaml(path)
    assert (old.lamb, old.stage1_audio_beta_rec, old.stage3_beta_rec_tr, old.stage2_beta_all) == (0.2, 0.5, 0.1, 0.5)


def test_hydra_style_file_with_sections_interpolations_and_seed_alias(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("defaults:\n  - methods: DMIL\nn_classes: ${dataset.n_classes}\nbatch_size: 32\n"
                    "seed: 7\nmethods:\n  stage2_epochs: 2\noptimizer:\n  _target_: torch.optim.Adam\n"
                    "  lr: ${lr}\n  betas: [0.8, 0.9]\n  eps: 1e-08\nhydra:\n  run:\n    dir: x\n")
    c = DMILConfig.from_yaml(path)
    assert (c.batch_size, c.random_seed, c.stage2_epochs, c.optimizer, c.adam_betas, c.adam_eps) == (
        32, 7, 2, "Adam", (0.8, 0.9), 1e-8)


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lamb: 0.3\nstage4_lr: 0.1\n")
    with pytest.raises(ValueError, match=r"stage4_lr.*bad\.yaml"):
        DMILConfig.from_yaml(path)
    path.write_text("batch_size: many\n")
    with pytest.raises(ValueError, match="batch_size"):
        DMILConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        DMILConfig.from_yaml(tmp_path / "missing.yaml")


def test_presets_and_validation():
    f = DMILConfig.for_features()
    assert f.preset == "features" and f.stage3_lr == 5e-2 and f.stage3_lr > DMILConfig().stage3_lr
    assert (f.encoder_depth, f.synergy_hidden, f.n_epochs) == (0, 64, 50)
    assert f.lamb == DMILConfig().lamb  # loss weights stay published
    assert DMILConfig.from_preset("features", random_seed=3).random_seed == 3
    with pytest.raises(ValueError, match="preset"):
        DMILConfig.from_preset("fast")
    with pytest.raises(ValueError, match="n_epochs"):
        DMILConfig(n_epochs=12, stage1_epochs=10, stage2_epochs=5)
    with pytest.raises(ValueError, match="optimizer"):
        DMILConfig(optimizer="LBFGS")
    with pytest.raises(ValueError, match="synergy_hidden"):
        DMILConfig(synergy_hidden=-1)


@pytest.mark.parametrize("setting, value, message", [
    ("stage1_plateau_factor", 1.0, r"stage1_plateau_factor must lie in \(0, 1\)"),
    ("plateau_factor", 0.0, r"plateau_factor must lie in \(0, 1\)"),
    ("stage3_plateau_patience", -1, "stage3_plateau_patience must be an int >= 0"),
    ("plateau_patience", 1.5, "plateau_patience must be an int >= 0"),
    ("adam_betas", (0.9, 1.5), r"adam_betas must be two numbers in \[0, 1\)"),
    ("adam_betas", (0.9,), "adam_betas must be two numbers"),
    ("adam_eps", -1e-8, "adam_eps must be >= 0"),
    ("beta_cls", -1.0, "beta_cls must be >= 0"),
    ("stage2_beta_rec_tr", -0.5, "stage2_beta_rec_tr must be >= 0"),
])
def test_optimiser_schedule_and_loss_weight_settings_are_checked(setting, value, message):
    """Refused when the config is made, naming the setting (torch's own errors came at the first
    step, naming neither; a negative patience or loss weight was taken silently)."""
    with pytest.raises(ValueError, match=message):
        DMILConfig(**{setting: value})


def test_factory_builds_the_configured_synergy_module_and_encoders():
    model = build_model("dmil", (5, 5), 3, DMILConfig.for_features(embed_size=4, synergy_hidden=7))
    assert model.cross_modality.fc_hidden.weight.shape == (7, 12)
    assert isinstance(model.visual_net, torch.nn.Identity) and model.embed_v.in_features == 5
    published = build_model("dmil", (5, 5), 3, DMILConfig(embed_size=4, encoder_depth=0))
    assert not hasattr(published.cross_modality, "fc_hidden")
    with pytest.raises(ValueError, match="encoder_depth"):
        build_model("dmil", (5, 6), 3, DMILConfig.for_features(embed_size=4))
    for dims in ((8,), (8, 0), (8, 2.5), 8):
        with pytest.raises(ValueError, match=r"dims must be the two feature widths \(D1, D2\)"):
            build_model("dmil", dims, 3, DMILConfig.for_features(embed_size=4))


def test_recompute_setting_reaches_the_model_and_is_validated(tmp_path):
    assert build_model("dmil", (5, 5), 3, DMILConfig(embed_size=4)).recompute is True
    path = tmp_path / "lowcompute.yaml"
    path.write_text("recompute: false\nembed_size: 4\n")
    config = DMILConfig.from_yaml(path)
    assert config.recompute is False
    assert build_model("dmil", (5, 5), 3, config).recompute is False
    with pytest.raises(ValueError, match="recompute must be true or false, got 'no'"):
        DMILConfig(recompute="no")
    path.write_text("recompute: 1\n")
    with pytest.raises(ValueError, match="setting 'recompute' in .* must be bool, got 1"):
        DMILConfig.from_yaml(path)


def test_scaled_keeps_the_stage_proportions():
    c = DMILConfig().scaled(14)  # 70 -> 14: stage 1 10 -> 2, stage 2 5 -> 1, stage 3 the rest
    assert (c.n_epochs, c.stage1_epochs, c.stage2_epochs) == (14, 2, 1)
    tiny = DMILConfig().scaled(3)
    assert (tiny.stage1_epochs, tiny.stage2_epochs) == (1, 1)
    one = DMILConfig().scaled(1)
    assert (one.stage1_epochs, one.stage2_epochs) == (1, 0)
    with pytest.raises(ValueError, match="epochs"):
        DMILConfig().scaled(0)


def test_scaled_gives_a_stage1_only_schedule_every_epoch_asked_for():
    """stage2_epochs=0 stops DMIL after stage 1: scaling to N epochs must then run N epochs of
    stage 1 (proportional scaling ran round(6 * 20 / 50) = 2 of the 20)."""
    from dmil_fast.train.trainer import stage_of_epoch

    c = DMILConfig.for_features(stage2_epochs=0).scaled(20)
    assert (c.n_epochs, c.stage1_epochs, c.stage2_epochs) == (20, 20, 0)
    assert [stage_of_epoch(e, c) for e in (1, 20, 21)] == [1, 1, None]
    assert DMILConfig.for_features(stage2_epochs=0).scaled(1).stage1_epochs == 1


def test_the_plateau_schedules_the_official_trainer_hard_codes():
    """(factor, patience) of the official train.py's ReduceLROnPlateau calls: the baselines' scheduler
    (0.1, 2), stage 1 (0.2, 2), stage 2 (0.1, 1), stage 3 (0.1, 10)."""
    config = DMILConfig()
    assert [config.plateau(k) for k in (0, 1, 2, 3)] == [(0.1, 2), (0.2, 2), (0.1, 1), (0.1, 10)]


def test_the_features_preset_is_the_one_its_docstring_documents():
    f, published = DMILConfig.for_features(), DMILConfig()
    assert (f.stage1_lr, f.stage2_lr, f.stage3_lr, f.lr) == (4e-2, 2e-2, 5e-2, 1e-1)
    assert (f.stage1_epochs, f.stage2_epochs, f.n_epochs - f.stage1_epochs - f.stage2_epochs) == (6, 3, 41)
    assert (f.batch_size, f.embed_size, f.joint_fusion_hidden, f.synergy_hidden, f.encoder_depth,
            f.stage3_plateau_patience) == (128, 64, 512, 64, 0, 4)
    changed = {"preset", "n_epochs", "stage1_epochs", "stage2_epochs", "batch_size", "stage1_lr", "stage2_lr",
               "stage3_lr", "lr", "embed_size", "input_size", "encoder_hidden", "encoder_depth",
               "joint_fusion_hidden", "synergy_hidden", "stage3_plateau_patience"}
    for name in published.to_dict():
        if name not in changed:
            assert getattr(f, name) == getattr(published, name), name  # everything else stays published


def test_an_official_optimizer_file_sets_each_field(tmp_path):
    path = tmp_path / "SGD.yaml"
    path.write_text("optimizer:\n  _target_: torch.optim.SGD\n  lr: 0.01\n  momentum: 0.8\n  weight_decay: 5e-4\n")
    config = DMILConfig.from_yaml(path)
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("SGD", 0.01, 0.8, 5e-4)


def test_adam_defaults_are_torchs_and_the_official_files():
    config = DMILConfig()
    assert (config.adam_betas, config.adam_eps) == ((0.9, 0.999), 1e-8)
    defaults = torch.optim.Adam([nn.Parameter(torch.zeros(1))]).defaults
    assert (tuple(defaults["betas"]), defaults["eps"]) == (config.adam_betas, config.adam_eps)


def test_encoder_settings_reach_the_mlp_encoders_of_every_method():
    config = DMILConfig(embed_size=4, input_size=8, encoder_hidden=12, encoder_depth=2, encoder_dropout=0.3,
                        joint_fusion_hidden=7)
    for method in METHODS:
        model = build_model(method, (5, 6), 3, config)
        for encoder, width in ((model.visual_net, 5), (model.audio_net, 6)):
            assert (encoder.in_dim, encoder.hidden, encoder.depth, encoder.out_dim, encoder.dropout) == \
                (width, 12, 2, 8, 0.3)
            assert [m.p for m in encoder.modules() if isinstance(m, nn.Dropout)] == [0.3]
    assert build_model("joint", (5, 6), 3, config).fusion[0].out_features == 7


def test_a_backend_given_for_a_baseline_is_ignored_as_documented():
    """The baselines have no fused ops; load_model and the Trainer pass a backend whatever the method."""
    from dmil_fast.nn import EnsembleModel, JointModel

    config = DMILConfig(embed_size=4, input_size=8, encoder_hidden=12, joint_fusion_hidden=7)
    assert isinstance(build_model("joint", (5, 6), 3, config, backend="reference"), JointModel)
    assert isinstance(build_model("ensemble", (5, 6), 3, config, backend="triton"), EnsembleModel)


def test_a_dmil_run_that_would_skip_epochs_says_so(tmp_path):
    """n_epochs beyond stage 1 with stage2_epochs=0 never runs for DMIL: the trainer warns with the
    numbers (the baselines, which run n_epochs, do not warn)."""
    import warnings

    from dmil_fast.train import Trainer
    from tests.train.toy import separable_data

    config = DMILConfig(n_epochs=5, stage1_epochs=2, stage2_epochs=0, embed_size=4, input_size=8, encoder_hidden=8,
                        encoder_depth=1, batch_size=16, joint_fusion_hidden=4)
    with pytest.warns(UserWarning, match="stops after stage 1's 2 epochs: 3 of n_epochs=5 do not run"):
        Trainer(separable_data(), config, method="dmil", out_dir=tmp_path / "d", echo=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(separable_data(), config, method="joint", out_dir=tmp_path / "j", echo=None)


@pytest.mark.parametrize("value", [".inf", "-.inf", "1e400"])
def test_an_infinite_int_setting_is_a_clear_error(tmp_path, value):
    """YAML reads .inf as float infinity (1e400 too, once a float), which int() cannot take: the same ValueError
    naming the setting and the file as any other bad value, not an OverflowError."""
    path = tmp_path / "inf.yaml"
    path.write_text(f"n_epochs: {value}\n")
    with pytest.raises(ValueError, match=r"setting 'n_epochs' in .*inf\.yaml must be int, got "):
        DMILConfig.from_yaml(path)
