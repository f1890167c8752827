"""The training harness: DMIL's three-stage schedule and the baselines, on features or raw CREMA-D.

Schedule (the official ``train.py``): epochs are numbered from 1; DMIL runs stage 1 for
``stage1_epochs``, stage 2 for ``stage2_epochs`` (0 stops after stage 1) and stage 3 for the
rest of ``n_epochs``. Each stage starts with a fresh optimizer over the trainable parameters at
the stage's learning rate and its own ReduceLROnPlateau on the validation loss; the best
validation-accuracy checkpoint of the finished stage is reloaded first. Validation every
``val_freq`` epochs (CE of ``out`` and accuracy); the test at the end uses the best checkpoint of
the last stage. Baselines run one stage at ``lr`` with the ``plateau_*`` schedule.

Scale: data-parallel over ranks (:mod:`.distributed`; ``batch_size`` is the global batch),
streamed data through DataLoader workers (:mod:`.sampling`), bf16 autocast (``amp="bf16"``),
``torch.compile`` of the model (``compile``). Never losing work: ``checkpoints/last.pt`` is
written atomically at the end of every epoch and every ``checkpoint_every`` steps, and
``fit(resume=True)`` continues from it exactly (:mod:`.resume`); a fresh run refuses an
``out_dir`` that holds an earlier run's checkpoints or ``metrics.json`` unless ``overwrite``.

Outputs in ``out_dir`` (rank 0): ``log.csv``, ``tensorboard/``, ``checkpoints/best_stage{k}.pt``,
``checkpoints/last.pt``, ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .._settings import check_device
from ..ops._validate import NaNInputError
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .config import DMILConfig
from .data import FeatureData
from .distributed import DistContext, all_gather_objects, all_reduce_sum, barrier, broadcast_buffers, wrap_model
from .factory import METHODS, build_model
from .losses import baseline_loss, dmil_loss
from .metrics import prediction_metrics
from .resume import (Position, ResumableTraining, check_fresh_out_dir, data_fingerprint, previous_outputs,
                     remove_partial_files)
from .runlog import RunLog
from .sampling import eval_batches, iterate, make_loader, per_rank_batch, train_batches

AMP_DTYPES = {"bf16": torch.bfloat16}


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


class Trainer(ResumableTraining):
    """Trains ``method`` ("dmil", "joint", "ensemble") on ``data`` with ``config``.

    Args:
        data: :class:`FeatureData` (in memory or streamed) or :class:`~dmil_fast.train.media.MediaData`.
        out_dir: where logs, checkpoints and ``metrics.json`` go.
        device: torch device (ignored when ``dist`` is given: its device is used).
        progress: show tqdm bars. echo: called with one line per epoch (``None``: silent).
        model: a prebuilt model (default: built from the config and the data).
        dist: the process group (:func:`~dmil_fast.train.distributed.init_distributed`); default one process.
        amp: ``None`` or ``"bf16"`` (autocast on the training device).
        compile: ``False``, ``True`` (torch.compile, inductor) or a torch.compile backend name.
        checkpoint_every: also write ``last.pt`` every this many steps within an epoch (0: epoch ends only).
        workers: DataLoader worker processes for streamed data (default 2; in-memory data uses none).
        init_from: initial weights (any checkpoint :func:`~dmil_fast.train.checkpoint.load_weights` reads).
        backend: ops backend of the DMIL model (``None``: automatic).
        overwrite: let a fresh run replace the outputs of an earlier one in ``out_dir`` (its
            checkpoints and ``metrics.json``); without it, :meth:`fit` refuses (FileExistsError)
            unless it resumes that run.
    """

    def __init__(self, data, config: DMILConfig, *, method: str, out_dir, device="cpu", progress: bool = False,
                 echo: Optional[Callable[[str], None]] = print, model: Optional[torch.nn.Module] = None,
                 dist: Optional[DistContext] = None, amp: Optional[str] = None, compile: Union[bool, str] = False,
                 checkpoint_every: int = 0, workers: Optional[int] = None, init_from=None,
                 backend: Optional[str] = None, sync_bn: bool = False, overwrite: bool = False):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
        for name, value in (("checkpoint_every", checkpoint_every), ("workers", 0 if workers is None else workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
        self.method, self.config, self.overwrite = method, config, overwrite
        if method == "dmil" and config.stage2_epochs == 0 and config.n_epochs > config.stage1_epochs:
            warnings.warn(f"stage2_epochs is 0, so DMIL stops after stage 1's {config.stage1_epochs} epochs: "
                          f"{config.n_epochs - config.stage1_epochs} of n_epochs={config.n_epochs} do not run "
                          "(set stage1_epochs to n_epochs, or scale the config with --epochs / config.scaled)",
                          UserWarning, stacklevel=2)
        self.dist = dist or DistContext(device=check_device(device))
        self.device = self.dist.device
        self.per_rank_batch = per_rank_batch(config.batch_size, self.dist.world_size)
        self.amp, self.compile, self.checkpoint_every = amp, compile, checkpoint_every
        self.workers = 2 if workers is None else workers
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.progress = progress and self.dist.is_main
        self.log = RunLog(self.out_dir, enabled=self.dist.is_main, echo=echo)
        seed_everything(config.random_seed + self.dist.rank)  # own sampling noise per rank; DDP syncs the init
        self.data = data.to(self.device)
        self.model = (model or self._build_model(backend)).to(self.device)
        if hasattr(self.model, "check_backend"):  # refuse an unusable ops backend before any step
            self.model.check_backend(self.device, AMP_DTYPES[amp] if amp is not None else None)
        if init_from is not None:
            load_weights(self.model, init_from)
        self.sync_bn = self._convert_batchnorm(sync_bn)
        self.net = self.model  # what training calls: the model, wrapped in DDP and/or compiled
        self.stage: Optional[int] = None
        self.epoch, self.step, self.epoch_complete = 0, 0, True
        self.best_acc: Dict[int, float] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.last_train: Dict[str, float] = {}
        self.throughput: Dict[str, list] = {}  # stage -> [samples, seconds]
        self._sums = [0.0, 0, 0]  # this rank's running loss sum, correct, seen of the epoch
        self.epoch_rate = 0.0
        self._data_fingerprint = None

    def _convert_batchnorm(self, sync_bn: bool) -> bool:
        """With ``sync_bn`` and several ranks, BatchNorm layers (the ResNet18 encoders') pool their
        batch statistics across ranks, as one process on the global batch would. Same state_dict
        keys, so checkpoints load either way. Returns whether the model was converted."""
        if not isinstance(sync_bn, bool):
            raise TypeError(f"sync_bn must be a bool, got {type(sync_bn).__name__}")
        if not sync_bn:
            return False
        if not self.dist.enabled:
            self.log.say("sync_bn: one process, whose batch statistics already are the global batch's; "
                         "BatchNorm is left as it is")
            return False
        if self.device.type != "cuda":
            raise ValueError(f"sync_bn needs CUDA devices (torch's SyncBatchNorm has no kernel for "
                             f"{self.device.type} tensors); train without --sync-bn here")
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            self.log.say(f"sync_bn: the {self.method} model has no BatchNorm layer; nothing to synchronise")
            return False
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        return True

    def _build_model(self, backend):
        if self.data.kind == "cremad":
            from .media import build_media_model

            return build_media_model(self.method, self.data.num_classes, self.config, backend=backend)
        return build_model(self.method, self.data.dims, self.data.num_classes, self.config, backend=backend)

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
        barrier(self.dist)  # rank 0 has written the finished stage's best checkpoint
        if self.stage is not None and self.best_path(self.stage).is_file():
            self.model.load_state_dict(load_checkpoint(self.best_path(self.stage), map_location=self.device)["state_dict"])
        self._configure(stage)

    def _configure(self, stage: int, *, optimizer_state=None, scheduler_state=None) -> None:
        self.stage = stage
        if self.is_dmil:
            self.model.configure_stage(stage)
        self.optimizer = self.build_optimizer(self.stage_lr(stage))
        factor, patience = self.config.plateau(stage if self.is_dmil else 0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, "min", factor=factor,
                                                                    patience=patience)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
            self.scheduler.load_state_dict(scheduler_state)
        self.net = wrap_model(self.model, self.dist, compiled=bool(self.compile))  # buckets follow the trainable set
        if self.compile:
            self.net = torch.compile(self.net, backend="inductor" if self.compile is True else self.compile)
            self.log.say(f"[{self.method}] stage {stage}: torch.compile builds the model's graphs in the first steps "
                         "(tens of seconds on a CPU; again at each stage, whose trainable set differs)")

    def build_optimizer(self, lr: float) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        c = self.config
        if c.optimizer == "SGD":
            return torch.optim.SGD(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=lr, betas=c.adam_betas, eps=c.adam_eps, weight_decay=c.weight_decay)

    # ------------------------------------------------------------ steps

    def autocast(self):
        dtype = AMP_DTYPES.get(self.amp, torch.bfloat16)
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp is not None)

    def compute_loss(self, outputs, labels):
        if self.is_dmil:
            return dmil_loss(outputs, labels, stage=self.stage, config=self.config)
        return baseline_loss(outputs, labels, method=self.method)

    @contextlib.contextmanager
    def _nan_is_divergence(self):
        """NaN reaching an op of the model's forward: the features are checked when loaded, so the
        weights hold it (a diverged step, or the weights the run started from)."""
        try:
            yield
        except NaNInputError as error:
            raise FloatingPointError(f"training diverged at epoch {self.epoch} (stage {self.stage}): the "
                                     f"{error.argument} of an op in the model's forward holds NaN") from error

    def train_step(self, x1, x2, y):
        """One optimisation step on a batch -> (loss value, outputs)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            with self._nan_is_divergence():
                outputs = self.net(x1, x2)
            loss, _ = self.compute_loss(outputs, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at epoch {self.epoch} (stage {self.stage})")
        loss.backward()
        self.optimizer.step()
        return loss.detach(), outputs

    def _loader(self, split, batches, seed: int):
        stream = split.stream
        return iterate(make_loader(split, batches, workers=self.workers if stream else 0,
                                   pin_memory=stream and self.device.type == "cuda", seed=seed))

    def _on_device(self, batch):
        return tuple(t.to(self.device, non_blocking=True) for t in batch[:3])

    def train_epoch(self) -> Dict[str, float]:
        """Train epoch ``self.epoch`` from step ``self.step`` (non-zero when resuming inside it)."""
        from tqdm.auto import tqdm

        c, split = self.config, self.data.train
        self.net.train()
        split.set_epoch(self.epoch)
        batches = train_batches(len(split), batch_size=c.batch_size, seed=c.random_seed, epoch=self.epoch,
                                world_size=self.dist.world_size, rank=self.dist.rank)
        start, t0 = self.step, time.perf_counter()
        loss_sum = torch.tensor(self._sums[0], dtype=torch.float64, device=self.device)
        correct = torch.tensor(self._sums[1], dtype=torch.int64, device=self.device)
        seen, seen_before = self._sums[2], self._sums[2]
        self.epoch_complete = False
        loader = self._loader(split, batches[start:], seed=c.random_seed + self.epoch)
        for batch in tqdm(loader, total=len(batches) - start, desc=f"epoch {self.epoch} stage {self.stage}",
                          leave=False, disable=not self.progress):
            x1, x2, y = self._on_device(batch)
            loss, outputs = self.train_step(x1, x2, y)
            b = y.shape[0]
            loss_sum += loss.double() * b
            correct += (outputs["out"].detach().argmax(dim=1) == y).sum()
            seen += b
            self.step += 1
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < len(batches):
                self._sums = [float(loss_sum), int(correct), seen]
                self.save_last()
        total, right, count, new = all_reduce_sum(self.dist, [float(loss_sum), int(correct), seen, seen - seen_before])
        seconds = time.perf_counter() - t0
        stats = self.throughput.setdefault(str(self.stage), [0, 0.0])
        stats[0], stats[1] = stats[0] + int(new), stats[1] + seconds
        self._sums = [0.0, 0, 0]
        self.last_train = {"loss": total / max(count, 1), "acc": right / max(count, 1)}
        self.epoch_rate = new / max(seconds, 1e-9)  # samples per second of this epoch, all ranks
        return self.last_train

    def _eval_batches(self, split):
        batches = eval_batches(len(split), batch_size=max(self.config.batch_size, 256),
                               world_size=self.dist.world_size, rank=self.dist.rank)
        for positions, batch in zip(batches, self._loader(split, batches, seed=self.config.random_seed)):
            yield positions, self._on_device(batch)

    @torch.no_grad()
    def evaluate(self, split) -> Dict[str, float]:
        """Eval-mode CE of ``out`` and accuracy over ``split`` (the official validation), over all ranks."""
        broadcast_buffers(self.model, self.dist)
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for _, (x1, x2, y) in self._eval_batches(split):
            with self.autocast(), self._nan_is_divergence():
                out = self.model(x1, x2)["out"].float()
            total += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(dim=1) == y).sum()
        total, correct = all_reduce_sum(self.dist, [float(total), int(correct)])
        return {"loss": total / len(split), "acc": correct / len(split)}

    @torch.no_grad()
    def predict(self, split) -> Dict[str, torch.Tensor]:
        """``interaction_outputs`` logits over ``split`` (eval semantics), in split order, on the CPU."""
        broadcast_buffers(self.model, self.dist)
        keys = ("logits_1", "logits_2", "logits_12")
        parts = {k: [] for k in keys + ("positions",)}
        for positions, (x1, x2, _) in self._eval_batches(split):
            with self.autocast(), self._nan_is_divergence():
                out = self.model.interaction_outputs(x1, x2)
            for k in keys:
                parts[k].append(out[k].float().cpu())
            parts["positions"].append(positions)
        gathered = all_gather_objects(self.dist, parts)
        merged = {k: torch.cat([t for g in gathered for t in g[k]]) for k in parts}
        order = torch.argsort(merged.pop("positions"))
        return {k: v[order] for k, v in merged.items()}

    # ------------------------------------------------------------ state

    def model_spec(self) -> Dict[str, object]:
        dims = list(self.data.dims) if self.data.dims is not None else None
        return {"method": self.method, "data_kind": self.data.kind, "dims": dims, "num_classes": self.data.num_classes,
                "stage": self.stage or 1, "config": self.config.to_dict(), "class_names": self.data.class_names}

    def run_identity(self) -> Dict[str, object]:
        """What a resume must share with this run beyond the model and settings: the data (its
        :func:`~.resume.data_fingerprint`, computed once), the autocast and the model's ops backend."""
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.data)
        return {"data": self._data_fingerprint, "amp": self.amp, "backend": getattr(self.model, "backend", None)}

    def checkpoint_payload(self, **extra) -> Dict[str, object]:
        return dict({"state_dict": self.model.state_dict(), "model": self.model_spec(), "epoch": self.epoch,
                     "stage": self.stage}, **extra)

    # ------------------------------------------------------------ run

    def _prepare_outputs(self, resumed: Optional[Position]) -> None:
        if not self.dist.is_main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(self.ckpt_dir)
        remove_partial_files(self.out_dir)
        if resumed is None:  # a previous run's outputs must be neither reloaded, resumed nor mistaken for ours
            for stale in previous_outputs(self.out_dir):
                stale.unlink()
        self.log.open(keep_epochs=None if resumed is None else resumed.finished_epochs)

    def _check_out_dir(self, resume: bool) -> None:
        """Rank 0 looks at ``out_dir``; every rank raises the same FileExistsError when a fresh run
        would replace an earlier run's outputs without ``overwrite``."""
        problem = None
        if self.dist.is_main:
            try:
                check_fresh_out_dir(self.out_dir, resume=resume, overwrite=self.overwrite)
            except FileExistsError as exc:
                problem = str(exc)
        problem = all_gather_objects(self.dist, problem)[0]
        if problem is not None:
            raise FileExistsError(problem)

    def fit(self, *, resume: bool = False) -> Dict[str, object]:
        """Run the whole schedule (from ``last.pt`` with ``resume``), test the best checkpoint of the
        last stage, write metrics.json."""
        start = time.perf_counter()
        self._check_out_dir(resume)
        position = self.resume() if resume else None
        self._prepare_outputs(position if position is not None and position.epoch > 0 else None)
        epoch, self.step = position.next_start() if position is not None else (1, 0)
        try:
            while (stage := self.stage_of(epoch)) is not None:
                if stage != self.stage:
                    self.enter_stage(stage)
                self.epoch = epoch
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                train = self.train_epoch()
                row = {"epoch": epoch, "stage": stage, "lr": lr, "train_loss": train["loss"],
                       "train_acc": train["acc"], "val_loss": "", "val_acc": "",
                       "samples_per_second": round(self.epoch_rate, 1)}
                if epoch % self.config.val_freq == 0:
                    self._validate(stage, row)
                row["seconds"] = round(time.perf_counter() - t0, 3)
                self.log.row(row)
                self.epoch_complete = True
                self.save_last()
                self.log.say(f"[{self.method}] epoch {epoch:3d} stage {stage} lr {lr:.2e} "
                             f"train loss {train['loss']:.4f} acc {train['acc']:.3f}"
                             + (f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
                                if row["val_acc"] != "" else ""))
                epoch, self.step = epoch + 1, 0
        finally:
            self.log.close()
        return self.finish(time.perf_counter() - start)

    def _validate(self, stage: int, row: Dict[str, object]) -> None:
        val = self.evaluate(self.data.val)
        row.update(val_loss=val["loss"], val_acc=val["acc"])
        if val["acc"] > self.best_acc.get(stage, float("-inf")):
            self.best_acc[stage] = val["acc"]
            if self.dist.is_main:
                save_checkpoint(self.best_path(stage), self.checkpoint_payload(val=val))
        self.scheduler.step(val["loss"])

    def finish(self, train_seconds: float) -> Dict[str, object]:
        t0 = time.perf_counter()
        barrier(self.dist)
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
            "world_size": self.dist.world_size, "device": str(self.device), "amp": self.amp, "sync_bn": self.sync_bn,
            "compile": self.compile, "train_samples_per_second": {
                k: round(s / t, 1) for k, (s, t) in self.throughput.items() if t > 0},
            "seconds": round(train_seconds + time.perf_counter() - t0, 3),
            "config": self.config.to_dict(), "data": self.data.path,
        }
        if self.dist.is_main:
            tmp = self.out_dir / f".metrics.json.tmp{os.getpid()}"
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
          echo: Optional[Callable[[str], None]] = print, resume: bool = False, **options) -> Dict[str, object]:
    """Load (and validate) ``data`` (a feature dataset path or loaded data), train, test.

    ``options`` go to :class:`Trainer` (``dist``, ``amp``, ``compile``, ``checkpoint_every``,
    ``workers``, ``init_from``, ``backend``, ``sync_bn``, ``overwrite``). Returns the metrics also written to
    ``out_dir/metrics.json`` (by rank 0).
    """
    if isinstance(data, (str, os.PathLike)):
        data = FeatureData.load(data)
    trainer = Trainer(data, config, method=method, out_dir=out_dir, device=device, progress=progress, echo=echo,
                      **options)
    return trainer.fit(resume=resume)
