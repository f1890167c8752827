"""Never losing work: a run interrupted at any moment and resumed from checkpoints/last.pt ends
exactly as the uninterrupted run (the reference is that uninterrupted run, same process settings)."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dmil_fast.data import make_synthetic
from dmil_fast.train import DMILConfig, FeatureData, Trainer, load_checkpoint
from dmil_fast.train.resume import capture_rng, remove_partial_files, restore_rng
from tests.train.toy import separable_data

TINY = dict(embed_size=4, input_size=8, encoder_hidden=8, encoder_depth=1, batch_size=16,
            stage1_lr=0.05, stage2_lr=0.02, stage3_lr=0.01, lr=0.03, joint_fusion_hidden=4)
CONFIG = DMILConfig(n_epochs=5, stage1_epochs=2, stage2_epochs=1, encoder_dropout=0.1, **TINY)
COMPARED = ("test_accuracy", "test_loss", "final_train_loss", "best_val_accuracy", "per_type_accuracy", "syn")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    return separable_data((90, 32, 32))  # 90 = 5 full batches of 16 and one of 10 per epoch


class Crash(Exception):
    """Stands in for a kill: nothing after the raise runs."""


class CrashingTrainer(Trainer):
    """Raises at a chosen moment: after the n-th write of last.pt, at the n-th training step, after
    the n-th log row (before that epoch's checkpoint), or in finish()."""

    def __init__(self, *args, crash, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash, self.counts = crash, {"save": 0, "step": 0, "row": 0}
        row = self.log.row

        def logged(r):
            row(r)
            self._tick("row")

        self.log.row = logged

    def _tick(self, what):
        self.counts[what] += 1
        if self.crash == (what, self.counts[what]):
            raise Crash(f"{what} {self.counts[what]}")

    def save_last(self):
        super().save_last()
        self._tick("save")

    def train_step(self, x1, x2, y):
        self._tick("step")
        return super().train_step(x1, x2, y)

    def finish(self, seconds):
        if self.crash == ("finish", 1):
            raise Crash("finish")
        return super().finish(seconds)


def _final_state(out_dir):
    return load_checkpoint(out_dir / "checkpoints" / "last.pt")["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    metrics = Trainer(_data(), CONFIG, method="dmil", out_dir=out, echo=None, checkpoint_every=2).fit()
    return out, metrics


# 6 steps per epoch; last.pt written at steps 2 and 4 and at the epoch's end (3 writes per epoch):
# save 1 = epoch 1 step 2; save 6 = end of epoch 2 (the stage-1 -> 2 switch comes next);
# step 15 = during epoch 3 (stage 2) step 3, one step past a checkpoint; save 11 = epoch 4 (stage 3)
# step 4; row 4 = epoch 4 logged but not yet checkpointed; finish = after the last checkpoint.
@pytest.mark.parametrize("crash", [("save", 1), ("save", 6), ("step", 15), ("save", 11), ("row", 4),
                                   ("finish", 1)])
def test_resume_after_a_crash_anywhere_equals_the_uninterrupted_run(tmp_path, uninterrupted, crash):
    full_out, full = uninterrupted
    with pytest.raises(Crash):
        CrashingTrainer(_data(), CONFIG, method="dmil", out_dir=tmp_path, echo=None, checkpoint_every=2,
                        crash=crash).fit()
    assert not (tmp_path / "metrics.json").exists()
    lines = []
    resumed = Trainer(_data(), CONFIG, method="dmil", out_dir=tmp_path, echo=lines.append,
                      checkpoint_every=2).fit(resume=True)
    assert lines[0].startswith("resuming from")
    for key in COMPARED:
        assert resumed[key] == full[key], key
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_accuracy"] == full["test_accuracy"] and saved["final_train_loss"] == full["final_train_loss"]
    for name, value in _final_state(full_out).items():
        assert torch.equal(_final_state(tmp_path)[name], value), name
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    full_rows = list(csv.DictReader(open(full_out / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5"]
    for r, f in zip(rows, full_rows):
        assert (r["train_loss"], r["val_acc"], r["lr"]) == (f["train_loss"], f["val_acc"], f["lr"])


def test_mid_epoch_checkpoint_records_the_position(tmp_path):
    with pytest.raises(Crash):
        CrashingTrainer(_data(), CONFIG, method="dmil", out_dir=tmp_path, echo=None, checkpoint_every=2,
                        crash=("save", 5)).fit()
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["position"] == {"epoch": 2, "step": 4, "complete": False}
    assert last["stage"] == 1 and last["epoch"] == 2
    loss_sum, correct, seen = last["train_sums"][0]
    assert seen == 64 and 0 <= correct <= 64 and loss_sum > 0
    assert set(last["rng"][0]) >= {"python", "numpy", "torch"}
    assert last["sampler"] == {"seed": CONFIG.random_seed, "batch_size": 16, "world_size": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best_stage1.pt", "last.pt"]


def test_resume_without_checkpoint_starts_from_scratch_and_says_so(tmp_path, uninterrupted):
    lines = []
    config = DMILConfig(n_epochs=2, stage1_epochs=1, stage2_epochs=1, **TINY)
    Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=lines.append).fit(resume=True)
    assert "no checkpoint" in lines[0] and "starting from scratch" in lines[0]
    assert (tmp_path / "metrics.json").is_file()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    config = DMILConfig(n_epochs=2, stage1_epochs=1, stage2_epochs=1, **TINY)
    Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit()
    other = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **TINY)
    with pytest.raises(ValueError, match="n_epochs") as exc:
        Trainer(_data(), other, method="dmil", out_dir=tmp_path, echo=None).fit(resume=True)
    assert "last.pt" in str(exc.value)
    with pytest.raises(ValueError, match="method"):
        Trainer(_data(), config, method="joint", out_dir=tmp_path, echo=None).fit(resume=True)


@pytest.mark.parametrize("change", ["other data", "other split", "amp", "backend"])
def test_resume_refuses_other_data_autocast_or_backend(tmp_path, change):
    """Data of the same widths and classes, or another autocast or ops backend, would go on
    silently from a state that belongs to another run: refused, naming the file and what differs."""
    config = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **TINY)
    with pytest.raises(Crash):
        CrashingTrainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None, crash=("save", 1)).fit()
    d, options = _data(), {}
    if change == "other data":
        d = separable_data((150, 40, 40))
    elif change == "other split":  # the same rows, two training labels swapped
        y = d.train.y.clone()
        first_other = int(torch.nonzero(y != y[0])[0])
        y[0], y[first_other] = y[first_other].clone(), y[0].clone()
        d = FeatureData.from_tensors((d.train.x1, d.train.x2, y, d.train.types),
                                     *[(s.x1, s.x2, s.y, s.types) for s in (d.val, d.test)], num_classes=3,
                                     type_names=d.type_names)
    elif change == "amp":
        options = {"amp": "bf16"}
    else:
        options = {"backend": "reference"}
    needle = {"other data": "other data", "other split": "other data", "amp": "--amp", "backend": "--backend"}[change]
    with pytest.raises(ValueError, match=needle) as exc:
        Trainer(d, config, method="dmil", out_dir=tmp_path, echo=None, **options).fit(resume=True)
    assert "last.pt" in str(exc.value)
    if change == "other data":
        assert "90/32/32" in str(exc.value) and "150/40/40" in str(exc.value)
    # the same data and options still resume
    Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit(resume=True)


def test_resume_accepts_a_last_pt_that_predates_the_run_record(tmp_path):
    """Files written before last.pt recorded the data, autocast and backend still resume."""
    config = DMILConfig(n_epochs=3, stage1_epochs=1, stage2_epochs=1, **TINY)
    with pytest.raises(Crash):
        CrashingTrainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None, crash=("save", 1)).fit()
    last = tmp_path / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    del payload["run"]
    torch.save(payload, last)
    metrics = Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit(resume=True)
    assert metrics["epochs"] == 3


def _train_cmd(data, out, cfg, *extra):
    return [sys.executable, "-m", "dmil_fast", "train", "--data", str(data), "--method", "dmil", "--out", str(out),
            "--epochs", "4", "--config", str(cfg), "--no-progress", "--quiet", "--checkpoint-every", "5", *extra]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_metrics(tmp_path):
    """A real kill -9 of ``python -m dmil_fast train`` once a mid-epoch checkpoint exists."""
    data = make_synthetic(tmp_path / "syn", n=1500, dim=8, num_classes=3, seed=3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("embed_size: 8\nencoder_hidden: 16\ninput_size: 16\nbatch_size: 16\nencoder_dropout: 0.1\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = subprocess.Popen(_train_cmd(data, tmp_path / "full", cfg), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_train_cmd(data, tmp_path / "run", cfg), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    position = None
    deadline = time.monotonic() + 120
    while killed.poll() is None and time.monotonic() < deadline:
        if last.is_file():
            position = torch.load(last, weights_only=True)["position"]
            if position["epoch"] >= 2 and not position["complete"]:  # mid-epoch, after the first stage
                break
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    assert position["epoch"] >= 2 and not position["complete"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = subprocess.run(_train_cmd(data, tmp_path / "run", cfg, "--resume"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait(timeout=300) == 0, full.stderr.read()
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert b["test_accuracy"] == a["test_accuracy"] and b["final_train_loss"] == a["final_train_loss"]
    assert b["test_loss"] == a["test_loss"] and b["per_type_accuracy"] == a["per_type_accuracy"]


def test_capture_and_restore_rng_replay_every_stream_after_a_save_and_load(tmp_path):
    """Python's, NumPy's and torch's next draws after restore_rng equal the draws made right after
    capture_rng (the reference is the generators themselves), also through torch.load(weights_only)."""
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    random.random(), np.random.rand(7), np.random.randn(3), torch.rand(4)  # move every stream off its seed
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(5).tolist(), np.random.randn(3).tolist(), torch.rand(4))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(5).tolist(), np.random.randn(3).tolist(), torch.rand(4))
    assert got[0] == expected[0]
    assert got[1] == expected[1] and got[2] == expected[2]
    assert torch.equal(got[3], expected[3])


def test_remove_partial_files_deletes_only_interrupted_writes(tmp_path):
    """A write killed half way leaves ``.<name>.tmp<pid>`` beside one of the run's own files
    (last.pt, best_stage<k>.pt, log.csv, metrics.json); those go, every other file stays, hidden
    ones whose names merely contain ".tmp" included."""
    stale = [tmp_path / ".last.pt.tmp4242", tmp_path / ".log.csv.tmp17", tmp_path / ".best_stage2.pt.tmp5",
             tmp_path / ".metrics.json.tmp99"]
    kept = [tmp_path / "last.pt", tmp_path / "log.csv", tmp_path / "notes.tmp", tmp_path / ".env.tmpl",
            tmp_path / ".gitignore.tmpl", tmp_path / ".notes.tmp_backup", tmp_path / ".model.pt.tmp3",
            tmp_path / ".last.pt.tmp12.bak"]
    for p in stale + kept:
        p.write_text("x")
    (tmp_path / ".last.pt.tmp7").mkdir()  # a folder of that name is not a partial write
    remove_partial_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + [".last.pt.tmp7"])
    remove_partial_files(tmp_path / "absent")  # no directory: nothing to do, no error


def _outputs(out_dir):
    """{relative path: bytes} of every file a run wrote."""
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


def test_a_fresh_run_refuses_an_out_dir_holding_an_earlier_run(tmp_path):
    """Without resume, a second run into the same folder would delete the first run's checkpoints:
    it raises FileExistsError naming the folder, its files and the two ways on, and leaves every
    file as it was; overwrite=True starts afresh on purpose."""
    config = DMILConfig(n_epochs=2, stage1_epochs=1, stage2_epochs=1, **TINY)
    Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit()
    before = _outputs(tmp_path)
    assert {"checkpoints/last.pt", "checkpoints/best_stage1.pt", "metrics.json"} <= set(before)
    for method in ("dmil", "joint"):
        with pytest.raises(FileExistsError) as exc:
            Trainer(_data(), config, method=method, out_dir=tmp_path, echo=None).fit()
        message = str(exc.value)
        for needle in (str(tmp_path), "checkpoints/last.pt", "metrics.json", "resume", "overwrite"):
            assert needle in message, (needle, message)
        assert _outputs(tmp_path) == before
    metrics = Trainer(_data(), config, method="joint", out_dir=tmp_path, echo=None, overwrite=True).fit()
    assert metrics["method"] == "joint"
    assert json.loads((tmp_path / "metrics.json").read_text())["method"] == "joint"
    assert not list((tmp_path / "checkpoints").glob("best_stage2.pt"))  # dmil's stage-2 best is gone


def test_resume_without_last_pt_refuses_an_earlier_runs_other_outputs(tmp_path):
    """resume=True continues last.pt; with no last.pt but an earlier run's best checkpoints or
    metrics, starting from scratch would delete them, so it is refused too."""
    config = DMILConfig(n_epochs=2, stage1_epochs=1, stage2_epochs=1, **TINY)
    Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit()
    (tmp_path / "checkpoints" / "last.pt").unlink()
    before = _outputs(tmp_path)
    with pytest.raises(FileExistsError, match="no checkpoints/last.pt to resume from"):
        Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit(resume=True)
    assert _outputs(tmp_path) == before


def test_overwrite_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        Trainer(_data(), CONFIG, method="dmil", out_dir=tmp_path, echo=None, overwrite="yes")


def test_resume_refuses_a_checkpoint_trained_on_features_of_other_widths(tmp_path):
    """The saved model's feature widths are checked before its weights are loaded: a ValueError
    naming the file and ``dims``, not a size mismatch from load_state_dict."""
    config = DMILConfig(n_epochs=2, stage1_epochs=1, stage2_epochs=1, **TINY)
    Trainer(_data(), config, method="dmil", out_dir=tmp_path, echo=None).fit()
    d = _data()
    narrower = FeatureData.from_tensors(
        *[(s.x1, s.x2[:, :5], s.y, s.types) for s in (d.train, d.val, d.test)], num_classes=3,
        type_names=d.type_names)
    assert narrower.dims == (6, 5) and d.dims == (6, 6)
    with pytest.raises(ValueError, match="dims") as exc:
        Trainer(narrower, config, method="dmil", out_dir=tmp_path, echo=None).fit(resume=True)
    assert "last.pt" in str(exc.value)
