"""Interaction reports (per-sample CSV, summary JSON, plots) and the ``dmil-fast score`` command.

    dmil-fast score --data DIR [--model CHECKPOINT] --out DIR [--redundancy lsmi|mmi] [--epochs N] [--seed S]
                    [--batch-size N] [--device D] [--threads N] [--no-progress]

Without ``--model`` an :class:`LSMIEstimator` is fitted on the dataset's train split and scores every
sample; with ``--model`` the trained model's own outputs are scored (:func:`score_model`). ``--model``
takes a checkpoint of ``dmil-fast train`` (which records the model's architecture), or an official
DMIL checkpoint or plain state_dict of the official model on features (:func:`dmil_fast.train.load_model`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .._settings import check_device, check_out_dir
from ..ops import BackendUnavailableError, InteractionScores
from ..ops._validate import NaNInputError

DEFAULT_TYPE_NAMES = ("redundancy", "unique_1", "unique_2", "synergy")
SPLIT_NAMES = ("train", "val", "test")
CSV_NAME, JSON_NAME = "interactions.csv", "summary.json"
PLOT_NAMES = ("histograms.png", "class_bars.png", "ternary.png")
_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")
_MAX_SCATTER = 20000


def _components(scores: InteractionScores) -> np.ndarray:
    """(N, 4) float64: r, u1, u2, s."""
    return np.stack([t.detach().double().cpu().numpy() for t in
                     (scores.redundancy, scores.unique_1, scores.unique_2, scores.synergy)], axis=1)


def _as_array(name: str, value, n: int, dtype) -> Optional[np.ndarray]:
    if value is None:
        return None
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one entry per scored sample), got {arr.shape}")
    return arr.astype(dtype, copy=False)


def write_report(scores: InteractionScores, out_dir, *, indices, labels, split=None, class_names=None,
                 interaction_type=None, type_names=None, adjusted: bool = True) -> dict:
    """Write the report of N scored samples into ``out_dir``; returns the summary dict.

    Args:
        scores: InteractionScores of (N,) tensors (row i = sample i).
        indices: (N,) int sample indices; labels: (N,) int class labels.
        split: optional (N,) int split codes (0 train, 1 val, 2 test).
        class_names: optional C names; interaction_type: optional (N,) int ground-truth type codes,
            named by ``type_names`` (default redundancy, unique_1, unique_2, synergy). Four names
            are taken as the four components, in order, and also name the dominant estimated type;
            another number K of ground-truth types gets a K x 4 confusion matrix against the
            components (named as by default) and no agreement rate.
        adjusted: whether the dataset-level shift was applied (recorded in the summary).

    Files: ``interactions.csv`` (index, label, split, r, u1, u2, s, dominant[, true_type]),
    ``summary.json`` (means, adjusted, dominant-type counts per class, and with ground truth the
    confusion matrix true type x dominant type and the agreement rate), and three PNG plots:
    ``histograms.png``, ``class_bars.png``, ``ternary.png``.
    """
    values = _components(scores)
    n = values.shape[0]
    if n == 0:
        raise ValueError("scores is empty; expected at least one sample")
    indices = _as_array("indices", indices, n, np.int64)
    labels = _as_array("labels", labels, n, np.int64)
    split = _as_array("split", split, n, np.int64)
    truth = _as_array("interaction_type", interaction_type, n, np.int64)
    type_names = list(type_names) if type_names is not None else list(DEFAULT_TYPE_NAMES)
    if not type_names:
        raise ValueError("type_names must name at least one interaction type, got []")
    # The dominant estimated type is one of the four components: named by type_names when those
    # are the four components, else by the default names.
    component_names = type_names if len(type_names) == 4 else list(DEFAULT_TYPE_NAMES)
    num_types = len(type_names)
    num_classes = int(labels.max()) + 1 if class_names is None else len(class_names)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    class_names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
    if split is not None and (split.min() < 0 or split.max() >= len(SPLIT_NAMES)):
        raise ValueError(f"split codes must lie in [0, {len(SPLIT_NAMES)}) (0 train, 1 val, 2 test), "
                         f"got [{split.min()}, {split.max()}]")
    if truth is not None and (truth.min() < 0 or truth.max() >= num_types):
        raise ValueError(f"interaction_type codes must lie in [0, {num_types}) (one per type name), "
                         f"got [{truth.min()}, {truth.max()}]")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dominant = values.argmax(axis=1)
    _write_csv(out / CSV_NAME, indices, labels, split, values, dominant, truth, component_names, type_names)

    summary = {
        "num_samples": n,
        "adjusted": bool(adjusted),
        "means": dict(zip(DEFAULT_TYPE_NAMES, (float(v) for v in values.mean(axis=0)))),
        "dominant_counts": dict(zip(component_names, (int(c) for c in np.bincount(dominant, minlength=4)))),
        "dominant_counts_per_class": {
            class_names[k]: dict(zip(component_names,
                                     (int(c) for c in np.bincount(dominant[labels == k], minlength=4))))
            for k in range(num_classes)
        },
    }
    if split is not None:
        summary["means_per_split"] = {
            SPLIT_NAMES[code]: dict(zip(DEFAULT_TYPE_NAMES, (float(v) for v in values[split == code].mean(axis=0))))
            for code in range(3) if (split == code).any()
        }
    if truth is not None:
        confusion = np.zeros((num_types, 4), dtype=np.int64)
        np.add.at(confusion, (truth, dominant), 1)
        summary["type_names"] = type_names
        summary["confusion"] = confusion.tolist()
        summary["confusion_axes"] = (f"rows: ground-truth type ({', '.join(type_names)}), columns: dominant "
                                     f"estimated type ({', '.join(component_names)})")
        if num_types == 4:  # the ground-truth types are the components: how often the dominant one is right
            summary["agreement"] = float(np.trace(confusion) / n)
            summary["agreement_per_type"] = {
                type_names[t]: (float(confusion[t, t] / confusion[t].sum()) if confusion[t].sum() else None)
                for t in range(4)
            }
    _plot_histograms(out / PLOT_NAMES[0], values)
    _plot_class_bars(out / PLOT_NAMES[1], values, labels, class_names)
    _plot_ternary(out / PLOT_NAMES[2], values, truth if truth is not None else dominant,
                  type_names if truth is not None else component_names,
                  "ground-truth type" if truth is not None else "dominant estimated type")
    summary["files"] = [CSV_NAME, JSON_NAME, *PLOT_NAMES]
    (out / JSON_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_csv(path: Path, indices, labels, split, values, dominant, truth, component_names, type_names) -> None:
    header = ["index", "label", "split", "r", "u1", "u2", "s", "dominant"]
    if truth is not None:
        header.append("true_type")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(values.shape[0]):
            row = [int(indices[i]), int(labels[i]), SPLIT_NAMES[split[i]] if split is not None else "",
                   *(f"{round(float(v), 6) + 0.0:.6f}" for v in values[i]), component_names[dominant[i]]]
            if truth is not None:
                row.append(type_names[truth[i]])
            writer.writerow(row)


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_histograms(path: Path, values: np.ndarray) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    titles = ("redundancy r", "uniqueness u1", "uniqueness u2", "synergy s")
    for k, ax in enumerate(axes.ravel()):
        v = values[:, k]
        ax.hist(v, bins=50, color=_COLORS[k], alpha=0.85)
        ax.axvline(v.mean(), color="black", linestyle="--", linewidth=1, label=f"mean {v.mean():.3f}")
        ax.set_title(titles[k])
        ax.set_xlabel("nats")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Per-sample interactions ({values.shape[0]} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_class_bars(path: Path, values: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    plt = _pyplot()
    num_classes = len(class_names)
    means = np.zeros((num_classes, 4))
    for k in range(num_classes):
        if (labels == k).any():
            means[k] = values[labels == k].mean(axis=0)
    fig, ax = plt.subplots(figsize=(min(4 + 0.45 * num_classes, 24), 4.8))
    x = np.arange(num_classes)
    # Positive parts stack upwards, negative parts downwards, so the stacks stay readable.
    up, down = np.zeros(num_classes), np.zeros(num_classes)
    for j, name in enumerate(("R", "U1", "U2", "S")):
        pos, neg = np.clip(means[:, j], 0, None), np.clip(means[:, j], None, 0)
        ax.bar(x, pos, bottom=up, color=_COLORS[j], label=name, width=0.8)
        ax.bar(x, neg, bottom=down, color=_COLORS[j], width=0.8)
        up += pos
        down += neg
    ax.axhline(0, color="black", linewidth=0.8)
    if num_classes <= 40:
        ax.set_xticks(x)
        crowded = num_classes > 8
        ax.set_xticklabels(class_names, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlabel("class")
    ax.set_ylabel("mean interaction (nats)")
    ax.set_title("Mean R / U1 / U2 / S per class")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ternary(path: Path, values: np.ndarray, groups: np.ndarray, type_names: Sequence[str], legend: str) -> None:
    """Barycentric scatter of (R+, U+, S+) normalised to sum 1, U = U1 + U2; corners R top, U left, S right."""
    plt = _pyplot()
    parts = np.stack([np.clip(values[:, 0], 0, None), np.clip(values[:, 1] + values[:, 2], 0, None),
                      np.clip(values[:, 3], 0, None)], axis=1)
    total = parts.sum(axis=1)
    keep = np.flatnonzero(total > 1e-9)
    if len(keep) > _MAX_SCATTER:
        keep = np.random.default_rng(0).choice(keep, _MAX_SCATTER, replace=False)
    bary = parts[keep] / total[keep, None]
    corners = np.array([[0.5, np.sqrt(3) / 2], [0.0, 0.0], [1.0, 0.0]])  # R, U, S
    xy = bary @ corners
    fig, ax = plt.subplots(figsize=(6.4, 6))
    ax.plot(*np.vstack([corners, corners[:1]]).T, color="black", linewidth=1)
    for name, (cx, cy), dy in zip(("R", "U = U1 + U2", "S"), corners, (0.03, -0.05, -0.05)):
        ax.text(cx, cy + dy, name, ha="center", va="center", fontsize=11)
    colors = _COLORS if len(type_names) <= len(_COLORS) else plt.get_cmap("tab20").colors
    for t, name in enumerate(type_names):
        mask = groups[keep] == t
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.5, color=colors[t % len(colors)], label=name)
    ax.set_xlim(-0.08, 1.08)
    ax.set_ylim(-0.1, 0.95)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"Sample composition (positive parts), colour: {legend}")
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """Add the ``score`` options to an argparse parser."""
    parser.add_argument("--data", required=True, help="feature dataset directory or .h5 file")
    parser.add_argument("--model", default=None, help="trained checkpoint to score (default: fit an LSMI estimator)")
    parser.add_argument("--out", required=True, help="output directory for the CSV, JSON and plots")
    parser.add_argument("--redundancy", choices=("lsmi", "mmi"), default="lsmi",
                        help="pointwise redundancy: lsmi (default; needs KNIFE density models, fitted here) or "
                             "mmi (the smaller of the two unimodal pointwise MIs)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="estimator epochs without --model (default 25), density epochs with --model "
                             "(default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the estimator / density fits (default 0)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's choice; the estimator's "
                        "small networks often run faster with 1 on few cores)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _split_codes(path, n_rows: int) -> np.ndarray:
    """(n_rows,) split code of every row of the feature set at ``path`` (train 0 / val 1 / test 2)."""
    from ..data import FeatureDataset

    codes = np.zeros(n_rows, dtype=np.int64)
    for code, name in enumerate(SPLIT_NAMES):
        try:
            rows = FeatureDataset(path, name, check_finite=False).indices
        except ValueError:  # an empty split
            continue
        codes[rows] = code
    return codes


def _load_checked_model(path: str, dims, device: torch.device):
    from ..train import load_model
    from ..train.checkpoint import read_state_dict

    _, spec = read_state_dict(path)  # a dmil-fast checkpoint has a spec; official and plain ones do not
    if isinstance(spec, dict) and spec.get("dims") is not None and tuple(spec["dims"]) != tuple(dims):
        raise ValueError(f"checkpoint {path} was trained on feature dims {tuple(spec['dims'])}, "
                         f"but the data has dims {tuple(dims)}")
    try:
        model = load_model(path).to(device).eval()
    except ValueError as exc:
        if spec is not None:
            raise
        raise ValueError(f"{exc}. {path} records no architecture (an official checkpoint or a plain "
                         "state_dict), so it was rebuilt as the official stage-3 DMIL model; a model of "
                         "another architecture is scored from the checkpoint dmil-fast train wrote") from None
    if hasattr(model, "check_backend"):  # its ops can run here (DMIL_FAST_BACKEND, device), before any data
        model.check_backend(device)
    return model


def main(args) -> int:
    """Run ``dmil-fast score`` from an argparse Namespace (attributes: data, model, out, redundancy,
    epochs, seed, batch_size, device, threads); writes the report into ``args.out`` and returns 0.
    The settings are checked before any data is read; torch's thread count is restored afterwards."""
    progress = getattr(args, "progress", True)
    epochs = getattr(args, "epochs", None)
    batch_size = getattr(args, "batch_size", None)
    batch_size = 256 if batch_size is None else batch_size
    seed = getattr(args, "seed", None)
    seed = 0 if seed is None else seed
    threads = getattr(args, "threads", None)
    for flag, value, low in (("--epochs", epochs, 1), ("--batch-size", batch_size, 1), ("--seed", seed, 0),
                             ("--threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
    device = check_device(getattr(args, "device", "auto"), name="--device")
    check_out_dir(args.out)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _score_and_report(args, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                                 progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _score_and_report(args, *, epochs, batch_size: int, seed: int, device: torch.device, progress: bool) -> int:
    from ..data import FeatureDataset
    from .estimator import LSMIEstimator
    from .scoring import score_model

    data = FeatureDataset(args.data)
    if data.num_classes < 2:
        raise ValueError(f"--data {args.data} has {data.num_classes} class{'' if data.num_classes == 1 else 'es'}; "
                         "interaction scoring needs at least 2 classes")
    if getattr(args, "model", None):
        model = _load_checked_model(args.model, data.dims, device)
        try:
            first = data[0]
            with torch.no_grad():
                probe = model.interaction_outputs(first[0][None].to(device), first[1][None].to(device))
        except BackendUnavailableError:
            raise
        except NaNInputError as exc:
            raise ValueError(f"checkpoint {args.model} holds NaN weights: the {exc.argument} of an op in "
                             "the model's forward is NaN (a diverged training?)") from None
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {args.model} does not accept the features of {args.data} "
                             f"(dims {data.dims}): {exc}") from None
        if not all(bool(torch.isfinite(probe[k]).all()) for k in ("logits_1", "logits_2", "logits_12")):
            # on a GPU the ops do not look at values (no NaNInputError): the outputs tell
            raise ValueError(f"checkpoint {args.model} holds NaN or infinite weights: its logits on the first "
                             f"sample of {args.data} are not finite (a diverged training?)")
        classes = probe["logits_12"].shape[1]
        if classes != data.num_classes:
            raise ValueError(f"checkpoint {args.model} predicts {classes} classes, but {args.data} has "
                             f"{data.num_classes}")
        scores, indices = score_model(model, data, batch_size=batch_size, density_epochs=epochs or 20,
                                      redundancy=args.redundancy, seed=seed, device=device, progress=progress)
    else:
        train = FeatureDataset(args.data, "train", check_finite=False)
        kwargs = {"epochs": epochs} if epochs else {}
        estimator = LSMIEstimator(data.num_classes, redundancy=args.redundancy, batch_size=batch_size, seed=seed,
                                  device=device, progress=progress, **kwargs)
        estimator.fit(train)
        scores = estimator.score(data)
        indices = data.indices
    summary = write_report(scores, args.out, indices=indices, labels=data.labels,
                           split=_split_codes(args.data, len(data))[indices], class_names=data.class_names,
                           interaction_type=data.interaction_type, type_names=data.interaction_types)
    means = ", ".join(f"{k} {v:.4f}" for k, v in summary["means"].items())
    print(f"scored {summary['num_samples']} samples -> {os.fspath(args.out)} (means: {means})")
    if "agreement" in summary:
        print(f"agreement of the dominant estimated type with the ground truth: {summary['agreement']:.3f}")
    return 0
