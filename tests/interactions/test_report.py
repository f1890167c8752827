"""Interaction reports and the ``score`` subcommand: CSV, summary JSON and plots."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch

from dmil_fast.data import make_synthetic
from dmil_fast.interactions import report
from dmil_fast.ops import InteractionScores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(values):
    v = torch.as_tensor(values, dtype=torch.float32)
    zeros = torch.zeros(len(v))
    return InteractionScores(zeros, zeros, zeros, v[:, 0], v[:, 1], v[:, 2], v[:, 3])


def _check_pngs(out):
    for name in report.PLOT_NAMES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name


def test_write_report_contents(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(60, 4))
    labels = rng.integers(0, 3, size=60)
    truth = rng.integers(0, 4, size=60)
    split = rng.integers(0, 3, size=60)
    indices = np.arange(100, 160)
    summary = report.write_report(_scores(values), tmp_path, indices=indices, labels=labels, split=split,
                                  class_names=["a", "b", "c"], interaction_type=truth, adjusted=False)
    dominant = values.argmax(1)
    with open(tmp_path / "interactions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60
    names = list(report.DEFAULT_TYPE_NAMES)
    for i, row in enumerate(rows):
        assert int(row["index"]) == indices[i] and int(row["label"]) == labels[i]
        assert row["split"] == ("train", "val", "test")[split[i]]
        np.testing.assert_allclose([float(row[k]) for k in ("r", "u1", "u2", "s")], values[i], atol=1e-5)
        assert row["dominant"] == names[dominant[i]]
        assert row["true_type"] == names[truth[i]]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    assert saved["adjusted"] is False
    np.testing.assert_allclose(list(saved["means"].values()), values.astype(np.float32).mean(0), atol=1e-5)
    confusion = np.zeros((4, 4), dtype=int)
    for t, d in zip(truth, dominant):
        confusion[t, d] += 1
    assert saved["confusion"] == confusion.tolist()
    assert saved["agreement"] == pytest.approx(float((truth == dominant).mean()))
    for k, name in enumerate(["a", "b", "c"]):
        counts = np.bincount(dominant[labels == k], minlength=4)
        assert saved["dominant_counts_per_class"][name] == dict(zip(names, counts.tolist()))
    assert list(saved["means_per_split"]) == ["train", "val", "test"]
    for code, name in enumerate(["train", "val", "test"]):
        np.testing.assert_allclose(list(saved["means_per_split"][name].values()),
                                   values.astype(np.float32)[split == code].mean(0), atol=1e-5)
    _check_pngs(tmp_path)


@pytest.mark.parametrize("type_names", [["noise", "gate", "copy"], ["a", "b", "c", "d", "e", "f"]])
def test_ground_truth_of_other_than_four_types(tmp_path, type_names):
    """K ground-truth types that are not the four components: the dominant type keeps the
    components' names, the confusion matrix is K x 4, and no agreement rate is claimed."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 4))
    truth = rng.integers(0, len(type_names), size=40)
    summary = report.write_report(_scores(values), tmp_path, indices=np.arange(40), labels=np.zeros(40, dtype=int),
                                  interaction_type=truth, type_names=type_names)
    dominant = values.argmax(1)
    with open(tmp_path / "interactions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["dominant"] for r in rows] == [report.DEFAULT_TYPE_NAMES[d] for d in dominant]
    assert [r["true_type"] for r in rows] == [type_names[t] for t in truth]
    confusion = np.zeros((len(type_names), 4), dtype=int)
    np.add.at(confusion, (truth, dominant), 1)
    assert summary["confusion"] == confusion.tolist()
    assert summary["type_names"] == type_names
    assert list(summary["dominant_counts"]) == list(report.DEFAULT_TYPE_NAMES)
    assert "agreement" not in summary and "agreement_per_type" not in summary
    _check_pngs(tmp_path)


def test_write_report_validates(tmp_path):
    with pytest.raises(ValueError, match="labels must have shape"):
        report.write_report(_scores(np.zeros((5, 4))), tmp_path, indices=np.arange(5), labels=np.zeros(4))
    with pytest.raises(ValueError, match="interaction_type codes"):
        report.write_report(_scores(np.zeros((5, 4))), tmp_path, indices=np.arange(5), labels=np.zeros(5),
                            interaction_type=np.full(5, 4))
    with pytest.raises(ValueError, match=r"interaction_type codes must lie in \[0, 2\)"):
        report.write_report(_scores(np.zeros((5, 4))), tmp_path, indices=np.arange(5), labels=np.zeros(5),
                            interaction_type=np.full(5, 2), type_names=["x", "y"])


@pytest.mark.parametrize("code", [-1, 3])
def test_write_report_refuses_split_codes_outside_train_val_test(tmp_path, code):
    split = np.array([0, 1, 2, code, 0])
    with pytest.raises(ValueError, match=rf"split codes must lie in \[0, 3\).*got \[{min(code, 0)}, {max(code, 2)}\]"):
        report.write_report(_scores(np.zeros((5, 4))), tmp_path / "out", indices=np.arange(5),
                            labels=np.zeros(5, dtype=int), split=split)
    assert not (tmp_path / "out").exists()


def test_score_command_on_one_class_names_the_data(tmp_path, capsys):
    from dmil_fast.cli import main

    data = tmp_path / "one_class"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "modality_1.npy", rng.normal(size=(40, 3)).astype(np.float32))
    np.save(data / "modality_2.npy", rng.normal(size=(40, 2)).astype(np.float32))
    np.save(data / "labels.npy", np.zeros(40, dtype=np.int64))
    code = main(["score", "--data", str(data), "--out", str(tmp_path / "out"), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: --data {data} has 1 class; interaction scoring needs at least 2 classes")
    assert "num_classes" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / report.CSV_NAME).exists()


def _args(data, out, **extra):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    argv = ["--data", str(data), "--out", str(out), "--no-progress"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    args = parser.parse_args(argv)
    assert args.progress is False
    return args


def test_score_command_without_model(tmp_path):
    data = make_synthetic(tmp_path / "syn", n=240, dim=4, num_classes=3, seed=0)
    args = _args(data, tmp_path / "out", epochs=2, seed=1, batch_size=64)
    assert (args.model, args.redundancy, args.epochs, args.seed, args.batch_size) == (None, "lsmi", 2, 1, 64)
    assert report.main(args) == 0
    out = tmp_path / "out"
    with open(out / "interactions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 240
    assert sorted(int(r["index"]) for r in rows) == list(range(240))
    split = np.load(data / "split.npy")
    assert all(r["split"] == ("train", "val", "test")[split[int(r["index"])]] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 240 and summary["adjusted"] is True
    assert np.asarray(summary["confusion"]).sum() == 240
    _check_pngs(out)


def test_score_command_with_checkpoint(tmp_path):
    from dmil_fast.train import DMILConfig, build_model, save_checkpoint

    data = make_synthetic(tmp_path / "syn", n=120, dim=4, num_classes=3, seed=0)
    config = DMILConfig()
    for dims, name in (((4, 4), "good.pt"), ((6, 6), "other.pt")):
        model = build_model("joint", dims, 3, config)
        spec = {"method": "joint", "dims": list(dims), "num_classes": 3, "stage": 1, "config": config.to_dict()}
        save_checkpoint(tmp_path / name, {"state_dict": model.state_dict(), "model": spec})
    args = _args(data, tmp_path / "out", model=tmp_path / "good.pt", epochs=2, redundancy="mmi")
    assert report.main(args) == 0
    assert len((tmp_path / "out" / "interactions.csv").read_text().splitlines()) == 121
    with pytest.raises(ValueError, match="other.pt"):
        report.main(_args(data, tmp_path / "out2", model=tmp_path / "other.pt", epochs=2))


def test_values_that_round_to_zero_are_written_without_a_sign(tmp_path):
    values = [[-1e-9, -4e-7, 2e-7, -0.25], [0.0, -0.0, 1.0, -6e-7]]
    report.write_report(_scores(values), tmp_path, indices=np.arange(2), labels=np.zeros(2, dtype=int),
                        adjusted=False)
    with open(tmp_path / "interactions.csv") as f:
        rows = [[r[k] for k in ("r", "u1", "u2", "s")] for r in csv.DictReader(f)]
    assert rows == [["0.000000", "0.000000", "0.000000", "-0.250000"],
                    ["0.000000", "0.000000", "1.000000", "-0.000001"]]


@pytest.mark.parametrize("flag,value,message", [
    ("batch_size", 0, "--batch-size must be an int >= 1, got 0"),
    ("seed", -1, "--seed must be an int >= 0, got -1"),
    ("threads", 0, "--threads must be an int >= 1, got 0"),
    ("epochs", 0, "--epochs must be an int >= 1, got 0"),
    ("device", "gpu", "--device must be 'auto' or a torch device"),
])
def test_the_score_entry_point_checks_its_own_settings(tmp_path, flag, value, message):
    """report.main is public: a Namespace that skipped the command line's checks is still refused."""
    args = _args(tmp_path / "not_read", tmp_path / "out")
    setattr(args, flag, value)
    with pytest.raises(ValueError, match=message):
        report.main(args)
    assert not (tmp_path / "out").exists()


def test_score_refuses_an_out_file_and_sets_then_restores_the_threads(tmp_path, monkeypatch):
    data = make_synthetic(tmp_path / "syn", n=60, dim=4, num_classes=3, seed=0)
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    with pytest.raises(NotADirectoryError, match=f"--out {afile} is a file"):
        report.main(_args(data, afile))
    assert afile.read_text() == "keep me"
    seen = []
    monkeypatch.setattr(report, "_score_and_report", lambda args, **kw: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert report.main(_args(data, tmp_path / "out", threads=other)) == 0
    assert seen == [other] and torch.get_num_threads() == before
