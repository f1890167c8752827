"""What an exact resume needs beyond weights: random states, the position in the schedule, logs.

``checkpoints/last.pt`` (written atomically at the end of every epoch and every
``checkpoint_every`` steps) holds, next to the model, optimizer, scheduler, stage and best-per-
stage accuracies:

    position     {"epoch", "step", "complete"}: the epoch the state belongs to, the optimisation
                 steps done in it, and whether the epoch is finished (validation included)
    rng          one entry per rank: :func:`capture_rng` (Python, NumPy, torch CPU and CUDA)
    train_sums   one entry per rank: [loss_sum, correct, seen], the epoch's running training sums
    sampler      {"seed", "batch_size", "world_size"}: with the position, this fixes the data order
    run          {"data", "amp", "backend"}: :func:`data_fingerprint` of the data and the run's
                 autocast and ops backend, which a resume must share (absent in older files)
    last_train   the last finished epoch's training loss and accuracy
    throughput   per stage: samples and seconds of training so far

The data order needs no state of its own: the epoch's permutation is a function of
(seed, epoch) and a resumed epoch skips its first ``step`` batches (:mod:`.sampling`). A checkpoint
written at an epoch end also resumes with another number of processes (not bitwise: the data order
of later epochs and per-rank sampling noise follow the new world size); one written mid-epoch needs
the same number.
"""

from __future__ import annotations

import csv
import os
import random
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import all_gather_objects, barrier


def capture_rng() -> Dict[str, Any]:
    """This process's random states: Python, NumPy, torch CPU and (when present) every CUDA device.
    Only tensors, ints, floats, strings and lists: loadable with ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: Dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the random states captured by :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Position:
    """Where a run stands: ``epoch`` (1-based; 0 before the first), ``step`` optimisation steps
    done in it, ``complete`` when the epoch (training, validation, scheduler) is finished."""

    epoch: int = 0
    step: int = 0
    complete: bool = True

    def next_start(self):
        """(epoch, step) at which training continues."""
        return (self.epoch + 1, 0) if self.complete else (self.epoch, self.step)

    @property
    def finished_epochs(self) -> int:
        return self.epoch if self.complete else self.epoch - 1

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Position":
        return cls(int(d["epoch"]), int(d["step"]), bool(d["complete"]))


def data_fingerprint(data) -> Dict[str, List[Any]]:
    """``{split: [rows, CRC-32 of its labels]}`` for train, val and test: tells another data set or
    another split of it from the one a run started on, without reading any features."""
    out: Dict[str, List[Any]] = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        y = getattr(split, "y", None)
        crc = None if y is None else zlib.crc32(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        out[name] = [len(split), crc]
    return out


_RUN_FLAGS = {"amp": "--amp", "backend": "--backend"}


def _rows(fingerprint) -> str:
    if not isinstance(fingerprint, Mapping):
        return repr(fingerprint)
    return "/".join(str(v[0]) for v in fingerprint.values())


def check_resumable(payload: Mapping[str, Any], path: Path, *, spec: Mapping[str, Any],
                    config: Mapping[str, Any], run: Optional[Mapping[str, Any]] = None) -> None:
    """Raise ValueError naming ``path`` when ``payload`` cannot continue this run: not a training
    state (a best-checkpoint or a foreign file), another model, other settings, or (``run``, for a
    file that recorded it) other data, autocast or ops backend."""
    missing = [k for k in ("position", "optimizer", "scheduler", "rng", "train_sums", "sampler") if k not in payload]
    if missing:
        raise ValueError(f"{path} is not a training state to resume from (no {', '.join(missing)})")
    saved = payload.get("model") or {}
    for key in ("method", "dims", "num_classes", "data_kind"):
        if saved.get(key) != spec.get(key):
            raise ValueError(f"cannot resume from {path}: it trains {key}={saved.get(key)!r}, this run {spec.get(key)!r}")
    old = saved.get("config") or {}
    differ = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if differ:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {config.get(k)!r})" for k in differ[:6])
        raise ValueError(f"cannot resume from {path}: the settings differ: {shown}; resume with the same settings "
                         "(or start a new run in another --out directory)")
    saved_run = payload.get("run")
    if run is None or not isinstance(saved_run, Mapping):
        return
    if saved_run.get("data") != run.get("data"):
        raise ValueError(f"cannot resume from {path}: it was trained on other data (train/val/test rows "
                         f"{_rows(saved_run.get('data'))}, this run {_rows(run.get('data'))}, or other labels); "
                         "resume with the same --data (or start a new run in another --out directory)")
    for key, flag in _RUN_FLAGS.items():
        if saved_run.get(key) != run.get(key):
            raise ValueError(f"cannot resume from {path}: it ran with {key}={saved_run.get(key)!r}, this run "
                             f"{key}={run.get(key)!r}; resume with the same {flag}")


def truncate_log(path: Path, fields: List[str], finished_epochs: int) -> None:
    """Keep the rows of ``log.csv`` up to ``finished_epochs`` (atomically): a run killed after
    logging an epoch but before checkpointing it repeats that epoch and logs it again."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= finished_epochs]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# The files a run writes atomically, through a temporary ``.<name>.tmp<pid>`` beside them.
_PARTIAL_FILE = re.compile(r"\.(last\.pt|best_stage\d+\.pt|log\.csv|metrics\.json)\.tmp\d*")


