"""Synthetic two-modality feature sets with a known interaction type per sample.

Every sample is one of four types, mixed in one dataset and never shown to the model:

- redundancy: both modalities encode the class y;
- unique_1: modality 1 encodes y, modality 2 carries noise only (no prototype, nothing about y);
- unique_2: the converse;
- synergy: modality 1 encodes a, modality 2 encodes b with y = (a + b) mod C, a uniform, so each
  modality alone is independent of y.

A symbol k is written into modality m as ``P_m[k] + noise * N(0, I)``. Each modality has 2C
prototypes, random directions of norm :data:`PROTOTYPE_NORM` drawn per seed: rows [0, C) encode
classes (redundant and unique samples), rows [C, 2C) encode the synergy operands a and b, so that
the four types have distinguishable inputs and per-type accuracy measures what a model learned, not
what the data allows. A modality that "carries noise only" is ``noise * N(0, I)`` with no prototype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .features import FIELDS, HDF5_SUFFIXES, INTERACTION_TYPES

# Prototype norm: with noise 0.5 a nearest-prototype decoder reads a symbol from one modality with
# about 99 % accuracy at 6 classes (pairwise distance ~ 2.8 = 5.7 noise standard deviations).
PROTOTYPE_NORM = 2.0
# Rows generated and written per step; results depend on the seed only, not on this.
CHUNK_ROWS = 16384

# A VGGSound-shaped preset: 309 classes, 512-d features, 183k train / 15k val / 15k test clips.
VGGSOUND_LIKE = {"num_classes": 309, "dim": 512, "n": 213_000, "val": 15_000, "test": 15_000}
_GENERIC = {"n": 6000, "dim": 32, "num_classes": 6, "val_fraction": 0.15, "test_fraction": 0.15}
# Every file name of the directory format, in the order they are moved into place (meta.json last:
# its presence marks a set whose files were all written).
FORMAT_FILES = tuple(f"{name}.npy" for name in FIELDS) + ("meta.json",)
# Suffixes in the staging directory: files still being written, and files of an earlier set
# moved aside while the new ones go in. Neither is a name of the format.
_PARTIAL, _BACKUP = ".partial", ".old"


def _check_number(name, value, *, integer=False):
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return int(value) if integer else float(value)


def _check_mix(mix) -> np.ndarray:
    try:
        values = [float(v) for v in mix]
    except (TypeError, ValueError):
        raise TypeError(f"mix must be a sequence of 4 numbers (redundancy, unique_1, unique_2, synergy), got {mix!r}")
    if len(values) != 4 or not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            "mix must be 4 finite non-negative weights (redundancy, unique_1, unique_2, synergy) "
            f"with a positive sum, got {tuple(mix)!r}"
        )
    return np.asarray(values) / sum(values)


def class_prior(num_classes: int, imbalance: float) -> np.ndarray:
    """(C,) float64 class frequencies: p_k proportional to (1 - imbalance)**k (0 gives uniform)."""
    p = (1.0 - imbalance) ** np.arange(num_classes, dtype=np.float64)
    return p / p.sum()


def _exact_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total * weights`` (largest remainder)."""
    raw = total * weights
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def make_synthetic(
    out_dir: Union[str, os.PathLike],
    *,
    n: Optional[int] = None,
    dim: int = 32,
    num_classes: int = 6,
    mix: Sequence[float] = (0.25, 0.25, 0.25, 0.25),
    noise: float = 0.5,
    imbalance: float = 0.0,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    like: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic feature directory (the :class:`FeatureDataset` format) and return its path.

    Args:
        out_dir: directory to write (created with its parents if missing). A directory that
            already holds a file of the format (``modality_1.npy``, ``modality_2.npy``,
            ``labels.npy``, ``split.npy``, ``interaction_type.npy``, ``meta.json``) is refused with
            FileExistsError unless ``overwrite=True``; other files in it are never touched. A path
            ending in ``.h5`` / ``.hdf5`` is refused (ValueError): this writes ``.npy`` files.
        n: number of samples; default 6000 (213,000 with ``like="vggsound"``).
        dim: feature dimension of each modality (D1 = D2 = dim).
        num_classes: C >= 2.
        mix: weights of (redundancy, unique_1, unique_2, synergy), normalised; the type counts
            are the closest integers to ``n * mix``, assigned to random rows.
        noise: standard deviation of the Gaussian noise added to the prototypes (norm 2).
        imbalance: in [0, 1); class frequencies proportional to (1 - imbalance)**k.
        seed: everything (prototypes, labels, types, split, noise) is a function of the seed.
        val_fraction, test_fraction: in [0, 1) with a sum below 1; split sizes round(n * fraction),
            random rows.
        like: ``None`` or ``"vggsound"``: 309 classes, 512-d, 183,000 train / 15,000 val / 15,000
            test rows (arguments left at their generic defaults take these values), written
            block by block through memory maps with a progress bar.
        overwrite: replace the dataset files an existing ``out_dir`` holds.

    The files are written into a hidden staging directory beside ``out_dir``
    (``.<name>.partial-<pid>-<random>``) and moved into place once all of them are complete, meta.json
    last; an exception (KeyboardInterrupt included) leaves ``out_dir`` as it was and removes the
    staging directory. A staging directory left by a killed process holds no file of the format
    (its files end in ``.partial``), so it never loads as a dataset; it can be deleted.

    Files: ``modality_1.npy`` / ``modality_2.npy`` (n, dim) float32, ``labels.npy`` (n,) int64,
    ``split.npy`` (n,) int8 (0 train, 1 val, 2 test), ``interaction_type.npy`` (n,) int8 (index into
    ``INTERACTION_TYPES``), ``meta.json`` (class, modality and type names plus the parameters).
    """
    out = _check_out_dir(out_dir, overwrite)
    params = _resolve_params(n, dim, num_classes, noise, imbalance, seed, val_fraction, test_fraction, like)
    weights = _check_mix(mix)
    created = not out.is_dir()
    n, dim, num_classes = params["n"], params["dim"], params["num_classes"]
    rng = np.random.default_rng([params["seed"], 0])

    # Prototypes: (2, 2C + 1, dim) per modality: C class symbols, C synergy operands (norm
    # PROTOTYPE_NORM) and a last all-zero row for "noise only".
    protos = rng.standard_normal((2, 2 * num_classes, dim))
    protos *= PROTOTYPE_NORM / np.linalg.norm(protos, axis=-1, keepdims=True)
    protos = np.concatenate([protos, np.zeros((2, 1, dim))], axis=1).astype(np.float32)
    noise_only = 2 * num_classes

    prior = class_prior(num_classes, params["imbalance"])
    labels = rng.choice(num_classes, size=n, p=prior).astype(np.int64)
    types = rng.permutation(np.repeat(np.arange(4, dtype=np.int8), _exact_counts(n, weights)))
    n_val, n_test = round(n * params["val_fraction"]), round(n * params["test_fraction"])
    split = rng.permutation(np.repeat(np.array([0, 1, 2], dtype=np.int8), [n - n_val - n_test, n_val, n_test]))

    # Symbols written into each modality (see the module docstring).
    first = rng.integers(0, num_classes, size=n)
    sym1 = np.select([types <= 1, types == 2], [labels, noise_only], default=num_classes + first)
    sym2 = np.select([(types == 0) | (types == 2), types == 1], [labels, noise_only],
                     default=num_classes + (labels - first) % num_classes)

    staging = _make_staging_dir(out)
    committing = False
    try:
        _save(staging / "labels.npy", labels)
        _save(staging / "split.npy", split)
        _save(staging / "interaction_type.npy", types)
        _write_features(staging, protos, (sym1, sym2), params)
        meta = {
            "class_names": [f"class_{k}" for k in range(num_classes)],
            "modality_names": ["visual", "audio"],
            "interaction_types": list(INTERACTION_TYPES),
            "generator": "dmil_fast.data.make_synthetic",
            "params": dict(params, mix=[float(w) for w in weights], prototype_norm=PROTOTYPE_NORM),
        }
        (staging / ("meta.json" + _PARTIAL)).write_text(json.dumps(meta, indent=2) + "\n")
        committing = True
        _commit(staging, out, created)
    except BaseException:
        if committing:
            _roll_back(staging, out, created)  # if this fails, the staging directory keeps the old files
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_out_dir(out_dir, overwrite) -> Path:
    out = Path(out_dir)
    if out.suffix.lower() in HDF5_SUFFIXES:
        raise ValueError(
            f"out_dir {str(out)!r} ends in {out.suffix!r}, but make_synthetic writes a directory of .npy files "
            "(modality_1.npy, modality_2.npy, labels.npy, ...), not an HDF5 file; expected a directory path"
        )
    if isinstance(overwrite, np.bool_) or not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} exists and is not a directory; expected a directory (or a new path)")
    if out.is_dir() and not overwrite:
        held = [name for name in FORMAT_FILES if os.path.lexists(out / name)]
        if held:
            raise FileExistsError(
                f"out_dir {out} already holds a feature dataset ({', '.join(held)}); make_synthetic does not "
                "replace it: pass overwrite=True to replace these files, or choose another out_dir"
            )
    return out


def _make_staging_dir(out: Path) -> Path:
    """A fresh hidden directory on the file system of ``out``, so the final moves are renames."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir() and os.stat(out).st_dev != os.stat(parent).st_dev:
        parent = out  # out is a mount point: a sibling would sit on another file system
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=parent))


