"""Checkpoints users bring: official DMIL checkpoints and plain state_dicts load (load_model,
--init-from); truncated, corrupt or tampered files give an error naming the file, never a silent
fresh start; a write killed half-way leaves the previous checkpoint intact."""

import json

import pytest
import torch

from dmil_fast.cli import main
from dmil_fast.data import make_synthetic
from dmil_fast.nn.resnet import resnet18
from dmil_fast.reference.model import ReferenceDMILModel
from dmil_fast.train import DMILConfig, FeatureData, Trainer, build_model, load_checkpoint, load_model, save_checkpoint
from dmil_fast.train.checkpoint import read_state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn") / "d", n=300, dim=8, num_classes=3, seed=1)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text("embed_size: 8\nencoder_hidden: 16\ninput_size: 16\njoint_fusion_hidden: 8\n")
    return path


def _official_sgd_state(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=0.1, patience=2)
    scheduler.step(1.0)
    return optimizer.state_dict(), scheduler.state_dict()


def test_plain_official_state_dict_rebuilds_the_official_model(tmp_path):
    """A state_dict of the reference (official-semantics) model on features: load_model infers the
    sizes and gives the same eval outputs as that model."""
    torch.manual_seed(0)
    official = ReferenceDMILModel(None, None, embed_size=8, num_class=5, stage=3, input_size=12).eval()
    torch.save(official.state_dict(), tmp_path / "plain.pth")
    model = load_model(tmp_path / "plain.pth")
    assert (model.embed_size, model.num_class, model.stage) == (8, 5, 3) and not model.training
    x1, x2 = torch.randn(4, 12), torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x1, x2)["out"], official(x1, x2)["out"], rtol=1e-5, atol=1e-6)


def test_official_checkpoint_with_resnet18_encoders_loads(tmp_path):
    """The official trainer's file: {epoch, state_dict, optimizer, scheduler}, ResNet18 encoders."""
    torch.manual_seed(1)
    official = ReferenceDMILModel(resnet18("visual"), resnet18("audio"), embed_size=8, num_class=6, stage=3)
    optimizer, scheduler = _official_sgd_state(official)
    torch.save({"epoch": 12, "state_dict": official.state_dict(), "optimizer": optimizer, "scheduler": scheduler},
               tmp_path / "stage3_best_epoch_12_acc_0.700.pth")
    model = load_model(tmp_path / "stage3_best_epoch_12_acc_0.700.pth")
    for name, value in official.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    official.eval()
    visual, audio = torch.randn(2, 3, 1, 32, 32), torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(visual, audio)["out"], official(visual, audio)["out"], rtol=1e-4, atol=1e-5)


def test_init_from_loads_official_weights_and_names_a_misfit(syn, tmp_path):
    data = FeatureData.load(syn)
    config = DMILConfig.for_features(embed_size=8, encoder_hidden=16, input_size=16, n_epochs=1, stage1_epochs=1,
                                     stage2_epochs=0)
    torch.manual_seed(7)
    donor = build_model("dmil", data.dims, data.num_classes, config)
    legacy = dict(donor.state_dict(), **{"clf_audio_fc.weight": torch.zeros(3, 8), "clf_audio_fc.bias": torch.zeros(3)})
    torch.save({"epoch": 3, "state_dict": legacy}, tmp_path / "official.pth")
    trainer = Trainer(data, config, method="dmil", out_dir=tmp_path / "o", echo=None, init_from=tmp_path / "official.pth")
    for name, value in donor.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    wrong = DMILConfig.for_features(embed_size=4, encoder_hidden=16, input_size=16)
    with pytest.raises(ValueError, match="official.pth") as exc:
        Trainer(data, wrong, method="dmil", out_dir=tmp_path / "w", echo=None, init_from=tmp_path / "official.pth")
    assert "wrong shape" in str(exc.value)


def test_cli_init_from(syn, small_config, tmp_path, capsys):
    out = tmp_path / "first"
    assert main(["train", "--data", str(syn), "--method", "dmil", "--epochs", "2", "--out", str(out),
                 "--config", str(small_config), "--no-progress", "--quiet"]) == 0
    best = out / "checkpoints" / "best_stage2.pt"
    assert main(["train", "--data", str(syn), "--method", "dmil", "--epochs", "2", "--out", str(tmp_path / "second"),
                 "--config", str(small_config), "--no-progress", "--quiet", "--init-from", str(best)]) == 0
    assert main(["train", "--data", str(syn), "--method", "dmil", "--epochs", "2", "--out", str(tmp_path / "third"),
                 "--no-progress", "--quiet", "--init-from", str(best)]) == 2  # another embed_size
    err = capsys.readouterr().err
    assert "best_stage2.pt" in err and "do not fit" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "tampered", "foreign"])