def remove_partial_files(directory: Path) -> None:
    """Delete temporary files left by a write of the run's own files (``last.pt``,
    ``best_stage<k>.pt``, ``log.csv``, ``metrics.json``) that a kill interrupted: ``.<name>.tmp<pid>``.
    Every other file in ``directory`` stays."""
    if directory.is_dir():
        for stale in directory.iterdir():
            if _PARTIAL_FILE.fullmatch(stale.name) and stale.is_file():
                try:
                    stale.unlink()
                except OSError:
                    pass


def previous_outputs(out_dir: Path) -> List[Path]:
    """The outputs of an earlier run in ``out_dir``: its checkpoints and ``metrics.json``."""
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    found = sorted(ckpt_dir.glob("best_stage*.pt")) if ckpt_dir.is_dir() else []
    return [p for p in (ckpt_dir / "last.pt", out_dir / "metrics.json") if p.is_file()] + found


def check_fresh_out_dir(out_dir, *, resume: bool, overwrite: bool) -> None:
    """Refuse (FileExistsError naming the folder and its files) to start a run over the outputs of an
    earlier one in ``out_dir`` unless ``overwrite``: a fresh run deletes the earlier checkpoints.
    With ``resume`` and an earlier ``last.pt`` the run continues it, which needs no permission."""
    out_dir = Path(out_dir)
    if overwrite or (resume and (out_dir / "checkpoints" / "last.pt").is_file()):
        return
    found = previous_outputs(out_dir)
    if found:
        names = ", ".join(str(p.relative_to(out_dir)) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        how = ("it has no checkpoints/last.pt to resume from; " if resume else
               "pass --resume (resume=True) to continue that run, ")
        raise FileExistsError(f"{out_dir} holds the outputs of an earlier run ({names}): {how}"
                              "--overwrite (overwrite=True) to replace them, or choose another --out")


class ResumableTraining:
    """``save_last`` / ``resume`` of :class:`dmil_fast.train.Trainer` (which provides the model,
    optimizer, scheduler, schedule position, ``dist``, ``log`` and the bookkeeping they save)."""

    def save_last(self) -> None:
        """Write ``checkpoints/last.pt`` (rank 0; every rank contributes its random state and sums)."""
        ranks = all_gather_objects(self.dist, {"rng": capture_rng(), "sums": list(self._sums)})
        if not self.dist.is_main:
            return
        position = Position(self.epoch, self.step, self.epoch_complete)
        save_checkpoint(self.ckpt_dir / "last.pt", self.checkpoint_payload(
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            best_acc={str(k): v for k, v in self.best_acc.items()}, position=position.to_dict(),
            rng=[r["rng"] for r in ranks], train_sums=[r["sums"] for r in ranks],
            run=self.run_identity(),
            sampler={"seed": self.config.random_seed, "batch_size": self.config.batch_size,
                     "world_size": self.dist.world_size},
            last_train=dict(self.last_train), throughput={k: list(v) for k, v in self.throughput.items()}))

    def resume(self) -> Position:
        """Restore the state of ``checkpoints/last.pt``; start from scratch (with a notice) when there is none.

        A truncated, corrupt or foreign file, or one from other settings, raises ValueError naming it.
        """
        path = self.ckpt_dir / "last.pt"
        barrier(self.dist)  # every rank reads the file rank 0 wrote last
        if not path.is_file():
            self.log.say(f"no checkpoint at {path}: starting from scratch")
            return Position()
        payload = load_checkpoint(path, map_location=self.device)
        check_resumable(payload, path, spec=self.model_spec(), config=self.config.to_dict(), run=self.run_identity())
        position = Position.from_dict(payload["position"])
        writers = len(payload["rng"])
        if writers != self.dist.world_size and not position.complete:
            raise ValueError(f"cannot resume from {path}: written by {writers} processes in the middle of epoch "
                             f"{position.epoch}, and this run has {self.dist.world_size}; resume with {writers} "
                             f"processes (another number can resume from a checkpoint written at an epoch end)")
        self.model.load_state_dict(payload["state_dict"])
        self._configure(int(payload["stage"]), optimizer_state=payload["optimizer"],
                        scheduler_state=payload["scheduler"])
        self.best_acc = {int(k): float(v) for k, v in payload["best_acc"].items()}
        self.last_train = dict(payload["last_train"])
        self.throughput = {k: list(v) for k, v in payload["throughput"].items()}
        self.epoch, self.step, self.epoch_complete = position.epoch, position.step, position.complete
        if writers == self.dist.world_size:
            self._sums = list(payload["train_sums"][self.dist.rank])
            restore_rng(payload["rng"][self.dist.rank])
        else:
            # At an epoch end with another number of processes: the next epoch's data order follows the
            # new world size; rank r continues old rank r's random streams, new ranks keep their seeding.
            # The run goes on from the same weights and optimizer state, but not bitwise as before.
            self._sums = [0.0, 0, 0]
            if self.dist.rank < writers:
                restore_rng(payload["rng"][self.dist.rank])
            self.log.say(f"{path} was written by {writers} processes; continuing with {self.dist.world_size} "
                         f"from the end of epoch {position.epoch}")
        self.log.say(f"resuming from {path}: epoch {position.epoch}, step {position.step}"
                     + (" (epoch complete)" if position.complete else ""))
        return position
