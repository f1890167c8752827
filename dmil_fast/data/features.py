"""Feature datasets on disk: a directory of ``.npy`` files (memory-mapped) or one HDF5 file.

Directory layout (DESIGN section 4)::

    modality_1.npy        (N, D1) float       features of modality 1 (visual)
    modality_2.npy        (N, D2) float       features of modality 2 (audio)
    labels.npy            (N,)    integer     class index in [0, C)
    split.npy             (N,)    integer     optional: 0 train, 1 val, 2 test
    interaction_type.npy  (N,)    integer     optional: per-sample ground truth (synthetic sets)
    meta.json                                 optional: class_names, modality_names, interaction_types

An HDF5 file (suffix ``.h5`` / ``.hdf5``) holds datasets of the same names without ``.npy``;
its metadata come from a root attribute ``meta`` (a JSON string), else from ``<stem>.meta.json``
or ``meta.json`` beside the file. Reading HDF5 needs the optional dependency ``h5py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

INTERACTION_TYPES = ("redundancy", "unique_1", "unique_2", "synergy")
SPLITS = {"train": 0, "val": 1, "test": 2}
FIELDS = ("modality_1", "modality_2", "labels", "split", "interaction_type")
REQUIRED_FIELDS = ("modality_1", "modality_2", "labels")
HDF5_SUFFIXES = (".h5", ".hdf5")
# Rows read at once by validation and bulk loads: about this many bytes per block.
_BLOCK_BYTES = 1 << 24
# Fallback split when there is no split.npy: a multiplicative (Fibonacci) hash of the row index.
_HASH_MULTIPLIER = 2654435769
_HASH_TRAIN, _HASH_VAL = 0.70, 0.85


def hash_split(num_rows: int) -> np.ndarray:
    """The split used when a dataset has no ``split`` array: (N,) int8, 0 train / 1 val / 2 test.

    Row i goes to train when frac(i * 2654435769 / 2**32) < 0.70, to val when < 0.85, else to test.
    The assignment of a row depends on its index only (appending rows never moves old ones) and
    the Weyl-sequence hash spreads the three parts evenly over the file (70/15/15 up to O(1) rows).
    """
    u = (np.arange(num_rows, dtype=np.uint64) * np.uint64(_HASH_MULTIPLIER)) % np.uint64(1 << 32)
    u = u.astype(np.float64) / float(1 << 32)
    return np.where(u < _HASH_TRAIN, 0, np.where(u < _HASH_VAL, 1, 2)).astype(np.int8)


def _block_rows(array) -> int:
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    return max(1, _BLOCK_BYTES // max(1, row_bytes))


def _take_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for sorted ``rows``, read block by block (memmap or h5py dataset)."""
    if len(rows) == 0:
        return np.empty((0,) + tuple(array.shape[1:]), dtype=array.dtype)
    step = _block_rows(array)
    parts = []
    start = 0
    while start < len(rows):
        lo = int(rows[start])
        end = int(np.searchsorted(rows, lo + step, side="left"))
        block = np.asarray(array[lo:int(rows[end - 1]) + 1])
        parts.append(block[rows[start:end] - lo])
        start = end
    return np.concatenate(parts, axis=0)


