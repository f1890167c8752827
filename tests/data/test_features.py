"""FeatureDataset: npy / HDF5 round trips, memory mapping, split selection and every error path.

The files are written by hand in the tests (plain numpy / h5py), independent of make_synthetic.
"""

import json
import pickle
import sys

import h5py  # a test dependency (pyproject "test" extra)
import numpy as np
import pytest
import torch

from dmil_fast.data import FeatureDataset, hash_split
from dmil_fast.data import features as features_module

N, D1, D2, C = 40, 5, 3, 4


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "modality_1": rng.standard_normal((N, D1)).astype(np.float32),
        "modality_2": rng.standard_normal((N, D2)),  # float64 on disk: returned as float32
        "labels": rng.integers(0, C, N).astype(np.int64),
        "split": np.arange(N, dtype=np.int8) % 3,
        "interaction_type": (np.arange(N) // 10).astype(np.int8),
    }


def _write_dir(path, arrays, meta=None):
    path.mkdir(parents=True, exist_ok=True)
    for name, value in arrays.items():
        np.save(path / f"{name}.npy", value)
    if meta is not None:
        (path / "meta.json").write_text(json.dumps(meta))
    return path


META = {"class_names": ["a", "b", "c", "d"], "modality_names": ["visual", "audio"],
        "interaction_types": ["redundancy", "unique_1", "unique_2", "synergy"]}


@pytest.fixture
def feature_dir(tmp_path):
    arrays = _arrays()
    return _write_dir(tmp_path / "feats", arrays, META), arrays


def _check_round_trip(ds, arrays, code):
    rows = np.flatnonzero(arrays["split"] == code)
    assert len(ds) == len(rows)
    np.testing.assert_array_equal(ds.indices, rows)
    np.testing.assert_array_equal(ds.labels, arrays["labels"][rows])
    np.testing.assert_array_equal(ds.interaction_type, arrays["interaction_type"][rows])
    for i in (0, len(ds) // 2, len(ds) - 1):
        x1, x2, y, idx = ds[i]
        assert x1.dtype == torch.float32 and x1.shape == (D1,)
        assert x2.dtype == torch.float32 and x2.shape == (D2,)
        assert y.dtype == torch.int64 and y.dim() == 0 and idx.dtype == torch.int64 and idx.dim() == 0
        row = int(idx)
        assert row == rows[i]
        np.testing.assert_array_equal(x1.numpy(), arrays["modality_1"][row])
        np.testing.assert_allclose(x2.numpy(), arrays["modality_2"][row].astype(np.float32))
        assert int(y) == arrays["labels"][row]
    x1, x2, y, idx = ds.as_tensors()
    assert x1.dtype == x2.dtype == torch.float32 and y.dtype == idx.dtype == torch.int64
    np.testing.assert_array_equal(x1.numpy(), arrays["modality_1"][rows])
    np.testing.assert_allclose(x2.numpy(), arrays["modality_2"][rows].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), arrays["labels"][rows])
    np.testing.assert_array_equal(idx.numpy(), rows)


@pytest.mark.parametrize("split, code", [("train", 0), ("val", 1), ("test", 2), (0, 0), (2, 2), (np.int64(1), 1)])
def test_npy_round_trip(feature_dir, split, code):
    path, arrays = feature_dir
    ds = FeatureDataset(path, split)
    _check_round_trip(ds, arrays, code)
    assert ds.dims == (D1, D2) and ds.num_classes == C
    assert ds.class_names == META["class_names"] and ds.modality_names == ["visual", "audio"]
    assert ds.interaction_types == META["interaction_types"]


def test_split_none_is_everything_and_defaults_without_meta(tmp_path):
    arrays = _arrays()
    arrays["labels"][arrays["labels"] == 3] = 2  # the largest label present is 2
    del arrays["interaction_type"]
    ds = FeatureDataset(_write_dir(tmp_path, arrays), None)
    assert len(ds) == N and ds.indices.tolist() == list(range(N))
    assert ds.num_classes == 3 and len(ds.class_names) == 3
    assert ds.modality_names == ["modality_1", "modality_2"]
    assert ds.interaction_type is None
    assert ds.interaction_types == ["redundancy", "unique_1", "unique_2", "synergy"]


def test_npy_is_memory_mapped(feature_dir):
    path, _ = feature_dir
    ds = FeatureDataset(path, "train")
    # Write through a second writable map: a memory-mapped dataset sees it, a loaded copy would not.
    writer = np.load(path / "modality_1.npy", mmap_mode="r+")
    writer[int(ds.indices[0])] = 123.0
    writer.flush()
    del writer
    assert torch.all(ds[0][0] == 123.0)


def test_pickle_reopens_maps_instead_of_copying_data(feature_dir):
    path, arrays = feature_dir
    ds = FeatureDataset(path, "val")
    blob = pickle.dumps(ds)
    assert arrays["modality_1"].tobytes() not in blob  # the features are not in the pickle
    clone = pickle.loads(blob)
    _check_round_trip(clone, arrays, 1)
    batch = next(iter(torch.utils.data.DataLoader(clone, batch_size=4)))
    assert batch[0].shape == (4, D1) and batch[3].tolist() == clone.indices[:4].tolist()


