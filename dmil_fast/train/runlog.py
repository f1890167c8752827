"""The run's human-readable outputs: ``log.csv`` (one row per epoch), ``tensorboard/`` (when
``torch.utils.tensorboard`` imports) and one echoed line per epoch. Only rank 0 writes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Dict, Optional

from .resume import truncate_log

CSV_FIELDS = ("epoch", "stage", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
              "samples_per_second")
TB_KEYS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "samples_per_second")


class RunLog:
    """Epoch rows to ``out_dir/log.csv`` and tensorboard, lines to ``echo``; silent when not ``enabled``."""

    def __init__(self, out_dir: Path, *, enabled: bool, echo: Optional[Callable[[str], None]]):
        self.path = Path(out_dir) / "log.csv"
        self.enabled = enabled
        self._echo = echo if (enabled and echo is not None) else None
        self._file = None
        self._csv = None
        self._tb = None

    def say(self, line: str) -> None:
        if self._echo is not None:
            self._echo(line)

    def open(self, *, keep_epochs: Optional[int] = None) -> None:
        """Start ``log.csv`` afresh, or (``keep_epochs``: a resumed run) keep its rows up to that epoch."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_epochs is None:
            self._file = open(self.path, "w", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            self._csv.writeheader()
        else:
            truncate_log(self.path, list(CSV_FIELDS), keep_epochs)
            self._file = open(self.path, "a", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self._file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            self._tb = None
        else:
            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def row(self, row: Dict[str, object]) -> None:
        if self._csv is None:
            return
        self._csv.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for key in TB_KEYS:
                if row.get(key) not in (None, ""):
                    self._tb.add_scalar(key, float(row[key]), int(row["epoch"]))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