def _read_sorted(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` as float32 for ascending, repeat-free ``rows``: one fancy-indexed read,
    which a memory map serves page by page and h5py as one point selection."""
    if len(rows) == 0:
        return np.empty((0,) + tuple(array.shape[1:]), dtype=np.float32)
    return np.asarray(array[rows]).astype(np.float32, copy=False)


def _resolve_split(split) -> Optional[int]:
    valid = "None, 'train', 'val', 'test', 0, 1 or 2"
    if split is None:
        return None
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {valid}, got {split!r}")
        return SPLITS[split]
    if isinstance(split, (bool, np.bool_)) or not isinstance(split, (int, np.integer)) or int(split) not in (0, 1, 2):
        raise ValueError(f"split must be one of {valid}, got {split!r}")
    return int(split)


class _Storage:
    """Opens the arrays of a feature directory (np.load mmap) or HDF5 file (h5py, lazily)."""

    def __init__(self, path: Path):
        self.path = path
        self.is_hdf5 = path.suffix.lower() in HDF5_SUFFIXES
        self._h5 = None
        self._pid = None
        if not path.exists():
            kind = "HDF5 feature file" if self.is_hdf5 else "feature directory"
            raise FileNotFoundError(f"{kind} not found: {path}")
        if not self.is_hdf5 and not path.is_dir():
            raise ValueError(f"feature path {path} must be a directory or an .h5/.hdf5 file")

    def source(self, name: str) -> str:
        """How error messages name the file holding ``name``."""
        if self.is_hdf5:
            return f"{self.path} (dataset '{name}')"
        return str(self.path / f"{name}.npy")

    def _file(self):
        # h5py handles do not survive fork: each process opens its own.
        if self._h5 is None or self._pid != os.getpid():
            try:
                import h5py
            except ImportError as exc:
                raise ImportError(
                    f"reading the HDF5 feature file {self.path} needs h5py: pip install h5py "
                    "(or pip install 'dmil-fast[hdf5]')"
                ) from exc
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise ValueError(f"cannot open HDF5 feature file {self.path}: {exc}") from exc
            self._pid = os.getpid()
        return self._h5

    def has(self, name: str) -> bool:
        if self.is_hdf5:
            return name in self._file()
        return (self.path / f"{name}.npy").is_file()

    def open(self, name: str):
        """The array ``name``, memory-mapped (npy) or as an h5py dataset; nothing is read."""
        if not self.has(name):
            where = f"in HDF5 file {self.path}" if self.is_hdf5 else f"file {self.path / (name + '.npy')}"
            raise FileNotFoundError(f"feature dataset '{name}' is missing: no {where}")
        if self.is_hdf5:
            import h5py

            node = self._file()[name]
            if not isinstance(node, h5py.Dataset):
                raise ValueError(f"{self.path}: '{name}' must be an HDF5 dataset (an array), "
                                 f"got an HDF5 {type(node).__name__.lower()}")
            return node
        file = self.path / f"{name}.npy"
        try:
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"cannot read {file} as a .npy array: {exc}") from exc
        if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
            array.close()
            raise ValueError(f"cannot read {file} as a .npy array: it is an .npz archive "
                             f"(arrays {', '.join(map(repr, array.files))}); expected one array saved by np.save")
        return array

    def meta(self) -> dict:
        if self.is_hdf5:
            attr = self._file().attrs.get("meta")
            if attr is not None:
                source = f"{self.path} (attribute 'meta')"
                text = _decode_meta(attr, source) if isinstance(attr, bytes) else str(attr)
                return _parse_meta(text, source)
            candidates = [self.path.with_suffix(".meta.json"), self.path.parent / "meta.json"]
        else:
            candidates = [self.path / "meta.json"]
        for file in candidates:
            if file.is_file():
                return _parse_meta(_decode_meta(file.read_bytes(), str(file)), str(file))
        return {}

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None


def _decode_meta(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source} must be UTF-8 encoded JSON text: {exc}") from exc


def _parse_meta(text: str, source: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(meta).__name__}")
    for key in ("class_names", "modality_names", "interaction_types"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{source}: '{key}' must be a list of strings, got {value!r}")
    if meta.get("modality_names") is not None and len(meta["modality_names"]) != 2:
        raise ValueError(f"{source}: 'modality_names' must name 2 modalities, got {meta['modality_names']!r}")
    return meta


class FeatureDataset(Dataset):
    """Pre-extracted two-modality features with labels, read lazily from disk.

    Args:
        path: a feature directory (``modality_1.npy``, ``modality_2.npy``, ``labels.npy``, optional
            ``split.npy``, ``interaction_type.npy``, ``meta.json``) or an ``.h5`` / ``.hdf5`` file with
            datasets of the same names. Directories are memory-mapped: opening loads no features.
        split: ``None`` (all rows), ``"train"`` / ``"val"`` / ``"test"`` or 0 / 1 / 2. Without a
            ``split`` array the rows are split 70/15/15 by a hash of the row index (:func:`hash_split`),
            deterministic and independent of N.
        check_finite: scan the selected rows of both modalities for NaN/inf before use, block by
            block (reads them from disk once; pass ``False`` to skip on trusted, very large sets).

    Item ``i`` (``0 <= i < len(ds)``) is ``(x1, x2, label, index)``: ``x1`` (D1,) float32,
    ``x2`` (D2,) float32, ``label`` int64 scalar, ``index`` int64 scalar = the row in the full file
    (align per-sample outputs with it). Every inconsistency is reported at construction, naming the
    file: missing files (FileNotFoundError), wrong rank or dtype (TypeError for dtype), lengths that
    differ, labels outside [0, C), split/type codes out of range, non-finite features, empty split.
    """

    def __init__(self, path: Union[str, os.PathLike], split=None, *, check_finite: bool = True):
        self.path = Path(path)
        self.split = split
        self._split_code = _resolve_split(split)
        self._storage = _Storage(self.path)
        meta = self._storage.meta()
        arrays = {name: self._storage.open(name) for name in REQUIRED_FIELDS}
        for name in ("split", "interaction_type"):
            if self._storage.has(name):
                arrays[name] = self._storage.open(name)
        self._validate_shapes(arrays)
        num_rows = arrays["labels"].shape[0]

        labels_all = np.array(arrays["labels"][:], dtype=np.int64)  # small: one int per row
        class_names = meta.get("class_names")
        num_classes = len(class_names) if class_names else meta.get("num_classes")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"meta data of {self.path}: num_classes must be a positive int, got {num_classes!r}")
        self._check_codes("labels", labels_all, num_classes, "class")
        self.num_classes = int(num_classes) if num_classes else int(labels_all.max(initial=-1)) + 1
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(self.num_classes)]
        self.modality_names = list(meta.get("modality_names") or ["modality_1", "modality_2"])
        self.interaction_types = list(meta.get("interaction_types") or INTERACTION_TYPES)

        if "split" in arrays:
            split_all = np.array(arrays["split"][:], dtype=np.int64)
            self._check_codes("split", split_all, 3, "split")
        else:
            split_all = hash_split(num_rows)
        rows = np.arange(num_rows) if self._split_code is None else np.flatnonzero(split_all == self._split_code)
        if len(rows) == 0:
            which = "the dataset" if self._split_code is None else f"split {split!r}"
            raise ValueError(f"{which} has no samples in {self.path}")
        self._indices = rows.astype(np.int64)
        self._labels = labels_all[rows]

        self._interaction_type = None
        if "interaction_type" in arrays:
            types_all = np.array(arrays["interaction_type"][:], dtype=np.int64)
            self._check_codes("interaction_type", types_all, len(self.interaction_types), "type")
            self._interaction_type = types_all[rows]

        self._x1, self._x2 = arrays["modality_1"], arrays["modality_2"]
        if check_finite:
            for name in ("modality_1", "modality_2"):
                self._check_finite(name, arrays[name])

    # --- validation -------------------------------------------------------------------------
    def _validate_shapes(self, arrays: dict) -> None:
        src = self._storage.source
        for name in ("modality_1", "modality_2"):
            a = arrays[name]
            if a.ndim != 2:
                raise ValueError(f"{src(name)} must be 2-D (N, D) features, got shape {tuple(a.shape)}")
            if not np.issubdtype(a.dtype, np.floating):
                raise TypeError(f"{src(name)} must hold floating-point features, got dtype {a.dtype}")
            if a.shape[1] == 0:
                raise ValueError(f"{src(name)} has feature dimension 0, shape {tuple(a.shape)}")
        for name in ("labels", "split", "interaction_type"):
            if name not in arrays:
                continue
            a = arrays[name]
            if a.ndim != 1:
                raise ValueError(f"{src(name)} must be 1-D (N,), got shape {tuple(a.shape)}")
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{src(name)} must hold integers, got dtype {a.dtype}")
        n = arrays["labels"].shape[0]
        for name in ("modality_1", "modality_2", "split", "interaction_type"):
            if name in arrays and arrays[name].shape[0] != n:
                raise ValueError(
                    f"{src(name)} has {arrays[name].shape[0]} rows but {src('labels')} has {n}; "
                    "every array must have one row per sample"
                )

    def _check_codes(self, name: str, values: np.ndarray, count: Optional[int], what: str) -> None:
        if len(values) == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or (count is not None and hi >= count):
            bound = f"[0, {count})" if count is not None else ">= 0"
            bad = int(np.flatnonzero((values < 0) | ((values >= count) if count is not None else False))[0])
            raise ValueError(
                f"{self._storage.source(name)}: {what} codes must lie in {bound}, got {values[bad]} at row {bad} "
                f"(range [{lo}, {hi}])"
            )

    def _check_finite(self, name: str, array) -> None:
        step = _block_rows(array)
        rows = self._indices
        bounds = np.searchsorted(rows, np.arange(0, int(array.shape[0]) + step, step))
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:
                continue
            # A fresh map per file block: scanned pages are unmapped again and do not stay resident.
            block = _take_rows(self._storage.open(name), rows[a:b])
            ok = np.isfinite(block).all(axis=1)
            if not ok.all():
                bad = int(rows[a + int(np.flatnonzero(~ok)[0])])
                raise ValueError(f"{self._storage.source(name)} has NaN or inf features at row {bad}")

    # --- access -----------------------------------------------------------------------------
    def _arrays(self):
        if self._x1 is None:  # after unpickling in a worker process
            self._x1 = self._storage.open("modality_1")
            self._x2 = self._storage.open("modality_2")
        return self._x1, self._x2

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        n = len(self._indices)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a split of {n} samples")
        row = int(self._indices[i])
        x1, x2 = self._arrays()
        return (
            torch.from_numpy(np.asarray(x1[row], dtype=np.float32).copy()),
            torch.from_numpy(np.asarray(x2[row], dtype=np.float32).copy()),
            torch.tensor(int(self._labels[i]), dtype=torch.int64),
            torch.tensor(row, dtype=torch.int64),
        )

    def read_rows(self, positions) -> tuple:
        """Many samples in one read per array, for batches streamed from disk.

        Args:
            positions: (b,) integer positions within the split (a sequence, numpy array or
                tensor), any order, repeats allowed, negative positions count from the end.

        Returns:
            ``x1`` (b, D1) float32, ``x2`` (b, D2) float32, ``y`` (b,) int64, ``idx`` (b,) int64
            global rows: the same values as stacking ``self[p]`` for each p, in the given order.
        """
        pos = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions)
        if pos.ndim != 1 or not (pos.dtype.kind in "iu" or (pos.size == 0 and pos.dtype.kind == "f")):
            raise TypeError(f"positions must be a 1-D sequence of integers, got an array of shape "
                            f"{pos.shape} and dtype {pos.dtype}")
        pos = pos.astype(np.int64)
        n = len(self._indices)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            bad = int(pos[(pos < -n) | (pos >= n)][0])
            raise IndexError(f"positions holds {bad}, out of range for a split of {n} samples")
        pos = np.where(pos < 0, pos + n, pos)
        rows = self._indices[pos]
        # One sorted, repeat-free read per array (what memory maps and HDF5 read fastest).
        unique, inverse = np.unique(rows, return_inverse=True)
        x1, x2 = self._arrays()
        return (
            torch.from_numpy(_read_sorted(x1, unique)[inverse]),
            torch.from_numpy(_read_sorted(x2, unique)[inverse]),
            torch.from_numpy(self._labels[pos]),
            torch.from_numpy(rows.astype(np.int64, copy=True)),
        )

    def as_tensors(self):
        """The whole split in memory: ``x1`` (n, D1) float32, ``x2`` (n, D2) float32, ``y`` (n,) int64,
        ``idx`` (n,) int64 global row indices. Loads the split; meant for sets that fit in RAM."""
        x1, x2 = self._arrays()
        return (
            torch.from_numpy(_take_rows(x1, self._indices).astype(np.float32, copy=False)),
            torch.from_numpy(_take_rows(x2, self._indices).astype(np.float32, copy=False)),
            torch.from_numpy(self._labels.copy()),
            torch.from_numpy(self._indices.copy()),
        )

    @property
    def dims(self) -> tuple:
        """Feature dimensions (D1, D2)."""
        x1, x2 = self._arrays()
        return int(x1.shape[1]), int(x2.shape[1])

    @property
    def labels(self) -> np.ndarray:
        """(n,) int64 labels of the selected split (a copy)."""
        return self._labels.copy()

    @property
    def indices(self) -> np.ndarray:
        """(n,) int64 global row indices of the selected split, ascending (a copy)."""
        return self._indices.copy()

    @property
    def interaction_type(self) -> Optional[np.ndarray]:
        """(n,) int64 ground-truth interaction type codes of the split (names in
        ``interaction_types``), or None when the dataset has no ``interaction_type`` array."""
        return None if self._interaction_type is None else self._interaction_type.copy()

    def __getstate__(self):
        state = self.__dict__.copy()
        # Memory maps and HDF5 handles are reopened in the receiving process, never pickled.
        state["_x1"] = state["_x2"] = None
        state["_storage"] = _Storage.__new__(_Storage)
        state["_storage"].__dict__.update(self._storage.__dict__, _h5=None, _pid=None)
        return state

    def __repr__(self) -> str:
        return (f"FeatureDataset({str(self.path)!r}, split={self.split!r}, n={len(self)}, "
                f"dims={self.dims}, num_classes={self.num_classes})")
