"""Per-sample interactions of a trained model, read from its own unimodal and multimodal outputs.

The model provides ``model.interaction_outputs(visual, audio)`` returning a dict with
``logits_1``, ``logits_2``, ``logits_12`` (B, C) and ``embed_1``, ``embed_2`` (B, E1/E2)
(:class:`dmil_fast.nn.DMILModel` and the baselines do). Pointwise mutual informations come
from the three logits, pointwise entropies from KNIFE densities fitted on the model's own
embeddings of the dataset.

Two passes over the dataset, both in order, eval mode, no gradients: the first collects the
embeddings (kept on the CPU) to fit the densities; the second recomputes every output and scores
each batch from that single pass, so all quantities of a row belong to the same sample.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import ops
from .._settings import check_device
from ..nn._modes import eval_mode
from ..ops import InteractionScores
from ..ops._validate import check_label_dtype
from ._inputs import positive_int, progress_bar, real_number
from .knife import KNIFE

_KEYS = ("logits_1", "logits_2", "logits_12", "embed_1", "embed_2")


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _outputs(model, b1: torch.Tensor, b2: torch.Tensor) -> dict:
    out = model.interaction_outputs(b1, b2)
    if not isinstance(out, dict) or any(k not in out for k in _KEYS):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise TypeError(f"model.interaction_outputs must return a dict with keys {_KEYS}, got {got}")
    return out


def _batches(dataset, batch_size: int, device: torch.device, num_workers: int):
    """Yield (x1, x2, y, index) batches in dataset order; index = item[3] when items carry one."""
    # A private generator: without one the loader draws its workers' base seed from the global RNG.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    position = 0
    for item in loader:
        b1, b2, by = item[0], item[1], item[2]
        check_label_dtype("dataset labels", by)
        n = by.shape[0]
        idx = item[3] if len(item) > 3 else torch.arange(position, position + n)
        position += n
        yield (b1.to(device, non_blocking=True), b2.to(device, non_blocking=True),
               by.to(device, torch.int64, non_blocking=True), idx.to(torch.int64).reshape(-1))


def score_model(model: torch.nn.Module, dataset, *, batch_size: int = 256, density_epochs: int = 20,
                density_components: int = 5, density_lr: float = 1e-2, redundancy: str = "lsmi",
                prior: str = "empirical", device=None, adjust: bool = True, seed: int = 0,
                num_workers: int = 0, progress: bool = True) -> Tuple[InteractionScores, np.ndarray]:
    """Per-sample R, U1, U2, S of ``model`` on ``dataset``.

    Args:
        model: an nn.Module with ``interaction_outputs(visual, audio)`` (see the module docstring).
        dataset: map-style dataset whose items start with ``(x1, x2, label)`` (integer labels) and
            may carry the sample's row index fourth (a :class:`dmil_fast.data.FeatureDataset`).
        batch_size: samples per forward pass.
        density_epochs / density_components / density_lr: KNIFE fitting on the embeddings.
        redundancy: "lsmi" (needs the densities) or "mmi".
        prior: "empirical" (label frequencies of ``dataset``; an absent class counts once) or
            "uniform" (log 1/C).
        device: where the model runs; None = the device of the model's parameters.
        adjust: apply the dataset-level shift over all scored samples.
        seed: seeds the density fits (modality 1's with ``seed``, modality 2's with ``seed + 1``).

    Returns:
        ``(scores, indices)``: an InteractionScores of (N,) float32 CPU tensors in dataset order and
        ``indices`` (N,) int64, the sample indices of the rows (item[3], else 0..N-1).

    The model is put in eval mode for the call (afterwards each submodule has its own earlier mode
    again) and runs under ``torch.no_grad()``. The global random state is left untouched.
    """
    if not hasattr(model, "interaction_outputs"):
        raise TypeError(f"model must provide interaction_outputs(visual, audio); {type(model).__name__} does not")
    batch_size = positive_int("batch_size", batch_size)
    density_epochs = positive_int("density_epochs", density_epochs)
    density_components = positive_int("density_components", density_components)
    density_lr = real_number("density_lr", density_lr, low=0, low_ok=False)
    seed = positive_int("seed", seed, low=0)
    num_workers = positive_int("num_workers", num_workers, low=0)
    if redundancy not in ("lsmi", "mmi"):
        raise ValueError(f"redundancy must be 'lsmi' or 'mmi', got {redundancy!r}")
    if prior not in ("empirical", "uniform"):
        raise ValueError(f"prior must be 'empirical' or 'uniform', got {prior!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty; expected at least one sample")
    device = _model_device(model) if device is None else check_device(device)
    with eval_mode(model), torch.no_grad():
        return _score(model, dataset, batch_size=batch_size, density_epochs=density_epochs,
                      density_components=density_components, density_lr=density_lr,
                      redundancy=redundancy, prior=prior, device=device, adjust=adjust, seed=seed,
                      num_workers=num_workers, progress=progress)


def _score(model, dataset, *, batch_size, density_epochs, density_components, density_lr, redundancy,
           prior, device, adjust, seed, num_workers, progress):
    n_batches = -(-len(dataset) // batch_size)
    # Pass 1: embeddings (for the densities) and labels (for the prior), in order.
    emb1, emb2, labels, num_classes = [], [], [], None
    for b1, b2, by, _ in progress_bar(_batches(dataset, batch_size, device, num_workers), enabled=progress,
                                       desc="embeddings", total=n_batches):
        out = _outputs(model, b1, b2)
        num_classes = out["logits_12"].shape[-1]
        if redundancy == "lsmi":
            emb1.append(out["embed_1"].float().reshape(b1.shape[0], -1).cpu())
            emb2.append(out["embed_2"].float().reshape(b2.shape[0], -1).cpu())
        labels.append(by.cpu())
    labels = torch.cat(labels)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"dataset labels must lie in [0, {num_classes}) (the model's classes), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if prior == "empirical":
        counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).double()
        log_prior = (counts / counts.sum()).log().float().to(device)
    else:
        log_prior = torch.full((num_classes,), -math.log(num_classes), device=device)

    densities = None
    if redundancy == "lsmi":
        densities = []
        for k, chunks in enumerate((emb1, emb2)):
            emb = torch.cat(chunks)
            with torch.random.fork_rng(devices=[]):  # fit() re-initialises from its own seeded generator
                knife = KNIFE(emb.shape[1], density_components)
            knife = knife.to(device)
            with torch.enable_grad():
                knife.fit(emb, epochs=density_epochs, batch_size=batch_size, lr=density_lr, seed=seed + k,
                          progress=progress)
            densities.append(knife.eval())
        del emb1, emb2

    # Pass 2: every quantity of a batch from the same forward pass.
    parts, indices = [], []
    for b1, b2, by, idx in progress_bar(_batches(dataset, batch_size, device, num_workers), enabled=progress,
                                         desc="interactions", total=n_batches):
        out = _outputs(model, b1, b2)
        h1 = h2 = None
        if densities is not None:
            h1 = densities[0](out["embed_1"].float().reshape(b1.shape[0], -1))
            h2 = densities[1](out["embed_2"].float().reshape(b2.shape[0], -1))
        scores = ops.interaction_scores(out["logits_1"].float(), out["logits_2"].float(), out["logits_12"].float(),
                                        by, entropy_1=h1, entropy_2=h2, log_prior=log_prior,
                                        redundancy=redundancy)
        parts.append([t.cpu() for t in scores])
        indices.append(idx)
    scores = InteractionScores(*(torch.cat([p[k] for p in parts]) for k in range(len(InteractionScores._fields))))
    if adjust:
        scores = ops.adjust_interactions(scores)
    return scores, torch.cat(indices).numpy()