def test_hash_split_without_split_file(tmp_path):
    arrays = _arrays()
    del arrays["split"]
    path = _write_dir(tmp_path, arrays)
    parts = [FeatureDataset(path, s).indices for s in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(N))  # a partition of the rows
    big = hash_split(10_000)
    np.testing.assert_allclose(np.bincount(big, minlength=3) / 10_000, [0.70, 0.15, 0.15], atol=0.002)
    np.testing.assert_array_equal(hash_split(N), big[:N])  # appending rows never moves old ones


def test_hdf5_round_trip_with_attribute_meta(tmp_path):
    arrays = _arrays(1)
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)
        f.attrs["meta"] = json.dumps(META)
    ds = FeatureDataset(path, "test")
    _check_round_trip(ds, arrays, 2)
    assert ds.class_names == META["class_names"] and ds.num_classes == C
    _check_round_trip(pickle.loads(pickle.dumps(ds)), arrays, 2)


def test_hdf5_meta_json_beside_file(tmp_path):
    arrays = _arrays(2)
    path = tmp_path / "feats.hdf5"
    with h5py.File(path, "w") as f:
        for name in ("modality_1", "modality_2", "labels", "split"):
            f.create_dataset(name, data=arrays[name])
    (tmp_path / "meta.json").write_text(json.dumps({"class_names": list("abcdefg")}))
    ds = FeatureDataset(path, "train")
    assert ds.num_classes == 7 and ds.interaction_type is None
    np.testing.assert_array_equal(ds.as_tensors()[0].numpy(), arrays["modality_1"][arrays["split"] == 0])


def test_hdf5_without_h5py_names_the_dependency(tmp_path, monkeypatch):
    path = tmp_path / "feats.h5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="h5py"):
        FeatureDataset(path)


def test_block_reads_across_many_blocks(feature_dir, monkeypatch):
    path, arrays = feature_dir
    monkeypatch.setattr(features_module, "_BLOCK_BYTES", 3 * D1 * 4)  # 3 rows per block
    _check_round_trip(FeatureDataset(path, "val"), arrays, 1)


# --- errors: every one names the file -----------------------------------------------------

def _expect(tmp_path, arrays, exc, match, split=None, meta=None, **kwargs):
    path = _write_dir(tmp_path / "bad", arrays, meta)
    with pytest.raises(exc, match=match):
        FeatureDataset(path, split, **kwargs)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FeatureDataset(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["modality_1", "modality_2", "labels"])
def test_missing_file(tmp_path, name):
    arrays = _arrays()
    del arrays[name]
    _expect(tmp_path, arrays, FileNotFoundError, f"{name}.npy")


def test_missing_hdf5_dataset(tmp_path):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("modality_1", data=np.zeros((3, 2), np.float32))
        f.create_dataset("labels", data=np.zeros(3, np.int64))
    with pytest.raises(FileNotFoundError, match=r"modality_2.*feats\.h5"):
        FeatureDataset(path)


@pytest.mark.parametrize("name, value, exc, match", [
    ("modality_2", np.zeros((N - 1, D2), np.float32), ValueError, "modality_2.npy has 39 rows"),
    ("split", np.zeros(N + 1, np.int8), ValueError, "split.npy has 41 rows"),
    ("modality_1", np.zeros((N, D1, 1), np.float32), ValueError, "modality_1.npy must be 2-D"),
    ("labels", np.zeros((N, 1), np.int64), ValueError, "labels.npy must be 1-D"),
    ("modality_1", np.zeros((N, D1), np.int32), TypeError, "modality_1.npy must hold floating"),
    ("labels", np.zeros(N, np.float32), TypeError, "labels.npy must hold integers"),
    ("labels", np.full(N, -1, np.int64), ValueError, "labels.npy.*-1"),
    ("labels", np.full(N, C, np.int64), ValueError, r"labels.npy.*\[0, 4\)"),
    ("split", np.full(N, 3, np.int8), ValueError, r"split.npy.*\[0, 3\)"),
    ("interaction_type", np.full(N, 4, np.int8), ValueError, r"interaction_type.npy.*\[0, 4\)"),
])
def test_bad_array(tmp_path, name, value, exc, match):
    arrays = _arrays()
    arrays[name] = value
    _expect(tmp_path, arrays, exc, match, meta=META)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path, bad):
    arrays = _arrays()
    arrays["modality_2"][16, 1] = bad  # row 16 is in split 1 (val)
    _expect(tmp_path, arrays, ValueError, "modality_2.npy has NaN or inf features at row 16", split="val")
    assert len(FeatureDataset(tmp_path / "bad", "val", check_finite=False)) == 13
    assert len(FeatureDataset(tmp_path / "bad", "train")) == 14  # only the selected rows are scanned


