"""The dmil-fast command end to end on tiny synthetic sets, and its error handling."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dmil_fast.cli import main
from dmil_fast.data import make_synthetic

METRIC_KEYS = ("test_accuracy", "per_class_accuracy", "per_type_accuracy", "syn", "final_train_loss",
               "world_size", "seconds")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text("embed_size: 8\nencoder_hidden: 16\ninput_size: 16\njoint_fusion_hidden: 8\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "syn", n=300, dim=8, num_classes=3, seed=1)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("method", ["dmil", "joint", "ensemble"])
def test_train_writes_metrics_and_checkpoints(tiny, small_config, tmp_path, method, capsys):
    out = tmp_path / method
    code = main(["train", "--data", str(tiny), "--method", method, "--epochs", "3", "--out", str(out),
                 "--seed", "5", "--config", str(small_config), "--no-progress", "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert set(metrics["per_type_accuracy"]) == {"redundancy", "unique_1", "unique_2", "synergy"}
    assert metrics["epochs"] == 3 and metrics["seed"] == 5 and metrics["preset"] == "features"
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "log.csv").is_file()
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("epochs,note", [("1", "stage 2 and 3 without epochs (stages 1/2/3: 1/0/0); the test uses "
                                                "the stage-1 model"),
                                          ("2", "stage 3 without epochs (stages 1/2/3: 1/1/0); the test uses the "
                                                "stage-2 model"),
                                          ("3", None)])
def test_a_short_epochs_that_drops_a_dmil_stage_says_so(tiny, small_config, tmp_path, capsys, epochs, note):
    """The features preset runs 6/3/41 epochs of stages 1/2/3; scaled to 1 or 2 epochs a stage is
    left out, which the run says on stderr (the baselines, one stage, never get the note)."""
    for method in ("dmil", "joint"):
        assert main(["train", "--data", str(tiny), "--method", method, "--epochs", epochs, "--out",
                     str(tmp_path / method), "--config", str(small_config), "--no-progress", "--quiet"]) == 0
        err = capsys.readouterr().err
        if note is None or method == "joint":
            assert "note:" not in err, err
        else:
            assert f"note: --epochs {epochs} leaves DMIL {note}" in err, err


def test_train_reads_a_config_file(tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("embed_size: 8\nencoder_hidden: 16\nbatch_size: 32\n")
    out = tmp_path / "o"
    assert main(["train", "--data", str(tiny), "--method", "dmil", "--epochs", "2", "--config", str(cfg),
                 "--out", str(out), "--no-progress", "--quiet"]) == 0
    saved = json.loads((out / "metrics.json").read_text())["config"]
    assert (saved["embed_size"], saved["encoder_hidden"], saved["batch_size"]) == (8, 16, 32)


def test_demo_tiny(tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("embed_size: 8\nencoder_hidden: 16\ninput_size: 16\njoint_fusion_hidden: 8\n")
    assert main(["demo", "--tiny", "--n", "600", "--epochs", "2", "--config", str(cfg), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("joint", "ensemble", "dmil", "overall", "synergy", "Syn."):
        assert word in out
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert all((tmp_path / m / "metrics.json").is_file() for m in ("joint", "ensemble", "dmil"))
    # a second demo into the same folder replaces its own earlier output (other seed: other numbers)
    assert main(["demo", "--tiny", "--n", "600", "--epochs", "1", "--seed", "4", "--config", str(cfg),
                 "--out", str(tmp_path)]) == 0
    assert all(json.loads((tmp_path / m / "metrics.json").read_text())["seed"] == 4
               for m in ("joint", "ensemble", "dmil"))


def test_train_into_an_earlier_runs_out_is_refused_unless_resume_or_overwrite(tiny, small_config, tmp_path,
                                                                               capsys):
    """A second ``train`` into the same --out exits 2 before reading the data and leaves the first
    run's files as they were; --resume continues it, --overwrite replaces it."""
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny), "--method", "joint", "--epochs", "2", "--out", str(out),
            "--config", str(small_config), "--no-progress", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _refused(args[:2] + [str(tmp_path / "absent")] + args[3:], capsys, str(out), "earlier run", "--resume",
             "--overwrite")  # refused before the (missing) data is looked at
    _refused(args, capsys, "--resume", "--overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(args + ["--resume"]) == 0  # the finished run resumes as finished
    assert main(args + ["--overwrite", "--seed", "8"]) == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 8


def test_a_preset_flag_that_disagrees_with_the_config_file_is_refused(tiny, tmp_path, capsys):
    """--preset given on the command line and another preset in --config: one of them would be
    dropped silently, so neither is taken; agreeing ones run."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text("preset: published\n")
    out = tmp_path / "o"
    _refused(["train", "--data", str(tiny), "--method", "joint", "--out", str(out), "--preset", "features",
              "--config", str(cfg), "--no-progress", "--quiet"], capsys, "--preset features", "'published'",
             str(cfg))
    assert not out.exists()


@pytest.mark.parametrize("value", [".inf", "1e400"])
def test_an_infinite_epoch_count_in_the_config_is_a_usage_error(tiny, tmp_path, capsys, value):
    cfg = tmp_path / "inf.yaml"
    cfg.write_text(f"n_epochs: {value}\n")
    _refused(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path / "o"), "--config", str(cfg),
              "--no-progress", "--quiet"], capsys, "n_epochs", "must be int")


def _bad(tiny, tmp_path, name, edit):
    d = _copy(tiny, tmp_path / name)
    edit(d)
    return d


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"),
    ("lengths", "modality_2.npy"),
    ("labels", "labels.npy"),
    ("nan", "NaN"),
    ("empty_split", "no samples"),
    ("no_labels", "labels"),
    ("short_labels", "labels.npy has 290"),
    ("int_features", "modality_1.npy must hold floating-point"),
    ("3d_features", "modality_2.npy must be 2-D"),
    ("float_labels", "labels.npy must hold integers"),
])
def test_bad_data_is_reported_before_training(tiny, tmp_path, capsys, case, message):
    edits = {
        "lengths": lambda d: np.save(d / "modality_2.npy", np.load(d / "modality_2.npy")[:-5]),
        "labels": lambda d: np.save(d / "labels.npy", np.load(d / "labels.npy") + 10),
        "nan": lambda d: np.save(d / "modality_1.npy", np.where(np.arange(300)[:, None] == 7, np.nan,
                                                                 np.load(d / "modality_1.npy")).astype(np.float32)),
        "empty_split": lambda d: np.save(d / "split.npy", np.load(d / "split.npy") % 2),
        "no_labels": lambda d: (d / "labels.npy").unlink(),
        "short_labels": lambda d: np.save(d / "labels.npy", np.load(d / "labels.npy")[:290]),
        "int_features": lambda d: np.save(d / "modality_1.npy", np.load(d / "modality_1.npy").astype(np.int32)),
        "3d_features": lambda d: np.save(d / "modality_2.npy", np.load(d / "modality_2.npy")[:, :, None]),
        "float_labels": lambda d: np.save(d / "labels.npy", np.load(d / "labels.npy").astype(np.float32)),
    }
    data = tmp_path / "absent" if case == "missing" else _bad(tiny, tmp_path, case, edits[case])
    out = tmp_path / "out"
    code = main(["train", "--data", str(data), "--method", "dmil", "--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (out / "log.csv").exists()  # nothing trained


def test_bad_hdf5_is_reported_before_training(tiny, tmp_path, capsys):
    import h5py

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["modality_1"] = np.load(tiny / "modality_1.npy")
        f["modality_2"] = np.load(tiny / "modality_2.npy")[:, :4].T  # (4, 300): wrong orientation
        f["labels"] = np.load(tiny / "labels.npy")
    code = main(["train", "--data", str(path), "--method", "dmil", "--out", str(tmp_path / "o"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.h5" in err and "modality_2" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "log.csv").exists()


def test_scale_flags_reach_the_trainer(tiny, small_config, tmp_path, monkeypatch):
    import dmil_fast.train as train_module

    seen = {}

    class Recording(train_module.Trainer):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

        def fit(self, *, resume=False):  # the options arrived; the run itself is tested elsewhere
            seen["resume"] = resume
            seen["stream"] = self.data.stream
            return {"test_accuracy": 0.5, "syn": 0.0, "per_type_accuracy": {}}

    monkeypatch.setattr(train_module, "Trainer", Recording)
    out = tmp_path / "o"
    assert main(["train", "--data", str(tiny), "--method", "joint", "--epochs", "1", "--out", str(out),
                 "--config", str(small_config), "--no-progress", "--quiet", "--checkpoint-every", "3",
                 "--amp", "bf16", "--compile", "aot_eager", "--stream", "--workers", "1", "--resume"]) == 0
    assert seen["checkpoint_every"] == 3 and seen["amp"] == "bf16" and seen["compile"] == "aot_eager"
    assert seen["workers"] == 1 and seen["resume"] is True and seen["stream"] is True
    assert seen["dist"].world_size == 1 and type(seen["dist"]).__name__ == "DistContext"


def test_a_diverged_run_is_an_error_message_and_keeps_its_checkpoints(tiny, small_config, tmp_path,
                                                                      monkeypatch, capsys):
    import torch

    import dmil_fast.train as train_module

    class Diverging(train_module.Trainer):
        def train_step(self, x1, x2, y):  # the weights become NaN in epoch 2
            if self.epoch == 2:
                with torch.no_grad():
                    for p in self.model.parameters():
                        p.fill_(float("nan"))
            return super().train_step(x1, x2, y)

    monkeypatch.setattr(train_module, "Trainer", Diverging)
    out = tmp_path / "o"
    code = main(["train", "--data", str(tiny), "--method", "dmil", "--epochs", "3", "--out", str(out),
                 "--config", str(small_config), "--no-progress", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "error: training diverged at epoch 2 (stage " in err and "holds NaN" in err
    assert (out / "checkpoints" / "last.pt").is_file()


def test_bad_arguments(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tiny), "--method", "svm", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "svm" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stage9_lr: 1\n")
    assert main(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "stage9_lr" in err and "bad.yaml" in err
    for flag, value in (("--checkpoint-every", "-1"), ("--workers", "-3"), ("--num-frames", "0"), ("--threads", "0")):
        assert main(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err
    assert main(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path / "p"),
                 "--pretrained", str(tmp_path / "r18.pth")]) == 2
    assert "CREMA-D" in capsys.readouterr().err


def test_score_reports_missing_data_as_an_error(tmp_path, capsys):
    assert main(["score", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "dmil_fast", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    for command in ("train", "demo", "score", "bench", "info"):
        assert command in result.stdout


def test_info_calls_the_info_module(monkeypatch):
    import dmil_fast.info

    seen = []
    monkeypatch.setattr(dmil_fast.info, "main", lambda argv: seen.append(argv) or 0)
    assert main(["info", "--json"]) == 0 and seen == [["--json"]]


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from dmil_fast.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"train", "demo", "score", "bench", "info"}
    missing = [f"{name} {action.option_strings[-1]}" for name, sub in commands.items() for action in sub._actions
               if action.option_strings and not action.help]
    assert missing == []


def _refused(args, capsys, *needles):
    """``main(args)`` exits 2 with an ``error:`` line holding every needle, and no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("extra,needles", [
    (["--device", "gpu"], ("--device must be 'auto' or a torch device", "'gpu'")),
    (["--device", "cuda:99"], ("--device 'cuda:99' is not available",)),
    (["--compile", "no_such_backend"], ("--compile must name a torch.compile backend such as inductor, "
                                         "aot_eager or eager",)),
    (["--backend", "cpp"], ("--backend must be one of reference, triton", "'cpp'")),
    (["--backend", "gpu"], ("--backend must be one of reference, triton", "'gpu'")),
    (["--num-frames", "4"], ("--num-frames applies to raw CREMA-D",)),
    (["--frame-dir", "frames"], ("--frame-dir applies to raw CREMA-D",)),
    (["--seed", "-1"], ("--seed must be an int >= 0",)),
])
def test_bad_train_settings_are_refused_before_anything_is_written(tiny, tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    _refused(["train", "--data", str(tiny), "--method", "dmil", "--out", str(out), "--epochs", "1", *extra],
             capsys, *needles)
    assert not out.exists()


def test_train_refuses_an_out_path_that_is_a_file_and_a_baseline_backend(tiny, tmp_path, capsys):
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    for command in (["train", "--data", str(tiny), "--method", "dmil"], ["score", "--data", str(tiny)],
                    ["demo", "--tiny"]):
        _refused([*command, "--out", str(afile)], capsys, f"--out {afile} is a file")
    assert afile.read_text() == "keep me"
    _refused(["train", "--data", str(tiny), "--method", "joint", "--out", str(tmp_path / "o"),
              "--backend", "triton"], capsys, "--backend applies to the DMIL model", "joint")


def test_an_ops_backend_that_cannot_run_here_is_refused_before_the_first_step(tiny, small_config, tmp_path,
                                                                              capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton cannot run CPU tensors without it
    out = tmp_path / "o"
    loaded = []
    monkeypatch.setattr("dmil_fast.cli._load_data", lambda *a: loaded.append(a))
    _refused(["train", "--data", str(tiny), "--method", "dmil", "--out", str(out), "--epochs", "1",
              "--config", str(small_config), "--device", "cpu", "--backend", "triton", "--no-progress"],
             capsys, "backend 'triton' cannot run", "TRITON_INTERPRET=1 is not set")
    assert not loaded and not out.exists()  # refused before the data is read
    monkeypatch.setenv("DMIL_FAST_BACKEND", "cpp")
    _refused(["train", "--data", str(tiny), "--method", "dmil", "--out", str(out), "--epochs", "1"],
             capsys, "DMIL_FAST_BACKEND='cpp'")


def test_a_config_inconsistent_with_the_preset_says_which_values_came_from_it(tiny, tmp_path, capsys):
    cfg = tmp_path / "long.yaml"
    cfg.write_text("stage1_epochs: 60\n")
    _refused(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path / "o"), "--config", str(cfg),
              "--epochs", "4"], capsys, "long.yaml", "stage1_epochs (60)", "(n_epochs not in the file: the "
              "'features' preset's value)")
    cfg.write_text("n_epochs: 0\n")  # an error of the file's own value: no hint about the preset
    code = main(["train", "--data", str(tiny), "--method", "dmil", "--out", str(tmp_path / "o"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and "n_epochs must be a positive int" in err and "preset's value" not in err


@pytest.mark.parametrize("extra,needles", [
    (["--batch-size", "0"], ("--batch-size must be an int >= 1", "0")),
    (["--batch-size", "-5"], ("--batch-size must be an int >= 1",)),
    (["--seed", "-1"], ("--seed must be an int >= 0",)),
    (["--threads", "0"], ("--threads must be an int >= 1",)),
    (["--device", "gpu"], ("--device must be 'auto' or a torch device",)),
    (["--device", "cuda:99"], ("--device 'cuda:99' is not available",)),
])
def test_bad_score_settings_are_refused(tiny, tmp_path, capsys, extra, needles):
    out = tmp_path / "o"
    _refused(["score", "--data", str(tiny), "--out", str(out), "--no-progress", *extra], capsys, *needles)
    assert not out.exists()


@pytest.mark.parametrize("extra,needles", [
    (["--n", "10"], ("--n must be an int >= 200",)),
    (["--device", "gpu"], ("--device must be 'auto' or a torch device",)),
    (["--config", "MISSING"], ("config file not found",)),
])
def test_bad_demo_settings_are_refused_before_the_data_is_made(tmp_path, capsys, extra, needles):
    out = tmp_path / "demo"
    extra = [str(tmp_path / "absent.yaml") if e == "MISSING" else e for e in extra]
    _refused(["demo", "--tiny", "--out", str(out), *extra], capsys, *needles)
    assert not (out / "data").exists()


def test_score_takes_a_plain_state_dict_of_the_official_model(tiny, tmp_path, capsys):
    """An official-layout feature model saved as a bare state_dict is rebuilt and scored: the CSV
    equals score_model on the saved model itself, with the same seed and density epochs."""
    import csv

    import torch

    import dmil_fast as dm
    from dmil_fast.data import FeatureDataset

    torch.manual_seed(3)
    model = dm.DMILModel(None, None, embed_size=8, num_class=3, input_size=8, stage=3).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    out = tmp_path / "scored"
    assert main(["score", "--data", str(tiny), "--model", str(tmp_path / "plain.pt"), "--out", str(out),
                 "--epochs", "2", "--seed", "4", "--no-progress", "--device", "cpu"]) == 0
    want, rows = dm.interactions.score_model(model, FeatureDataset(tiny), density_epochs=2, seed=4,
                                             device="cpu", progress=False)
    with open(out / "interactions.csv") as f:
        got = list(csv.DictReader(f))
    assert [int(r["index"]) for r in got] == [int(i) for i in rows]
    for name, field in (("redundancy", "r"), ("unique_1", "u1"), ("unique_2", "u2"), ("synergy", "s")):
        column = torch.tensor([float(r[field]) for r in got], dtype=torch.float64)
        torch.testing.assert_close(column, getattr(want, name).double(), rtol=0, atol=5e-7)
        assert not any(r[field].startswith("-0.000000") for r in got), field
    with torch.no_grad():
        model.IB_m1_tr.fc.weight.fill_(float("nan"))  # e.g. the last checkpoint of a diverged run
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    _refused(["score", "--data", str(tiny), "--model", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "n"),
              "--device", "cpu"], capsys, "nan.pt holds NaN weights", "of an op in the model's forward is NaN")
    with torch.no_grad():  # NaN past every op that checks values (as any NaN weight on a GPU)
        model.IB_m1_tr.fc.weight.normal_()
        model.cross_modality.fc_out.weight.fill_(float("nan"))
    torch.save(model.state_dict(), tmp_path / "nan_out.pt")
    _refused(["score", "--data", str(tiny), "--model", str(tmp_path / "nan_out.pt"), "--out", str(tmp_path / "m"),
              "--device", "cpu"], capsys, "nan_out.pt holds NaN or infinite weights", "are not finite")
    other = dm.DMILModel(None, None, embed_size=8, num_class=3, input_size=8, stage=3, synergy_hidden=4)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    _refused(["score", "--data", str(tiny), "--model", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x")],
             capsys, "records no architecture", "dmil-fast train")


def test_in_memory_and_stream_flags_reach_the_data(tiny, tmp_path, monkeypatch):
    import dmil_fast.train as train_module

    seen = {}

    class Recording(train_module.Trainer):
        def fit(self, *, resume=False):
            seen["stream"] = self.data.stream
            return {"test_accuracy": 0.5, "syn": 0.0, "per_type_accuracy": {}}

    monkeypatch.setattr(train_module, "Trainer", Recording)
    import dmil_fast.train.data as data_module

    for threshold, default in ((2 << 30, False), (0, True)):  # the tiny set under / over the threshold
        monkeypatch.setattr(data_module, "STREAM_THRESHOLD_BYTES", threshold)
        for flags, expected in ((["--in-memory"], False), (["--stream"], True), ([], default)):
            assert main(["train", "--data", str(tiny), "--method", "joint", "--epochs", "1", "--out",
                         str(tmp_path), "--no-progress", "--quiet", *flags]) == 0
            assert seen["stream"] is expected, (threshold, flags)


def test_demo_seed_reaches_the_data_and_the_thread_count_is_restored(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("embed_size: 8\nencoder_hidden: 16\ninput_size: 16\njoint_fusion_hidden: 8\n")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--n", "300", "--epochs", "1", "--seed", "3", "--config", str(cfg), "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["params"]["seed"] == 3
    assert json.loads((tmp_path / "dmil" / "metrics.json").read_text())["seed"] == 3


def test_score_model_refusals_name_the_real_problem(tiny, tmp_path, capsys, monkeypatch):
    import torch

    import dmil_fast as dm

    four = dm.DMILModel(None, None, embed_size=8, num_class=4, input_size=8, stage=3)
    torch.save(four.state_dict(), tmp_path / "four.pt")
    _refused(["score", "--data", str(tiny), "--model", str(tmp_path / "four.pt"), "--out", str(tmp_path / "a")],
             capsys, "predicts 4 classes", "has 3")
    three = dm.DMILModel(None, None, embed_size=8, num_class=3, input_size=8, stage=3)
    torch.save(three.state_dict(), tmp_path / "three.pt")
    monkeypatch.setenv("DMIL_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _refused(["score", "--data", str(tiny), "--model", str(tmp_path / "three.pt"), "--out", str(tmp_path / "b"),
              "--device", "cpu"], capsys, "backend 'triton' cannot run")