def _save(file: Path, array: np.ndarray) -> None:
    """``array`` as ``<file>.partial``, through a file object (np.save appends .npy to other names)."""
    with open(str(file) + _PARTIAL, "wb") as f:
        np.save(f, array)


def _commit(staging: Path, out: Path, created: bool) -> None:
    """Move the staged files into ``out``: first the earlier set aside (meta.json first), then the
    new files in (meta.json last), so meta.json is present only beside files written together."""
    if created:
        out.mkdir(exist_ok=True)
    for name in reversed(FORMAT_FILES):
        if os.path.lexists(out / name):
            os.replace(out / name, staging / (name + _BACKUP))
    for name in FORMAT_FILES:
        os.replace(staging / (name + _PARTIAL), out / name)


def _roll_back(staging: Path, out: Path, created: bool) -> None:
    """Undo a partial :func:`_commit`, reading its progress from the files (it may have been
    interrupted between any two moves): drop what was moved in, put back what was moved aside."""
    for name in FORMAT_FILES:
        if not os.path.lexists(staging / (name + _PARTIAL)) and os.path.lexists(out / name):
            os.remove(out / name)
        if os.path.lexists(staging / (name + _BACKUP)):
            os.replace(staging / (name + _BACKUP), out / name)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _write_block(file: Path, start: int, block: np.ndarray) -> None:
    # Map, write and unmap per block, so written pages never pile up in this process.
    target = np.load(file, mmap_mode="r+")
    target[start:start + len(block)] = block
    target.flush()
    del target


