"""The three-stage schedule: stage per epoch, learning rate per stage, best checkpoint reloaded at
each switch, outputs written; baselines in the same harness."""

import csv
import json

import numpy as np
import pytest
import torch

from dmil_fast.train import DMILConfig, FeatureData, Trainer, load_checkpoint, load_model, stage_of_epoch

TINY = dict(embed_size=4, input_size=8, encoder_hidden=8, encoder_depth=1, batch_size=16,
            stage1_lr=0.05, stage2_lr=0.02, stage3_lr=0.01, lr=0.03, joint_fusion_hidden=4)


def _data(n=(48, 24, 24), d=6, c=3):
    g = torch.Generator().manual_seed(0)
    splits = []
    for size in n:
        y = torch.randint(0, c, (size,), generator=g)
        x1 = torch.randn(size, d, generator=g) + y[:, None].float()
        x2 = torch.randn(size, d, generator=g) - y[:, None].float()
        splits.append((x1, x2, y, np.arange(size) % 4))
    return FeatureData.from_tensors(*splits, num_classes=c,
                                    type_names=["redundancy", "unique_1", "unique_2", "synergy"])


def test_stage_of_epoch_follows_the_official_schedule():
    c = DMILConfig()
    stages = [stage_of_epoch(e, c) for e in range(1, 72)]
    assert stages[:10] == [1] * 10 and stages[10:15] == [2] * 5 and stages[15:70] == [3] * 55
    assert stages[70] is None
    only1 = DMILConfig(stage2_epochs=0, n_epochs=12)
    assert [stage_of_epoch(e, only1) for e in (10, 11)] == [1, None]


class _PerturbingTrainer(Trainer):
    """Corrupts the weights after the last epoch of each stage: the next stage must start from
    the stage's best checkpoint, never from these weights."""

    entered = []

    def save_last(self):
        super().save_last()
        if self.stage_of(self.epoch + 1) != self.stage:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(1.0)

    def enter_stage(self, stage):
        super().enter_stage(stage)
        self.entered.append((stage, {k: v.clone() for k, v in self.model.state_dict().items()},
                             [g["lr"] for g in self.optimizer.param_groups]))


def test_dmil_schedule_switches_stages_reloads_best_and_writes_outputs(tmp_path):
    config = DMILConfig(n_epochs=5, stage1_epochs=2, stage2_epochs=1, **TINY)
    trainer = _PerturbingTrainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None)
    _PerturbingTrainer.entered = []
    metrics = trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["stage"]) for r in rows] == [1, 1, 2, 3, 3]
    assert [float(r["lr"]) for r in rows[:4]] == [0.05, 0.05, 0.02, 0.01]
    assert [s for s, _, _ in _PerturbingTrainer.entered] == [1, 2, 3]
    for stage, state, lrs in _PerturbingTrainer.entered[1:]:
        best = load_checkpoint(tmp_path / "checkpoints" / f"best_stage{stage - 1}.pt")["state_dict"]
        for k, v in best.items():
            assert torch.equal(state[k], v), (stage, k)
        assert set(lrs) == {config.stage_lr(stage)}
    # stage 2 optimises only the trainable (stage-2) parameters
    assert trainer.model.stage == 3
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_accuracy", "per_class_accuracy", "per_type_accuracy", "syn", "final_train_loss",
                "world_size", "seconds"):
        assert key in saved and key in metrics
    assert set(saved["per_type_accuracy"]) == {"redundancy", "unique_1", "unique_2", "synergy"}
    assert saved["world_size"] == 1 and saved["epochs"] == 5
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 5 and last["stage"] == 3
    assert {"optimizer", "scheduler", "rng", "best_acc", "model"} <= set(last)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best_stage1.pt", "best_stage2.pt", "best_stage3.pt", "last.pt"]


class _ScriptedValidation(Trainer):
    """Validation results scripted per epoch (the test split is evaluated for real)."""

    script = []

    def evaluate(self, split):
        if split is self.data.val:
            loss, acc = self.script[self.epoch - 1]
            return {"loss": loss, "acc": acc}
        return super().evaluate(split)


def test_plateau_follows_the_validation_loss_and_the_first_best_accuracy_is_kept(tmp_path):
    """Validation loss 3, 2, 1 (always improving: no learning-rate cut, patience 0) while the
    accuracy 0.5, 0.5, 0.4 stalls (stepping the plateau on it would halve the rate for epoch 3); the
    best checkpoint is epoch 1's (a later tie does not replace it), and the test metrics are those
    of that checkpoint's weights."""
    config = DMILConfig(n_epochs=3, stage1_epochs=3, stage2_epochs=0, stage1_plateau_patience=0,
                        stage1_plateau_factor=0.5, **TINY)
    _ScriptedValidation.script = [(3.0, 0.5), (2.0, 0.5), (1.0, 0.4)]
    trainer = _ScriptedValidation(_data(), config, method="dmil", out_dir=tmp_path, echo=None)
    metrics = trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [float(r["lr"]) for r in rows] == [0.05, 0.05, 0.05]
    best = load_checkpoint(tmp_path / "checkpoints" / "best_stage1.pt")
    assert best["epoch"] == 1 and metrics["best_val_accuracy"] == 0.5
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["state_dict"]
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best["state_dict"].items())  # reloaded for the test
    assert any(not torch.equal(last[k], v) for k, v in best["state_dict"].items())  # and not the last