def test_non_finite_found_in_a_late_block(tmp_path, monkeypatch):
    monkeypatch.setattr(features_module, "_BLOCK_BYTES", 2 * D1 * 4)
    arrays = _arrays()
    arrays["modality_1"][N - 1, 0] = np.nan
    _expect(tmp_path, arrays, ValueError, f"modality_1.npy has NaN or inf features at row {N - 1}")


def test_empty_split_names_split_and_path(tmp_path):
    arrays = _arrays()
    arrays["split"][:] = 0
    _expect(tmp_path, arrays, ValueError, r"split 'test' has no samples in .*bad", split="test")


@pytest.mark.parametrize("split", ["dev", 3, -1, True, 1.0])
def test_unknown_split_value(feature_dir, split):
    with pytest.raises(ValueError, match="split must be one of"):
        FeatureDataset(feature_dir[0], split)


def test_bad_meta_json(tmp_path):
    path = _write_dir(tmp_path / "bad", _arrays())
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        FeatureDataset(path)


@pytest.mark.parametrize("name", ["modality_1", "modality_2", "labels", "split", "interaction_type"])
def test_zero_byte_npy_names_the_file(tmp_path, name):
    path = _write_dir(tmp_path / "bad", _arrays(), META)
    (path / f"{name}.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"cannot read .*bad[/\\]{name}\.npy as a \.npy array"):
        FeatureDataset(path)


@pytest.mark.parametrize("name", ["modality_1", "labels", "split"])
def test_npz_archive_under_a_npy_name_names_the_file(tmp_path, name):
    arrays = _arrays()
    path = _write_dir(tmp_path / "bad", arrays, META)
    with open(path / f"{name}.npy", "wb") as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, **{name: arrays[name]})
    with pytest.raises(ValueError, match=rf"{name}\.npy as a \.npy array: it is an \.npz archive"):
        FeatureDataset(path)


def test_meta_json_that_is_not_utf8_names_the_file(tmp_path):
    path = _write_dir(tmp_path / "bad", _arrays())
    (path / "meta.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"bad[/\\]meta\.json must be UTF-8"):
        FeatureDataset(path)


def test_hdf5_meta_attribute_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        for name, value in _arrays().items():
            f.create_dataset(name, data=value)
        f.attrs["meta"] = np.bytes_(b"\xff{}")
    with pytest.raises(ValueError, match=r"feats\.h5 \(attribute 'meta'\) must be UTF-8"):
        FeatureDataset(path)


@pytest.mark.parametrize("name", ["modality_1", "modality_2", "labels", "split", "interaction_type"])
def test_hdf5_group_instead_of_dataset_names_file_and_key(tmp_path, name):
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        for key, value in _arrays().items():
            if key == name:
                f.create_group(key).create_dataset("inner", data=value)
            else:
                f.create_dataset(key, data=value)
    with pytest.raises(ValueError, match=rf"feats\.h5: '{name}' must be an HDF5 dataset .*group"):
        FeatureDataset(path)


def test_index_out_of_range(feature_dir):
    ds = FeatureDataset(feature_dir[0], "train")
    assert int(ds[-1][3]) == int(ds.indices[-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def _stacked(ds, positions):
    """The reference for read_rows: one __getitem__ per position, stacked."""
    items = [ds[int(p)] for p in positions]
    return [torch.stack(parts) for parts in zip(*items)]


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_read_rows_equals_item_by_item(tmp_path, fmt):
    arrays = _arrays(3)
    if fmt == "npy":
        path = _write_dir(tmp_path / "feats", arrays, META)
    else:
        path = tmp_path / "feats.h5"
        with h5py.File(path, "w") as f:
            for name, value in arrays.items():
                f.create_dataset(name, data=value)
    ds = FeatureDataset(path, "train")
    n = len(ds)
    positions = [n - 1, 0, 3, 3, -2, 5, 1]  # unsorted, a repeat, a negative position
    for given in (positions, np.array(positions, dtype=np.int32), torch.tensor(positions)):
        got = ds.read_rows(given)
        for a, b in zip(got, _stacked(ds, positions)):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    x1, x2, y, idx = ds.read_rows([])
    assert x1.shape == (0, D1) and x2.shape == (0, D2) and y.shape == (0,) and idx.shape == (0,)
    assert x1.dtype == torch.float32 and y.dtype == torch.int64


def test_read_rows_bad_positions(feature_dir):
    ds = FeatureDataset(feature_dir[0], "train")
    with pytest.raises(IndexError, match=f"positions holds {len(ds)}"):
        ds.read_rows([0, len(ds)])
    with pytest.raises(IndexError, match="positions holds"):
        ds.read_rows([-len(ds) - 1])
    with pytest.raises(TypeError, match="positions must be a 1-D sequence of integers"):
        ds.read_rows([0.5, 1.0])
    with pytest.raises(TypeError, match="positions must be a 1-D sequence of integers"):
        ds.read_rows([[0, 1]])