def _write_features(out: Path, protos: np.ndarray, symbols, params: dict) -> None:
    from tqdm.auto import tqdm

    n, dim, noise = params["n"], params["dim"], params["noise"]
    files = [out / f"modality_{m + 1}.npy{_PARTIAL}" for m in range(2)]
    for file in files:
        sized = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=(n, dim))
        del sized  # the .npy header and file size are written; the rows follow block by block
    starts = range(0, n, CHUNK_ROWS)
    show = params["like"] is not None or len(starts) > 4
    # One noise stream per modality, consumed in row order: the result does not depend on the blocking.
    rngs = [np.random.default_rng([params["seed"], 1, m]) for m in range(2)]
    for start in tqdm(starts, desc="synthetic features", unit="block", disable=not show):
        stop = min(n, start + CHUNK_ROWS)
        for m in range(2):
            block = rngs[m].standard_normal((stop - start, dim), dtype=np.float32)
            block *= np.float32(noise)
            block += protos[m][symbols[m][start:stop]]
            _write_block(files[m], start, block)


def _resolve_params(n, dim, num_classes, noise, imbalance, seed, val_fraction, test_fraction, like) -> dict:
    if like not in (None, "vggsound"):
        raise ValueError(f"like must be None or 'vggsound', got {like!r}")
    if like == "vggsound":
        preset = VGGSOUND_LIKE
        for name, value, fixed in (("num_classes", num_classes, preset["num_classes"]), ("dim", dim, preset["dim"])):
            if value not in (_GENERIC[name], fixed):
                raise ValueError(f"{name}={value!r} conflicts with like='vggsound', which fixes {name}={fixed}")
        num_classes, dim = preset["num_classes"], preset["dim"]
        if n is None:
            n = preset["n"]
        if val_fraction == _GENERIC["val_fraction"]:
            val_fraction = preset["val"] / preset["n"]
        if test_fraction == _GENERIC["test_fraction"]:
            test_fraction = preset["test"] / preset["n"]
    elif n is None:
        n = _GENERIC["n"]
    p = {
        "n": _check_number("n", n, integer=True),
        "dim": _check_number("dim", dim, integer=True),
        "num_classes": _check_number("num_classes", num_classes, integer=True),
        "noise": _check_number("noise", noise),
        "imbalance": _check_number("imbalance", imbalance),
        "seed": _check_number("seed", seed, integer=True),
        "val_fraction": _check_number("val_fraction", val_fraction),
        "test_fraction": _check_number("test_fraction", test_fraction),
        "like": like,
    }
    if p["n"] <= 0:
        raise ValueError(f"n must be > 0, got {p['n']}")
    if p["dim"] <= 0:
        raise ValueError(f"dim must be > 0, got {p['dim']}")
    if p["num_classes"] < 2:
        raise ValueError(f"num_classes must be >= 2, got {p['num_classes']}")
    if p["noise"] < 0:
        raise ValueError(f"noise must be >= 0, got {p['noise']}")
    if not 0 <= p["imbalance"] < 1:
        raise ValueError(f"imbalance must be in [0, 1), got {p['imbalance']}")
    if p["seed"] < 0:
        raise ValueError(f"seed must be >= 0, got {p['seed']}")
    for name in ("val_fraction", "test_fraction"):
        if not 0 <= p[name] < 1:
            raise ValueError(f"{name} must be in [0, 1), got {p[name]}")
    n_train = p["n"] - round(p["n"] * p["val_fraction"]) - round(p["n"] * p["test_fraction"])
    if n_train <= 0:
        raise ValueError(
            f"val_fraction + test_fraction ({p['val_fraction']} + {p['test_fraction']}) leaves no training "
            f"samples out of n={p['n']}; expected a sum below 1"
        )
    return p
