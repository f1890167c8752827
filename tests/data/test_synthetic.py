"""make_synthetic: file format, determinism, type mixing and the intended information structure.

The structure checks use an independent nearest-centroid decoder fitted in the test on labelled
redundant training rows, never the generator's prototypes.
"""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from dmil_fast.data import INTERACTION_TYPES, FeatureDataset, make_synthetic
from dmil_fast.data import synthetic as synthetic_module

FILES = ("modality_1.npy", "modality_2.npy", "labels.npy", "split.npy", "interaction_type.npy")
ALL_FILES = FILES + ("meta.json",)


def _load(path):
    return {f[:-4]: np.load(path / f) for f in FILES}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    path = make_synthetic(tmp_path_factory.mktemp("syn"), seed=3)
    return path, _load(path)


def test_files_shapes_dtypes(default_set):
    path, a = default_set
    assert a["modality_1"].shape == (6000, 32) and a["modality_1"].dtype == np.float32
    assert a["modality_2"].shape == (6000, 32) and a["modality_2"].dtype == np.float32
    assert a["labels"].shape == (6000,) and a["labels"].dtype == np.int64
    assert a["split"].dtype == np.int8 and a["interaction_type"].dtype == np.int8
    assert set(np.unique(a["labels"])) == set(range(6))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["class_names"] == [f"class_{k}" for k in range(6)]
    assert meta["modality_names"] == ["visual", "audio"]
    assert meta["interaction_types"] == ["redundancy", "unique_1", "unique_2", "synergy"]
    assert meta["params"]["n"] == 6000 and meta["params"]["noise"] == 0.5 and meta["params"]["seed"] == 3


def test_split_fractions_and_type_mix(default_set):
    _, a = default_set
    assert np.bincount(a["split"], minlength=3).tolist() == [4200, 900, 900]
    assert np.bincount(a["interaction_type"], minlength=4).tolist() == [1500] * 4
    # Mixed: every type in every split, and the types are not in contiguous runs.
    for s in range(3):
        assert np.bincount(a["interaction_type"][a["split"] == s], minlength=4).min() > 150
    assert (np.diff(a["interaction_type"][:200].astype(int)) != 0).sum() > 100


def test_mix_weights_are_normalised_and_zero_weight_excluded(tmp_path):
    a = _load(make_synthetic(tmp_path, n=1001, mix=(2, 0, 1, 1), val_fraction=0.1, test_fraction=0.0))
    counts = np.bincount(a["interaction_type"], minlength=4)
    assert counts[1] == 0 and counts.sum() == 1001
    assert abs(counts[0] - 500.5) <= 1 and abs(counts[2] - 250.25) <= 1 and abs(counts[3] - 250.25) <= 1
    assert np.bincount(a["split"], minlength=3).tolist() == [901, 100, 0]


def test_deterministic_per_seed(tmp_path):
    a = _load(make_synthetic(tmp_path / "a", n=500, seed=7))
    b = _load(make_synthetic(tmp_path / "b", n=500, seed=7))
    c = _load(make_synthetic(tmp_path / "c", n=500, seed=8))
    for k in FILES:
        np.testing.assert_array_equal(a[k[:-4]], b[k[:-4]])
    assert not np.array_equal(a["modality_1"], c["modality_1"])
    assert not np.array_equal(a["labels"], c["labels"])


def test_result_does_not_depend_on_block_size(tmp_path, monkeypatch):
    ref = _load(make_synthetic(tmp_path / "ref", n=700, seed=1))
    monkeypatch.setattr(synthetic_module, "CHUNK_ROWS", 64)
    small = _load(make_synthetic(tmp_path / "small", n=700, seed=1))
    for k in FILES:
        np.testing.assert_array_equal(ref[k[:-4]], small[k[:-4]])


