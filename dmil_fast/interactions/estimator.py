"""LSMI: per-sample redundancy, uniqueness and synergy estimated from data.

Three discriminators trained with cross-entropy (an MLP on modality 1, one on modality 2 and a
tensor-fusion network on both) give pointwise mutual informations i_k = log p(y | x_k) - log p(y);
two KNIFE densities give pointwise entropies h_k = -log p(x_k). :func:`dmil_fast.ops.interaction_scores`
turns them into r, u1, u2, s per sample and :func:`dmil_fast.ops.adjust_interactions` applies the
dataset-level shift.

Prior: with ``prior="empirical"`` (default) log p(y) is the log class frequency of the training
labels, so i_k estimates the true pointwise mutual information and the dataset means add up to
I(X; Y). ``prior="uniform"`` uses log 1/C as the public LSMI code does; on imbalanced classes it
shifts every i_k by log(C p(y)) and biases the decomposition (for the OR / AND gates, classes 3:1,
it gives R = S = (1/2) ln 2 = 0.347 after the shift instead of the exact R = 0.216, S = 0.347).

Training: inputs are standardised with the training mean / std; Adam with cosine decay, the
gradients of every optimiser zeroed before each step; ``val_fraction`` of the training samples
are held out and each network keeps the parameters of its epoch with the lowest held-out loss
(probabilities that generalise, rather than the over-confident ones of the last epoch).

All per-sample quantities of :meth:`LSMIEstimator.score` come from one pass over the data in
order (the same batches feed the discriminators and the densities), so row i of every output
belongs to sample i of the input.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from .._settings import check_device
from ..ops import InteractionScores
from ._inputs import Source, feature_stats, positive_int, progress_bar, real_number
from .knife import KNIFE


class _Standardize(nn.Module):
    """x -> (x - loc) / scale with fixed buffers loc, scale (D,)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.loc) / self.scale