def test_resume_from_a_damaged_checkpoint_is_an_error_naming_it(syn, small_config, tmp_path, capsys, damage):
    out = tmp_path / "run"
    args = ["train", "--data", str(syn), "--method", "dmil", "--epochs", "2", "--out", str(out),
            "--config", str(small_config), "--no-progress", "--quiet"]
    assert main(args) == 0
    last = out / "checkpoints" / "last.pt"
    raw = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        last.write_bytes(b"\x00" * 64)
    elif damage == "tampered":
        payload = torch.load(last, weights_only=True)
        payload["state_dict"]["embed_v.weight"] += 1
        torch.save(payload, last)
    else:
        torch.save({"weights": [1, 2, 3]}, last)
    before = (out / "metrics.json").stat().st_mtime_ns, (out / "log.csv").read_text()
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(last) in err and "Traceback" not in err
    assert "weights_only" not in err  # torch's advice to unpickle arbitrary code is not passed on
    assert ((out / "metrics.json").stat().st_mtime_ns, (out / "log.csv").read_text()) == before  # nothing ran


def test_resume_after_the_run_finished_only_retests(syn, small_config, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(syn), "--method", "joint", "--epochs", "2", "--out", str(out),
            "--config", str(small_config), "--no-progress", "--quiet"]
    assert main(args) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert main(args + ["--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["test_accuracy"] == first["test_accuracy"] and again["final_train_loss"] == first["final_train_loss"]
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 2


def test_a_write_killed_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"state_dict": {"w": torch.ones(3)}, "epoch": 1})
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise KeyboardInterrupt  # stands in for the process dying mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"state_dict": {"w": torch.zeros(3)}, "epoch": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_read_state_dict_refuses_foreign_files_naming_them(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        read_state_dict(tmp_path / "list.pt")
    state = {"module.a.weight": torch.ones(2)}
    torch.save(state, tmp_path / "dp.pt")
    assert list(read_state_dict(tmp_path / "dp.pt")[0]) == ["a.weight"]  # DataParallel prefix removed
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        read_state_dict(tmp_path / "absent.pt")


def test_only_the_legacy_classifier_keys_are_forgiven():
    """The ensemble baseline has its own clf_* layers: weights without them are refused, and a stray
    clf_* key that is not one of the official model's legacy classifiers is unexpected."""
    from dmil_fast.train.checkpoint import fit_state_dict

    config = DMILConfig.for_features(embed_size=4, encoder_hidden=8, input_size=8)
    ensemble = build_model("ensemble", (6, 6), 3, config)
    partial = {k: v for k, v in ensemble.state_dict().items() if not k.startswith("clf_")}
    with pytest.raises(ValueError, match=r"ens\.pth.*missing: clf_audio_fc"):
        fit_state_dict(ensemble, partial, source="ens.pth")
    dmil = build_model("dmil", (6, 6), 3, config)
    stray = dict(dmil.state_dict(), **{"clf_extra_fc.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="unexpected: clf_extra_fc.weight"):
        fit_state_dict(dmil, stray, source="d.pth")


def test_build_model_takes_prebuilt_encoders():
    config = DMILConfig(embed_size=8, input_size=512)
    for method in ("dmil", "joint", "ensemble"):
        model = build_model(method, None, 5, config, encoders=(resnet18("visual"), resnet18("audio")))
        assert model.visual_net.conv1.in_channels == 3 and model.audio_net.conv1.in_channels == 1
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 1, 32, 32), torch.randn(2, 1, 32, 32))["out"]
        assert out.shape == (2, 5)
    with pytest.raises(TypeError, match="encoders must be a pair"):
        build_model("dmil", None, 5, config, encoders=(resnet18("visual"),))
    with pytest.raises(ValueError, match="dims"):
        build_model("dmil", None, 5, config)


def test_public_names_are_exported():
    import dmil_fast.nn as dnn
    import dmil_fast.train as dtrain
    from dmil_fast.train import checkpoint, distributed, media

    assert dnn.resnet18 is resnet18 and dnn.ResNet18 is type(resnet18("audio"))
    assert dtrain.load_weights is checkpoint.load_weights and dtrain.read_state_dict is read_state_dict
    assert dtrain.init_distributed is distributed.init_distributed and dtrain.MediaData is media.MediaData
    for module in (dnn, dtrain):
        assert all(hasattr(module, name) for name in module.__all__)


def test_init_from_an_official_state_dict_names_the_synergy_setting_it_needs(syn, tmp_path):
    """The features preset adds a hidden layer to the synergy module (synergy_hidden=64); an official
    model's state_dict has none. The misfit error says which setting makes it fit, and with it
    (synergy_hidden=0) the same file loads exactly."""
    data = FeatureData.load(syn)
    config = DMILConfig.for_features(n_epochs=1, stage1_epochs=1, stage2_epochs=0)
    assert config.synergy_hidden == 64
    torch.manual_seed(3)
    official = ReferenceDMILModel(None, None, embed_size=config.embed_size, num_class=data.num_classes, stage=3,
                                  input_size=data.dims[0])
    torch.save(official.state_dict(), tmp_path / "official.pt")
    with pytest.raises(ValueError) as exc:
        Trainer(data, config, method="dmil", out_dir=tmp_path / "a", echo=None, init_from=tmp_path / "official.pt")
    message = str(exc.value)
    assert "official.pt" in message and "cross_modality" in message
    assert "synergy_hidden=0 (the official synergy module" in message and "set synergy_hidden: 0" in message
    fitting = DMILConfig.for_features(n_epochs=1, stage1_epochs=1, stage2_epochs=0, synergy_hidden=0)
    trainer = Trainer(data, fitting, method="dmil", out_dir=tmp_path / "b", echo=None,
                      init_from=tmp_path / "official.pt")
    for name, value in official.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