def test_stage2_optimizer_holds_only_trainable_parameters(tmp_path):
    config = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **TINY)
    trainer = Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None)
    trainer.enter_stage(1)
    trainer.enter_stage(2)
    params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert params == trainable and len(params) < len(list(trainer.model.parameters()))


@pytest.mark.parametrize("method", ["joint", "ensemble"])
def test_baselines_run_in_the_same_harness(tmp_path, method):
    config = DMILConfig(n_epochs=2, stage1_epochs=1, stage2_epochs=1, **TINY)
    metrics = Trainer(_data(), config, method=method, out_dir=tmp_path, echo=None).fit()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [float(r["lr"]) for r in rows] == [0.03, 0.03]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_load_model_rebuilds_the_trained_model(tmp_path):
    data = _data()
    config = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **TINY)
    trainer = Trainer(data, config, method="dmil", out_dir=tmp_path, echo=None)
    trainer.fit()
    model = load_model(tmp_path / "checkpoints" / "best_stage3.pt")
    assert not model.training and model.stage == 3
    x1, x2 = data.test.x1[:5], data.test.x2[:5]
    with torch.no_grad():
        torch.testing.assert_close(model(x1, x2)["out"], trainer.model.eval()(x1, x2)["out"])


def test_log_csv_has_one_column_per_documented_field_and_logs_the_validation(tmp_path):
    """log.csv: the columns of runlog's docstring in that order; each epoch row carries the
    validation loss and accuracy of that epoch (scripted here, so known in advance)."""
    config = DMILConfig(n_epochs=3, stage1_epochs=3, stage2_epochs=0, **TINY)
    _ScriptedValidation.script = [(3.0, 0.5), (2.0, 0.25), (1.0, 0.75)]
    _ScriptedValidation(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit()
    with open(tmp_path / "log.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", "stage", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                 "seconds", "samples_per_second"]
    assert [float(r["val_loss"]) for r in rows] == [3.0, 2.0, 1.0]
    assert [float(r["val_acc"]) for r in rows] == [0.5, 0.25, 0.75]
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]


def test_from_tensors_takes_each_modalitys_own_width():
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g), torch.arange(n) % 2

    data = FeatureData.from_tensors(split(6), split(4), split(4), num_classes=2)
    assert data.dims == (3, 5)
    assert data.class_names == ["class_0", "class_1"] and data.type_names is None
    assert torch.equal(data.train.idx, torch.arange(6)) and data.train.x1.dtype == torch.float32


def _parts(n, *, w1=3, w2=5, classes=2):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(n, w1, generator=g), torch.randn(n, w2, generator=g), torch.arange(n) % classes,
            np.arange(n) % 4]


def _edit(index, value, n=6):
    parts = _parts(n)
    parts[index] = value
    return tuple(parts)


TYPES = ["redundancy", "unique_1", "unique_2", "synergy"]


@pytest.mark.parametrize("test_split,error,needles", [
    (_edit(1, torch.randn(5, 5)), ValueError, ("test split's x2 has 5 rows and y 6",)),
    (_edit(2, torch.tensor([0, 1, 2, 0, 1, 0])), ValueError, ("test split's labels", "[0, 2)", "to 2")),
    (_edit(2, torch.tensor([0, 1, -1, 0, 1, 0])), ValueError, ("test split's labels", "from -1")),
    (_edit(2, torch.zeros(6)), TypeError, ("test split's y", "integer class labels", "float32")),
    (_edit(3, np.arange(5) % 4), ValueError, ("test split's types", "(6,)")),
    (_edit(3, np.array([0, 1, 2, 3, 4, 0])), ValueError, ("test split's types", "[0, 4)", "to 4")),
    (_edit(0, torch.randn(6, 3, 2)), ValueError, ("test split's x1 must be 2-D",)),
    (_edit(0, np.zeros((6, 3), np.float32)), TypeError, ("test split's x1 must be a torch.Tensor", "ndarray")),
    (_edit(0, torch.ones(6, 3, dtype=torch.int64)), TypeError, ("test split's x1 must be floating",)),
    (tuple(_parts(6, w1=4)), ValueError, ("test split has features of widths (4, 5)", "(3, 5)")),
    (tuple(_parts(6))[:2], ValueError, ("test split must be a tuple (x1, x2, y)", "2 items")),
])
def test_from_tensors_refuses_inconsistent_splits_naming_split_and_argument(test_split, error, needles):
    """Rows, label range and dtype, type codes, ranks and widths are checked when the data is made,
    as FeatureData.load checks files (a wrong types length surfaced only after the whole training,
    a short x2 as an IndexError, labels past num_classes only in the loss)."""
    with pytest.raises(error) as exc:
        FeatureData.from_tensors(tuple(_parts(12)), tuple(_parts(6)), test_split, num_classes=2, type_names=TYPES)
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def test_from_tensors_checks_num_classes_and_class_names():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        FeatureData.from_tensors(tuple(_parts(12)), tuple(_parts(6)), tuple(_parts(6)), num_classes=0)
    with pytest.raises(ValueError, match="class_names must name the 2 classes, got 3 names"):
        FeatureData.from_tensors(tuple(_parts(12)), tuple(_parts(6)), tuple(_parts(6)), num_classes=2,
                                 class_names=["a", "b", "c"])
