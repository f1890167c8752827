"""The training harness: DMIL's three-stage schedule and the baselines, on feature data.

Schedule (the official ``train.py``): epochs are numbered from 1; DMIL runs stage 1 for
``stage1_epochs``, stage 2 for ``stage2_epochs`` (0 stops after stage 1) and stage 3 for the
rest of ``n_epochs``. Each stage starts with a fresh optimizer over the trainable parameters at
the stage's learning rate and its own ReduceLROnPlateau on the validation loss; the best
validation-accuracy checkpoint of the finished stage is reloaded first. Validation every
``val_freq`` epochs (CE of ``out`` and accuracy); the test at the end uses the best checkpoint of
the last stage. Baselines run one stage at ``lr`` with the ``plateau_*`` schedule.

Outputs in ``out_dir``: ``log.csv`` (one row per epoch), ``tensorboard/`` (when
``torch.utils.tensorboard`` imports), ``checkpoints/best_stage{k}.pt`` and ``checkpoints/last.pt``
(atomic), ``metrics.json``.

The class keeps each concern in one method (``train_step``, ``train_epoch``, ``evaluate``,
``enter_stage``, ``rng_state``) so that distributed data parallelism, exact resume, mixed
precision and compilation can be added around them.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DMILConfig
from .data import FeatureData, Split
from .factory import METHODS, build_model
from .losses import baseline_loss, dmil_loss
from .metrics import prediction_metrics

CSV_FIELDS = ("epoch", "stage", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def stage_of_epoch(epoch: int, config: DMILConfig) -> Optional[int]:
    """DMIL stage of the 1-based ``epoch``; ``None`` once the schedule is over."""
    if epoch < 1:
        raise ValueError(f"epoch must be >= 1, got {epoch}")
    if epoch > config.n_epochs:
        return None
    if epoch <= config.stage1_epochs:
        return 1
    if config.stage2_epochs == 0:
        return None
    return 2 if epoch <= config.stage1_epochs + config.stage2_epochs else 3


class Trainer:
    """Trains ``method`` ("dmil", "joint", "ensemble") on ``data`` with ``config``.

    Args:
        data: the splits in memory (:class:`FeatureData`).
        out_dir: where logs, checkpoints and ``metrics.json`` go.
        device: torch device for the model and data.
        progress: show tqdm bars. echo: called with one line per epoch (``None``: silent).
        model: a prebuilt model (default: :func:`build_model` from the config).
    """

    def __init__(self, data: FeatureData, config: DMILConfig, *, method: str, out_dir, device="cpu",
                 progress: bool = False, echo: Optional[Callable[[str], None]] = print,
                 model: Optional[torch.nn.Module] = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.config, self.device = method, config, torch.device(device)
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.progress, self.echo = progress, echo or (lambda line: None)
        seed_everything(config.random_seed)
        self.shuffle_gen = torch.Generator().manual_seed(config.random_seed)
        self.data = data.to(self.device)
        self.model = (model or build_model(method, data.dims, data.num_classes, config)).to(self.device)
        self.stage: Optional[int] = None
        self.epoch = 0
        self.best_acc: Dict[int, float] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.last_train: Dict[str, float] = {}
        self._csv = None
        self._tb = None

    # ------------------------------------------------------------ schedule

    @property
    def is_dmil(self) -> bool:
        return self.method == "dmil"

    def stage_of(self, epoch: int) -> Optional[int]:
        if self.is_dmil:
            return stage_of_epoch(epoch, self.config)
        return 1 if epoch <= self.config.n_epochs else None

    def stage_lr(self, stage: int) -> float:
        return self.config.stage_lr(stage) if self.is_dmil else self.config.lr

    def best_path(self, stage: int) -> Path:
        return self.ckpt_dir / f"best_stage{stage}.pt"

    def enter_stage(self, stage: int) -> None:
        """Reload the finished stage's best checkpoint, configure ``stage``, rebuild optimizer and scheduler."""
        if self.stage is not None and self.best_path(self.stage).is_file():
            self.model.load_state_dict(load_checkpoint(self.best_path(self.stage), map_location=self.device)["state_dict"])
        self.stage = stage
        if self.is_dmil:
            self.model.configure_stage(stage)
        self.optimizer = self.build_optimizer(self.stage_lr(stage))
        factor, patience = self.config.plateau(stage if self.is_dmil else 0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, "min", factor=factor,
                                                                    patience=patience)

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        c = self.config
        if c.optimizer == "SGD":
            return torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=lr, betas=c.adam_betas, eps=c.adam_eps, weight_decay=c.weight_decay)

    # ------------------------------------------------------------ steps

    def compute_loss(self, outputs, labels):
        if self.is_dmil:
            return dmil_loss(outputs, labels, stage=self.stage, config=self.config)
        return baseline_loss(outputs, labels, method=self.method)

    def train_step(self, x1, x2, y):
        """One optimisation step on a batch -> (loss value, outputs)."""
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.model(x1, x2)
        loss, _ = self.compute_loss(outputs, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at epoch {self.epoch} (stage {self.stage})")
        loss.backward()
        self.optimizer.step()
        return loss.detach(), outputs

    def train_epoch(self) -> Dict[str, float]:
        from tqdm.auto import tqdm

        self.model.train()
        split = self.data.train
        total, correct, seen = 0.0, 0, 0
        batches = split.batches(self.config.batch_size, generator=self.shuffle_gen, drop_singleton=True)
        steps = -(-len(split) // self.config.batch_size)
        for x1, x2, y in tqdm(batches, total=steps, desc=f"epoch {self.epoch} stage {self.stage}", leave=False,
                              disable=not self.progress):
            loss, outputs = self.train_step(x1, x2, y)
            b = y.shape[0]
            total += float(loss) * b
            correct += int((outputs["out"].detach().argmax(dim=1) == y).sum())
            seen += b
        self.last_train = {"loss": total / max(seen, 1), "acc": correct / max(seen, 1)}
        return self.last_train

    @torch.no_grad()
    def evaluate(self, split: Split) -> Dict[str, float]:
        """Eval-mode CE of ``out`` and accuracy over ``split`` (the official validation)."""
        self.model.eval()
        total, correct = 0.0, 0
        for x1, x2, y in split.batches(max(self.config.batch_size, 256)):
            out = self.model(x1, x2)["out"]
            total += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
        n = len(split)
        return {"loss": total / n, "acc": correct / n}

    @torch.no_grad()
    def predict(self, split: Split) -> Dict[str, torch.Tensor]:
        """``interaction_outputs`` logits over ``split`` (eval semantics), concatenated on the CPU."""
        parts = {"logits_1": [], "logits_2": [], "logits_12": []}
        for x1, x2, _ in split.batches(max(self.config.batch_size, 256)):
            out = self.model.interaction_outputs(x1, x2)
            for k in parts:
                parts[k].append(out[k].float().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    # ------------------------------------------------------------ state

    def rng_state(self) -> Dict[str, object]:
        """Every random state a resumed run needs (torch CPU and CUDA, the shuffling generator)."""
        state = {"torch": torch.get_rng_state(), "shuffle": self.shuffle_gen.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def model_spec(self) -> Dict[str, object]:
        return {"method": self.method, "dims": list(self.data.dims), "num_classes": self.data.num_classes,
                "stage": self.stage or 1, "config": self.config.to_dict(), "class_names": self.data.class_names}

    def checkpoint_payload(self, **extra) -> Dict[str, object]:
        return dict({"state_dict": self.model.state_dict(), "model": self.model_spec(), "epoch": self.epoch,
                     "stage": self.stage}, **extra)

    def save_last(self) -> None:
        save_checkpoint(self.ckpt_dir / "last.pt", self.checkpoint_payload(
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            best_acc=dict(self.best_acc), rng=self.rng_state()))

    # ------------------------------------------------------------ logging

    def _open_logs(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.ckpt_dir.glob("best_stage*.pt"):  # a previous run's best must not be reloaded
            stale.unlink()
        self._csv_file = open(self.out_dir / "log.csv", "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS)
        self._csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            self._tb = None
        else:
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def _log(self, row: Dict[str, object]) -> None:
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc"):
                if row.get(key) not in (None, ""):
                    self._tb.add_scalar(key, float(row[key]), int(row["epoch"]))

    def _close_logs(self) -> None:
        if self._csv is not None:
            self._csv_file.close()
        if self._tb is not None:
            self._tb.close()

    # ------------------------------------------------------------ run

    def fit(self) -> Dict[str, object]:
        """Run the whole schedule, test the best checkpoint of the last stage, write metrics.json."""
        start = time.perf_counter()
        self._open_logs()
        try:
            epoch = 1
            while (stage := self.stage_of(epoch)) is not None:
                if stage != self.stage:
                    self.enter_stage(stage)
                self.epoch = epoch
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                train = self.train_epoch()
                row = {"epoch": epoch, "stage": stage, "lr": lr, "train_loss": train["loss"],
                       "train_acc": train["acc"], "val_loss": "", "val_acc": ""}
                if epoch % self.config.val_freq == 0:
                    val = self.evaluate(self.data.val)
                    row.update(val_loss=val["loss"], val_acc=val["acc"])
                    if val["acc"] > self.best_acc.get(stage, float("-inf")):
                        self.best_acc[stage] = val["acc"]
                        save_checkpoint(self.best_path(stage), self.checkpoint_payload(val=val))
                    self.scheduler.step(val["loss"])
                self.save_last()
                row["seconds"] = round(time.perf_counter() - t0, 3)
                self._log(row)
                self.echo(f"[{self.method}] epoch {epoch:3d} stage {stage} lr {lr:.2e} "
                          f"train loss {train['loss']:.4f} acc {train['acc']:.3f}"
                          + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}" if row["val_acc"] != "" else ""))
                epoch += 1
        finally:
            self._close_logs()
        return self.finish(time.perf_counter() - start)

    def finish(self, train_seconds: float) -> Dict[str, object]:
        t0 = time.perf_counter()
        if self.stage is not None and self.best_path(self.stage).is_file():
            self.model.load_state_dict(load_checkpoint(self.best_path(self.stage), map_location=self.device)["state_dict"])
        test = self.evaluate(self.data.test)
        logits = self.predict(self.data.test)
        m = prediction_metrics(logits["logits_1"], logits["logits_2"], logits["logits_12"], self.data.test.y,
                               class_names=self.data.class_names, types=self.data.test.types,
                               type_names=self.data.type_names)
        metrics = {
            "method": self.method, "preset": self.config.preset,
            "test_accuracy": m["accuracy"], "test_loss": test["loss"],
            "per_class_accuracy": m["per_class_accuracy"], "per_type_accuracy": m["per_type_accuracy"],
            "syn": m["syn"], "test_accuracy_1": m["accuracy_1"], "test_accuracy_2": m["accuracy_2"],
            "best_val_accuracy": self.best_acc.get(self.stage), "final_train_loss": self.last_train.get("loss"),
            "epochs": self.epoch, "stage_epochs": self._stage_epochs(), "seed": self.config.random_seed,
            "world_size": 1, "device": str(self.device),
            "seconds": round(train_seconds + time.perf_counter() - t0, 3),
            "config": self.config.to_dict(), "data": self.data.path,
        }
        tmp = self.out_dir / ".metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, self.out_dir / "metrics.json")
        return metrics

    def _stage_epochs(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for epoch in range(1, self.epoch + 1):
            s = self.stage_of(epoch)
            counts[str(s)] = counts.get(str(s), 0) + 1
        return counts


def train(data, *, method: str, config: DMILConfig, out_dir, device="cpu", progress: bool = False,
          echo: Optional[Callable[[str], None]] = print) -> Dict[str, object]:
    """Load (and validate) ``data`` (a feature dataset path or :class:`FeatureData`), train, test.

    Returns the metrics also written to ``out_dir/metrics.json``.
    """
    if not isinstance(data, FeatureData):
        data = FeatureData.load(data)
    trainer = Trainer(data, config, method=method, out_dir=out_dir, device=device, progress=progress, echo=echo)
    return trainer.fit()
