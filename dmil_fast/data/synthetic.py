"""Synthetic two-modality feature sets with a known interaction type per sample.

Every sample is one of four types, mixed in one dataset and never shown to the model:

- redundancy: both modalities encode the class y;
- unique_1: modality 1 encodes y, modality 2 encodes an unrelated random symbol;
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
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .features import INTERACTION_TYPES

# Prototype norm: with noise 0.5 a nearest-prototype decoder reads a symbol from one modality with
# about 99 % accuracy at 6 classes (pairwise distance ~ 2.8 = 5.7 noise standard deviations).
PROTOTYPE_NORM = 2.0
# Rows generated and written per step; results depend on the seed only, not on this.
CHUNK_ROWS = 16384

# A VGGSound-shaped preset: 309 classes, 512-d features, 183k train / 15k val / 15k test clips.
VGGSOUND_LIKE = {"num_classes": 309, "dim": 512, "n": 213_000, "val": 15_000, "test": 15_000}
_GENERIC = {"n": 6000, "dim": 32, "num_classes": 6, "val_fraction": 0.15, "test_fraction": 0.15}


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
) -> Path:
    """Write a synthetic feature directory (the :class:`FeatureDataset` format) and return its path.

    Args:
        out_dir: directory to write (created; existing files of the format are overwritten).
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

    Files: ``modality_1.npy`` / ``modality_2.npy`` (n, dim) float32, ``labels.npy`` (n,) int64,
    ``split.npy`` (n,) int8 (0 train, 1 val, 2 test), ``interaction_type.npy`` (n,) int8 (index into
    ``INTERACTION_TYPES``), ``meta.json`` (class, modality and type names plus the parameters).
    """
    params = _resolve_params(n, dim, num_classes, noise, imbalance, seed, val_fraction, test_fraction, like)
    weights = _check_mix(mix)
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

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "labels.npy", labels)
    np.save(out / "split.npy", split)
    np.save(out / "interaction_type.npy", types)
    _write_features(out, protos, (sym1, sym2), params)
    meta = {
        "class_names": [f"class_{k}" for k in range(num_classes)],
        "modality_names": ["visual", "audio"],
        "interaction_types": list(INTERACTION_TYPES),
        "generator": "dmil_fast.data.make_synthetic",
        "params": dict(params, mix=[float(w) for w in weights], prototype_norm=PROTOTYPE_NORM),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _write_features(out: Path, protos: np.ndarray, symbols, params: dict) -> None:
    from tqdm.auto import tqdm

    n, dim, noise = params["n"], params["dim"], params["noise"]
    files = [out / f"modality_{m + 1}.npy" for m in range(2)]
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
            # Map, write and unmap per block, so written pages never pile up in this process.
            target = np.load(files[m], mmap_mode="r+")
            target[start:stop] = block
            target.flush()
            del target


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