def _discriminator(dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Unimodal discriminator: standardise -> Linear -> ReLU -> Linear -> ReLU -> Linear (C logits)."""
    return nn.Sequential(
        _Standardize(dim),
        nn.Linear(dim, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class _JointDiscriminator(nn.Module):
    """Bimodal discriminator with tensor fusion, on x = [x1, x2] (B, D1 + D2) -> (B, C) logits.

    Each modality is encoded to ``rank`` features (z1, z2); the head reads [z1, z2, vec(z1 z2^T)].
    The outer product lets the head express label rules that depend on the pair of inputs (such
    as y = a + b mod C) without having to discover the multiplicative interaction itself.
    """

    def __init__(self, dims, hidden: int, num_classes: int, rank: int):
        super().__init__()
        d1, d2 = dims
        self.split = d1
        self.standardize = _Standardize(d1 + d2)
        self.encode_1 = nn.Sequential(nn.Linear(d1, hidden), nn.ReLU(), nn.Linear(hidden, rank))
        self.encode_2 = nn.Sequential(nn.Linear(d2, hidden), nn.ReLU(), nn.Linear(hidden, rank))
        self.head = nn.Sequential(nn.Linear(2 * rank + rank * rank, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.standardize(x)
        z1, z2 = self.encode_1(x[:, :self.split]), self.encode_2(x[:, self.split:])  # (B, rank) each
        outer = (z1[:, :, None] * z2[:, None, :]).flatten(1)                       # (B, rank * rank)
        return self.head(torch.cat([z1, z2, outer], dim=1))


class LSMIEstimator:
    """Per-sample interaction estimator (LSMI) for two modalities and C classes.

    Args:
        num_classes: C >= 2.
        redundancy: "lsmi" (pointwise, needs the density models) or "mmi" (r = min(i1, i2)).
        prior: "empirical" (class frequencies of the training labels; a class absent from them
            counts once) or "uniform" (log 1/C).
        hidden: width of the discriminators' hidden layers.
        fusion_rank: features per modality whose outer product the joint discriminator reads.
        epochs: discriminator training epochs; density_epochs: KNIFE epochs (default: epochs).
        batch_size: mini-batch size for training and scoring.
        lr: Adam learning rate of the discriminators; density_lr: of the densities (default 10 lr).
        components: KNIFE mixture components.
        val_fraction: share of the training samples held out for model selection (0 = none).
        weight_decay: L2 penalty of the discriminators' Adam.
        seed: seeds parameter initialisation and shuffling (the global RNG is left untouched).
        device: None = CUDA when available, else CPU.
        num_workers: DataLoader workers when reading a dataset.
        progress: show tqdm progress bars (per call overridable).

    Inputs of :meth:`fit` / :meth:`score`: ``x1`` (N, D1), ``x2`` (N, D2) floating tensors or arrays
    and ``y`` (N,) integer labels in [0, C); or a dataset (items ``(x1, x2, label, ...)``, e.g. a
    :class:`dmil_fast.data.FeatureDataset`) as ``x1`` with ``x2 = y = None``, streamed in batches.
    """

    def __init__(self, num_classes: int, *, redundancy: str = "lsmi", prior: str = "empirical",
                 hidden: int = 64, epochs: int = 25, density_epochs: Optional[int] = None,
                 batch_size: int = 256, lr: float = 3e-3, density_lr: Optional[float] = None,
                 fusion_rank: int = 16, components: int = 5, val_fraction: float = 0.1,
                 weight_decay: float = 1e-2, seed: int = 0, device=None, num_workers: int = 0,
                 progress: bool = True):
        if redundancy not in ("lsmi", "mmi"):
            raise ValueError(f"redundancy must be 'lsmi' or 'mmi', got {redundancy!r}")
        if prior not in ("empirical", "uniform"):
            raise ValueError(f"prior must be 'empirical' or 'uniform', got {prior!r}")
        self.num_classes = positive_int("num_classes", num_classes, low=2)
        self.redundancy = redundancy
        self.prior = prior
        self.hidden = positive_int("hidden", hidden)
        self.epochs = positive_int("epochs", epochs)
        self.density_epochs = positive_int("density_epochs", density_epochs if density_epochs is not None else epochs)
        self.batch_size = positive_int("batch_size", batch_size)
        self.fusion_rank = positive_int("fusion_rank", fusion_rank)
        self.components = positive_int("components", components)
        self.lr = real_number("lr", lr, low=0, low_ok=False)
        self.density_lr = 10.0 * self.lr if density_lr is None else real_number("density_lr", density_lr, low=0, low_ok=False)
        self.val_fraction = real_number("val_fraction", val_fraction, low=0, low_ok=True)
        if not self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.weight_decay = real_number("weight_decay", weight_decay, low=0, low_ok=True)
        self.seed = positive_int("seed", seed, low=0)
        self.device = check_device("auto" if device is None else device)
        self.num_workers = positive_int("num_workers", num_workers, low=0)
        self.progress = bool(progress)
        self.dims = None
        self.log_prior = None           # (C,) float32 once fitted
        self.discriminators = None      # nn.ModuleList: modality 1, modality 2, both
        self.densities = None           # nn.ModuleList of two KNIFE (only for "lsmi")
        self.history = []               # per epoch: {"epoch", "train": losses, "val": held-out losses}

    # ------------------------------------------------------------------ fitting
    def fit(self, x1, x2=None, y=None, *, progress: Optional[bool] = None) -> "LSMIEstimator":
        """Train the discriminators (and densities) on (x1, x2, y); returns self."""
        show = self.progress if progress is None else bool(progress)
        source = Source(x1, x2, y, num_classes=self.num_classes, num_workers=self.num_workers,
                        seed=self.seed)
        if len(source) < 2:
            raise ValueError(f"fitting needs at least 2 samples, got {len(source)}")
        device = self.device
        mean1, std1, mean2, std2, counts = feature_stats(source, batch_size=max(self.batch_size, 1024),
                                                         device=device)
        self.dims = source.dims
        freq = counts.clamp_min(1).double()
        if self.prior == "empirical":
            self.log_prior = (freq / freq.sum()).log().float()
        else:
            self.log_prior = torch.full((self.num_classes,), -math.log(self.num_classes), device=device)

        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            d1, d2 = self.dims
            self.discriminators = nn.ModuleList([
                _discriminator(d1, self.hidden, self.num_classes),
                _discriminator(d2, self.hidden, self.num_classes),
                _JointDiscriminator((d1, d2), self.hidden, self.num_classes, self.fusion_rank),
            ]).to(device)
            standardizers = (self.discriminators[0][0], self.discriminators[1][0], self.discriminators[2].standardize)
            for module, loc, scale in zip(standardizers, (mean1, mean2, torch.cat([mean1, mean2])),
                                          (std1, std2, torch.cat([std1, std2]))):
                module.loc.copy_(loc.float())
                module.scale.copy_(scale.float())
            self.densities = None
            if self.redundancy == "lsmi":
                self.densities = nn.ModuleList([KNIFE(d1, self.components), KNIFE(d2, self.components)]).to(device)
                for knife in self.densities:
                    knife.reset_parameters(gen)
                rows = torch.randperm(len(source), generator=gen)[: self.components]
                s1, s2 = source.take(rows)
                self.densities[0].prepare(loc=mean1, scale=std1, samples=s1.to(device))
                self.densities[1].prepare(loc=mean2, scale=std2, samples=s2.to(device))

        train_src, val_src = source, None
        if self.val_fraction > 0:
            n_val = int(round(self.val_fraction * len(source)))
            if 0 < n_val < len(source):
                order = torch.randperm(len(source), generator=gen)
                val_src, train_src = source.subset(order[:n_val].sort().values), source.subset(order[n_val:])
        self._train_loop(train_src, val_src, gen, show)
        return self

    def _train_loop(self, train_src: Source, val_src: Optional[Source], gen: torch.Generator, show: bool) -> None:
        """Adam with cosine decay, gradients zeroed every step; with a held-out set, each model
        keeps the parameters of its epoch with the lowest held-out loss."""
        models = list(self.discriminators) + (list(self.densities) if self.densities is not None else [])
        steps = train_src.num_batches(self.batch_size)
        cls_opt = torch.optim.Adam(self.discriminators.parameters(), lr=self.lr,
                                   weight_decay=self.weight_decay, foreach=True)
        sched = [torch.optim.lr_scheduler.CosineAnnealingLR(cls_opt, T_max=self.epochs * steps)]
        den_opt = None
        if self.densities is not None:
            den_opt = torch.optim.Adam(self.densities.parameters(), lr=self.density_lr, foreach=True)
            sched.append(torch.optim.lr_scheduler.CosineAnnealingLR(den_opt, T_max=self.density_epochs * steps))
        total_epochs = max(self.epochs, self.density_epochs if den_opt is not None else 0)
        best = [math.inf] * len(models)
        best_state = [None] * len(models)
        self.history = []
        bar = progress_bar(range(total_epochs), enabled=show, desc="LSMI fit")
        for epoch in bar:
            train_cls = epoch < self.epochs
            train_den = den_opt is not None and epoch < self.density_epochs
            for m in models:
                m.train()
            sums = torch.zeros(len(models), dtype=torch.float64)
            seen = 0
            for b1, b2, by in train_src.batches(self.batch_size, device=self.device, shuffle=True, generator=gen):
                if train_cls:
                    cls_opt.zero_grad(set_to_none=True)
                    losses = self._cls_losses(b1, b2, by)
                    sum(losses).backward()
                    cls_opt.step()
                    sched[0].step()
                    sums[:3] += torch.stack([l.detach().double().cpu() for l in losses]) * b1.shape[0]
                if train_den:
                    den_opt.zero_grad(set_to_none=True)
                    losses = self._density_losses(b1, b2)
                    sum(losses).backward()
                    den_opt.step()
                    sched[1].step()
                    sums[3:] += torch.stack([l.detach().double().cpu() for l in losses]) * b1.shape[0]
                seen += b1.shape[0]
            record = {"epoch": epoch + 1, "train": (sums / seen).tolist()}
            if val_src is not None:
                val = self._evaluate(val_src)
                record["val"] = val
                active = [train_cls] * 3 + [train_den] * (len(models) - 3)
                for k, m in enumerate(models):
                    if active[k] and val[k] < best[k]:
                        best[k] = val[k]
                        best_state[k] = {n: t.detach().clone() for n, t in m.state_dict().items()}
            self.history.append(record)
            if show and hasattr(bar, "set_postfix"):
                shown = record.get("val", record["train"])
                bar.set_postfix(ce_12=f"{shown[2]:.4f}", refresh=False)
        for m, state in zip(models, best_state):
            if state is not None:
                m.load_state_dict(state)
            m.eval()

    @torch.no_grad()
    def _evaluate(self, source: Source) -> list:
        """Mean held-out losses in order: CE of the 3 discriminators, then NLL of the densities."""
        models = list(self.discriminators) + (list(self.densities) if self.densities is not None else [])
        for m in models:
            m.eval()
        sums = torch.zeros(len(models), dtype=torch.float64)
        for b1, b2, by in source.batches(max(self.batch_size, 1024), device=self.device):
            losses = self._cls_losses(b1, b2, by, reduction="sum")
            if self.densities is not None:
                losses += [-d.log_prob(b).sum() for d, b in zip(self.densities, (b1, b2))]
            sums += torch.stack([l.double().cpu() for l in losses])
        return (sums / len(source)).tolist()

    def _density_losses(self, b1: torch.Tensor, b2: torch.Tensor) -> list:
        return [-self.densities[0].log_prob(b1).mean(), -self.densities[1].log_prob(b2).mean()]

    def _cls_losses(self, b1: torch.Tensor, b2: torch.Tensor, by: torch.Tensor, reduction: str = "mean") -> list:
        f1, f2, f12 = self.discriminators
        ce = nn.functional.cross_entropy
        return [ce(f1(b1), by, reduction=reduction), ce(f2(b2), by, reduction=reduction),
                ce(f12(torch.cat([b1, b2], dim=1)), by, reduction=reduction)]

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if self.discriminators is None:
            raise RuntimeError("LSMIEstimator.score called before fit")

    @torch.no_grad()
    def score(self, x1, x2=None, y=None, *, adjust: bool = True, batch_size: Optional[int] = None,
              progress: Optional[bool] = None) -> InteractionScores:
        """Per-sample interactions of (x1, x2, y): an InteractionScores of (N,) float32 tensors on the
        estimator's device, row i = sample i. ``adjust`` applies the dataset-level shift over these N.
        ``batch_size``: samples per scoring batch (default: max(training batch size, 2048)); the
        values do not depend on it."""
        self._check_fitted()
        batch_size = positive_int("batch_size", batch_size) if batch_size is not None else max(self.batch_size, 2048)
        show = self.progress if progress is None else bool(progress)
        source = Source(x1, x2, y, num_classes=self.num_classes, num_workers=self.num_workers,
                        seed=self.seed)
        for k in range(2):
            if source.dims[k] != self.dims[k]:
                raise ValueError(f"{source.names[k]} must have {self.dims[k]} features per sample (the dims at fit "
                                 f"were {self.dims}), got {source.dims[k]}")
        parts = []
        batches = source.batches(batch_size, device=self.device)
        for b1, b2, by in progress_bar(batches, enabled=show, desc="LSMI score",
                                        total=source.num_batches(batch_size)):
            parts.append(self._score_batch(b1, b2, by))
        scores = InteractionScores(*(torch.cat([p[k] for p in parts]) for k in range(len(InteractionScores._fields))))
        return ops.adjust_interactions(scores) if adjust else scores

    def _score_batch(self, b1: torch.Tensor, b2: torch.Tensor, by: torch.Tensor) -> InteractionScores:
        """Every quantity of one batch from the same rows: logits, entropies, then the scores."""
        f1, f2, f12 = self.discriminators
        logits_1, logits_2 = f1(b1), f2(b2)
        logits_12 = f12(torch.cat([b1, b2], dim=1))
        h1 = h2 = None
        if self.densities is not None:
            h1, h2 = self.densities[0](b1), self.densities[1](b2)
        return ops.interaction_scores(logits_1, logits_2, logits_12, by, entropy_1=h1, entropy_2=h2,
                                      log_prior=self.log_prior, redundancy=self.redundancy)


__all__ = ["LSMIEstimator"]