def _centroid_decoder(x, sym, mask, num_classes):
    cent = np.stack([x[mask & (sym == k)].mean(0) for k in range(num_classes)])
    return lambda z: ((z[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)


def _kmeans(x, k, *, iters=25, seed=0):
    """Plain k-means with farthest-point initialisation (an independent decoder for the operands)."""
    rng = np.random.default_rng(seed)
    cent = [x[rng.integers(len(x))]]
    for _ in range(k - 1):
        d = np.min(((x[:, None, :] - np.stack(cent)[None]) ** 2).sum(-1), axis=1)
        cent.append(x[d.argmax()])
    cent = np.stack(cent)
    for _ in range(iters):
        assign = ((x[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)
        cent = np.stack([x[assign == j].mean(0) if (assign == j).any() else cent[j] for j in range(k)])
    return assign


def test_information_structure(default_set):
    _, a = default_set
    y, t, split = a["labels"], a["interaction_type"], a["split"]
    fit = (split == 0) & (t == 0)  # labelled redundant training rows: both modalities carry y
    dec1 = _centroid_decoder(a["modality_1"], y, fit, 6)
    dec2 = _centroid_decoder(a["modality_2"], y, fit, 6)
    held = split != 0
    p1, p2 = dec1(a["modality_1"]), dec2(a["modality_2"])

    def acc(pred, kind):
        m = held & (t == INTERACTION_TYPES.index(kind))
        return float((pred[m] == y[m]).mean())

    assert acc(p1, "redundancy") > 0.95 and acc(p2, "redundancy") > 0.95
    assert acc(p1, "unique_1") > 0.95 and acc(p2, "unique_2") > 0.95
    # The uninformative side of a unique sample carries no class information: a decoder of it
    # stays far below the informative side (its exact rate depends on where pure noise falls).
    assert acc(p2, "unique_1") < 0.5 and acc(p1, "unique_2") < 0.5

    # Synergy: cluster each modality's synergistic rows into C operand symbols. Each modality alone
    # says (almost) nothing about y, the pair of clusters determines it.
    m = t == 3
    c1 = _kmeans(a["modality_1"][m], 6, seed=1)
    c2 = _kmeans(a["modality_2"][m], 6, seed=2)
    ys = y[m]

    def purity(keys):
        hits = 0
        for key in np.unique(keys):
            hits += np.bincount(ys[keys == key]).max()
        return hits / len(ys)

    assert purity(c1) < 0.3 and purity(c2) < 0.3  # chance is 1/6 plus small-sample excess
    assert purity(c1 * 6 + c2) > 0.95


def test_noise_only_modality_has_no_prototype(default_set):
    _, a = default_set
    noise, dim = 0.5, a["modality_1"].shape[1]
    t = a["interaction_type"]
    n2 = np.linalg.norm(a["modality_2"][t == 1], axis=1)  # unique_1: modality 2 is noise only
    n1 = np.linalg.norm(a["modality_1"][t == 2], axis=1)
    for norms in (n1, n2):
        assert abs(norms.mean() - noise * np.sqrt(dim)) < 0.1 * noise * np.sqrt(dim)


def test_imbalance_gives_geometric_class_frequencies(tmp_path):
    a = _load(make_synthetic(tmp_path, n=8000, num_classes=4, imbalance=0.5, seed=2))
    freq = np.bincount(a["labels"], minlength=4) / 8000
    np.testing.assert_allclose(freq, np.array([8, 4, 2, 1]) / 15, atol=0.02)


def test_vggsound_shape_preset(tmp_path):
    path = make_synthetic(tmp_path, like="vggsound", n=2130)
    x1 = np.load(path / "modality_1.npy", mmap_mode="r")
    assert x1.shape == (2130, 512)
    meta = json.loads((path / "meta.json").read_text())
    assert len(meta["class_names"]) == 309
    assert np.bincount(np.load(path / "split.npy"), minlength=3).tolist() == [1830, 150, 150]
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(tmp_path / "bad", like="vggsound", n=100, num_classes=10)


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"dim": 0}, "dim"), ({"num_classes": 1}, "num_classes"), ({"noise": -0.1}, "noise"),
    ({"mix": (1, 1, 1)}, "mix"), ({"mix": (1, -1, 1, 1)}, "mix"), ({"mix": (0, 0, 0, 0)}, "mix"),
    ({"imbalance": 1.0}, "imbalance"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"test_fraction": -0.1}, "test_fraction"), ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
    ({"like": "imagenet"}, "like"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_synthetic(tmp_path, **{"n": 100, **kwargs})
    assert not (tmp_path / "labels.npy").exists()


def test_wrong_argument_type(tmp_path):
    with pytest.raises(TypeError, match="n must be an int"):
        make_synthetic(tmp_path, n=10.5)


def test_the_two_modalities_draw_independent_noise(tmp_path):
    """On unique_1 samples modality 2 is noise only: modality 1's residual from its class mean
    must not correlate with it."""
    path = make_synthetic(tmp_path, n=3000, seed=3)
    x1, x2 = np.load(path / "modality_1.npy"), np.load(path / "modality_2.npy")
    y, kind = np.load(path / "labels.npy"), np.load(path / "interaction_type.npy")
    rows = kind == INTERACTION_TYPES.index("unique_1")
    residual = x1[rows] - np.stack([x1[rows & (y == k)].mean(0) for k in range(6)])[y[rows]]
    assert abs(np.corrcoef(residual.ravel(), x2[rows].ravel())[0, 1]) < 0.05


# --- writing: atomic replacement, refusal to overwrite, interruptions -------------------------

def _snapshot(folder):
    """Every entry under ``folder`` (hidden ones included) with its bytes: what must not change."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


class _InterruptAfter:
    """Wraps a function so that its call number ``calls + 1`` raises KeyboardInterrupt (as Ctrl-C would)."""

    def __init__(self, fn, calls):
        self.fn, self.left = fn, calls

    def __call__(self, *args, **kwargs):
        self.left -= 1
        if self.left == -1:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def test_interrupted_regeneration_leaves_the_earlier_set_byte_for_byte(tmp_path, monkeypatch):
    target = make_synthetic(tmp_path / "syn", n=700, dim=4, seed=0)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(synthetic_module, "CHUNK_ROWS", 64)
    # The writer maps the feature file once per block and modality: interrupted after 3 of 22 blocks.
    monkeypatch.setattr(np, "load", _InterruptAfter(np.load, 3))
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(target, n=700, dim=4, seed=1, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # nothing in the set changed, no staging directory left


def test_interrupted_first_write_leaves_no_set(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_module, "CHUNK_ROWS", 64)
    monkeypatch.setattr(np, "load", _InterruptAfter(np.load, 3))
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path / "syn", n=700, dim=4)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# Six files move in; over an earlier set its six files first move aside: 6 or 12 moves in all.
@pytest.mark.parametrize("earlier, moves", [(False, k) for k in (0, 1, 3, 5)] + [(True, k) for k in (0, 1, 5, 6, 7, 11)])
def test_interrupted_while_moving_files_into_place(tmp_path, monkeypatch, earlier, moves):
    """Ctrl-C between any two of the final moves: the folder is put back as it was."""
    target = tmp_path / "syn"
    if earlier:
        make_synthetic(target, n=300, dim=4, seed=0)
        (target / "notes.txt").write_text("not part of the set")
    before = _snapshot(tmp_path)
    monkeypatch.setattr(os, "replace", _InterruptAfter(os.replace, moves))
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(target, n=300, dim=4, seed=1, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_the_set_and_keeps_other_files(tmp_path):
    target = make_synthetic(tmp_path / "syn", n=500, dim=4, seed=0)
    (target / "notes.txt").write_text("kept")
    make_synthetic(target, n=300, dim=6, seed=1, overwrite=True)
    fresh = make_synthetic(tmp_path / "fresh", n=300, dim=6, seed=1)
    for name in ALL_FILES:
        assert (target / name).read_bytes() == (fresh / name).read_bytes()
    assert (target / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "syn"]
    assert len(FeatureDataset(target)) == 300


@pytest.mark.parametrize("name", ALL_FILES)
def test_refuses_a_folder_holding_a_dataset_file(tmp_path, name):
    target = tmp_path / "real"
    target.mkdir()
    (target / name).write_bytes(b"real features")
    (target / "other.txt").write_text("x")
    before = _snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=rf"real already holds a feature dataset \({name}\).*overwrite=True"):
        make_synthetic(target, n=100, dim=4)
    assert _snapshot(tmp_path) == before


def test_refusal_lists_every_dataset_file_held(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    for name in ("labels.npy", "modality_1.npy", "modality_2.npy"):
        np.save(target / name, np.zeros(3))
    with pytest.raises(FileExistsError, match=r"modality_1\.npy, modality_2\.npy, labels\.npy"):
        make_synthetic(target, n=100, dim=4)


def test_a_folder_without_dataset_files_is_written(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "readme.txt").write_text("x")
    make_synthetic(target, n=100, dim=4)
    assert len(FeatureDataset(target)) == 100 and (target / "readme.txt").read_text() == "x"


@pytest.mark.parametrize("name", ["x.h5", "x.hdf5", "X.H5"])
def test_refuses_an_hdf5_path(tmp_path, name):
    with pytest.raises(ValueError, match=rf"out_dir .*{re.escape(name)}.*directory of \.npy files"):
        make_synthetic(tmp_path / name, n=100, dim=4)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_file_as_out_dir(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists and is not a directory"):
        make_synthetic(tmp_path / "afile", n=100, dim=4)
    assert (tmp_path / "afile").read_text() == "x"


def test_overwrite_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        make_synthetic(tmp_path, n=100, overwrite="yes")


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from dmil_fast.data import synthetic
synthetic.CHUNK_ROWS = 64
load = np.load
calls = []
def load_or_die(*args, **kwargs):  # the writer maps the feature file once per block and modality
    calls.append(1)
    if len(calls) == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return load(*args, **kwargs)
np.load = load_or_die
synthetic.make_synthetic(sys.argv[1], n=700, dim=4, seed=1, overwrite=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_writer_leaves_the_set_and_a_staging_folder_that_is_no_dataset(tmp_path):
    target = make_synthetic(tmp_path / "syn", n=700, dim=4, seed=0)
    before = _snapshot(target)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert _snapshot(target) == before
    stale = [p for p in tmp_path.iterdir() if p.name != "syn"]
    assert len(stale) == 1 and stale[0].is_dir() and stale[0].name.startswith(".syn.partial-")
    assert not any((stale[0] / name).exists() for name in ALL_FILES)
    with pytest.raises(FileNotFoundError):
        FeatureDataset(stale[0])
    # A later call is not blocked by it and writes the complete set.
    make_synthetic(target, n=700, dim=4, seed=1, overwrite=True)
    fresh = make_synthetic(tmp_path / "fresh", n=700, dim=4, seed=1)
    for name in ALL_FILES:
        assert (target / name).read_bytes() == (fresh / name).read_bytes()
