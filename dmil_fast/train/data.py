"""Feature data held in memory for training: the three splits of a feature dataset as tensors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class Split:
    """One split in memory. x1: (n, D1) float32, x2: (n, D2) float32, y: (n,) int64,
    idx: (n,) int64 row indices in the full dataset, types: (n,) ground-truth type codes or None."""

    x1: Tensor
    x2: Tensor
    y: Tensor
    idx: Tensor
    types: Optional[np.ndarray]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device) -> "Split":
        return Split(self.x1.to(device), self.x2.to(device), self.y.to(device), self.idx, self.types)

    def batches(self, batch_size: int, *, generator: Optional[torch.Generator] = None,
                drop_singleton: bool = False) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        """(x1, x2, y) batches in order, or shuffled with ``generator`` (a CPU torch.Generator).

        ``drop_singleton`` skips a last batch of one sample, as the official trainer does
        (BatchNorm cannot train on it).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if drop_singleton and stop - start == 1:
                continue
            if order is None:
                yield self.x1[start:stop], self.x2[start:stop], self.y[start:stop]
            else:
                rows = order[start:stop].to(self.y.device)
                yield self.x1[rows], self.x2[rows], self.y[rows]


@dataclass
class FeatureData:
    """train / val / test splits of a feature dataset plus its names."""

    train: Split
    val: Split
    test: Split
    dims: Tuple[int, int]
    num_classes: int
    class_names: List[str]
    type_names: Optional[List[str]]
    path: str

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureData":
        """Open and validate every split of ``path`` (a :class:`dmil_fast.data.FeatureDataset`).

        All checks (missing files, lengths, label range, NaN features, empty splits) run here,
        before any model is built; they raise FileNotFoundError/ValueError/TypeError naming the file.
        """
        from ..data import FeatureDataset

        sets = {name: FeatureDataset(path, name) for name in ("train", "val", "test")}
        splits = {}
        for name, ds in sets.items():
            x1, x2, y, idx = ds.as_tensors()
            splits[name] = Split(x1, x2, y, idx, ds.interaction_type)
        train = sets["train"]
        has_types = splits["test"].types is not None
        return cls(splits["train"], splits["val"], splits["test"], tuple(train.dims), int(train.num_classes),
                   list(train.class_names), list(train.interaction_types) if has_types else None, str(path))

    def to(self, device) -> "FeatureData":
        return FeatureData(self.train.to(device), self.val.to(device), self.test.to(device), self.dims,
                           self.num_classes, self.class_names, self.type_names, self.path)

    @classmethod
    def from_tensors(cls, train: Sequence, val: Sequence, test: Sequence, *, num_classes: int,
                     class_names: Optional[List[str]] = None, type_names: Optional[List[str]] = None) -> "FeatureData":
        """From ``(x1, x2, y[, types])`` tuples per split (in-memory data, tests)."""
        def split(parts):
            x1, x2, y = parts[:3]
            types = np.asarray(parts[3]) if len(parts) > 3 and parts[3] is not None else None
            return Split(x1.float(), x2.float(), y.long(), torch.arange(len(y)), types)

        s = [split(p) for p in (train, val, test)]
        names = class_names or [f"class_{k}" for k in range(num_classes)]
        return cls(s[0], s[1], s[2], (int(s[0].x1.shape[1]), int(s[0].x2.shape[1])), num_classes, names,
                   type_names, "<memory>")
