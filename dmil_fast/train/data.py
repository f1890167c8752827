"""Feature data for training: the three splits of a feature dataset, in memory or streamed from disk.

A split, whatever holds it, offers what the trainer needs: ``len(split)``, ``y`` (n,) int64
labels, ``idx`` (n,) int64 row indices in the full dataset, ``types`` (n,) ground-truth type
codes or None, ``stream`` (whether batches come from disk through DataLoader workers) and
``fetch(positions) -> (x1, x2, y, idx)`` for a (b,) int64 tensor of positions in the split and
``set_epoch(epoch)`` (called before each training epoch; splits with augmentation seed it).
Raw CREMA-D splits with the same protocol live in :mod:`dmil_fast.train.media`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..ops._validate import check_label_dtype

Tensor = torch.Tensor

#: ``stream=None`` streams a dataset whose training features exceed this many bytes.
STREAM_THRESHOLD_BYTES = 2 << 30


@dataclass
class Split:
    """One split in memory. x1: (n, D1) float32, x2: (n, D2) float32, y: (n,) int64,
    idx: (n,) int64 row indices in the full dataset, types: (n,) ground-truth type codes or None."""

    x1: Tensor
    x2: Tensor
    y: Tensor
    idx: Tensor
    types: Optional[np.ndarray]

    stream = False

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device) -> "Split":
        return Split(self.x1.to(device), self.x2.to(device), self.y.to(device), self.idx, self.types)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: feature batches do not depend on the epoch."""

    def fetch(self, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows ``positions`` (b,) int64 -> x1 (b, D1), x2 (b, D2), y (b,) on the split's device, idx (b,)."""
        rows = positions.to(self.y.device)
        return self.x1[rows], self.x2[rows], self.y[rows], self.idx[positions]


class StreamSplit:
    """A split read from disk batch by batch: a :class:`dmil_fast.data.FeatureDataset`
    (memory-mapped ``.npy`` or HDF5). Only labels, row indices and types are held in memory;
    features are read by ``fetch`` (in DataLoader workers during training)."""

    stream = True

    def __init__(self, dataset):
        self.dataset = dataset
        self.y = torch.from_numpy(dataset.labels)
        self.idx = torch.from_numpy(dataset.indices)
        self.types = dataset.interaction_type

    def __len__(self) -> int:
        return len(self.dataset)

    def to(self, device) -> "StreamSplit":
        return self  # batches are moved to the device as they are used

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: feature batches do not depend on the epoch."""

    def fetch(self, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows ``positions`` (b,) int64 -> x1 (b, D1) float32, x2 (b, D2) float32, y (b,), idx (b,) on the CPU."""
        return self.dataset.read_rows(positions)


@dataclass
class FeatureData:
    """train / val / test splits of a feature dataset plus its names."""

    train: Union[Split, StreamSplit]
    val: Union[Split, StreamSplit]
    test: Union[Split, StreamSplit]
    dims: Tuple[int, int]
    num_classes: int
    class_names: List[str]
    type_names: Optional[List[str]]
    path: str
    kind = "features"

    @property
    def stream(self) -> bool:
        return self.train.stream

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, stream: Optional[bool] = False) -> "FeatureData":
        """Open and validate every split of ``path`` (a :class:`dmil_fast.data.FeatureDataset`).

        All checks (missing files, shapes and dtypes, lengths, label range, NaN features, empty
        splits) run here, before any model is built; they raise FileNotFoundError/ValueError/
        TypeError naming the file.

        Args:
            stream: False loads the splits into memory; True keeps them on disk and reads batches
                as they are used (DataLoader workers); None streams when the training features
                exceed ``STREAM_THRESHOLD_BYTES``.
        """
        from ..data import FeatureDataset

        sets = {name: FeatureDataset(path, name) for name in ("train", "val", "test")}
        train = sets["train"]
        if stream is None:
            stream = len(train) * sum(train.dims) * 4 > STREAM_THRESHOLD_BYTES
        splits = {}
        for name, ds in sets.items():
            if stream:
                splits[name] = StreamSplit(ds)
            else:
                x1, x2, y, idx = ds.as_tensors()
                splits[name] = Split(x1, x2, y, idx, ds.interaction_type)
        has_types = splits["test"].types is not None
        return cls(splits["train"], splits["val"], splits["test"], tuple(train.dims), int(train.num_classes),
                   list(train.class_names), list(train.interaction_types) if has_types else None, str(path))

    def to(self, device) -> "FeatureData":
        return FeatureData(self.train.to(device), self.val.to(device), self.test.to(device), self.dims,
                           self.num_classes, self.class_names, self.type_names, self.path)

    @classmethod
    def from_tensors(cls, train: Sequence, val: Sequence, test: Sequence, *, num_classes: int,
                     class_names: Optional[List[str]] = None, type_names: Optional[List[str]] = None) -> "FeatureData":
        """From ``(x1, x2, y[, types])`` tuples per split (in-memory data, tests).

        x1 (N, D1) and x2 (N, D2) floating tensors of the same widths in every split, y (N,) integer
        labels in [0, num_classes), types (N,) integer codes below ``len(type_names)`` (or None).
        Everything is checked here, as :meth:`load` checks files: a ValueError or TypeError names
        the split and the argument.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names must name the {num_classes} classes, got {len(class_names)} names")
        s = [_tensor_split(name, parts, num_classes, type_names)
             for name, parts in (("train", train), ("val", val), ("test", test))]
        dims = (int(s[0].x1.shape[1]), int(s[0].x2.shape[1]))
        for name, part in zip(("val", "test"), s[1:]):
            if (int(part.x1.shape[1]), int(part.x2.shape[1])) != dims:
                raise ValueError(f"the {name} split has features of widths ({part.x1.shape[1]}, {part.x2.shape[1]}), "
                                 f"the train split {dims}; expected the same in every split")
        names = class_names or [f"class_{k}" for k in range(num_classes)]
        return cls(s[0], s[1], s[2], dims, num_classes, names, type_names, "<memory>")


def _tensor_split(name: str, parts: Sequence, num_classes: int, type_names: Optional[List[str]]) -> Split:
    """One checked split of :meth:`FeatureData.from_tensors`."""
    if not isinstance(parts, (tuple, list)) or len(parts) not in (3, 4):
        raise ValueError(f"the {name} split must be a tuple (x1, x2, y) or (x1, x2, y, types), got "
                         f"{type(parts).__name__}" + (f" of {len(parts)} items" if isinstance(parts, (tuple, list)) else ""))
    x1, x2, y = parts[:3]
    for arg, value in (("x1", x1), ("x2", x2), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the {name} split's {arg} must be a torch.Tensor, got {type(value).__name__}")
    if y.dim() != 1 or len(y) == 0:
        raise ValueError(f"the {name} split's y must be 1-D (N,) labels with N >= 1, got shape {tuple(y.shape)}")
    check_label_dtype(f"the {name} split's y", y)
    n = len(y)
    for modality, x in (("x1", x1), ("x2", x2)):
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"the {name} split's {modality} must be 2-D (N, D) features with D >= 1, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] != n:
            raise ValueError(f"the {name} split's {modality} has {x.shape[0]} rows and y {n}; expected one row per label")
        if not x.is_floating_point():
            raise TypeError(f"the {name} split's {modality} must be floating features, got dtype {x.dtype}")
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            raise ValueError(f"the {name} split's {modality} has NaN or inf features at row {row}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"the {name} split's labels must lie in [0, num_classes) = [0, {num_classes}), "
                         f"got values from {lo} to {hi}")
    types = None
    if len(parts) > 3 and parts[3] is not None:
        types = np.asarray(parts[3])
        if types.shape != (n,) or not np.issubdtype(types.dtype, np.integer):
            raise ValueError(f"the {name} split's types must be (N,) = ({n},) integer codes, got shape "
                             f"{types.shape} of {types.dtype}")
        count = len(type_names) if type_names is not None else None
        if types.min() < 0 or (count is not None and types.max() >= count):
            raise ValueError(f"the {name} split's types must lie in [0, len(type_names))"
                             + (f" = [0, {count})" if count is not None else "")
                             + f", got values from {types.min()} to {types.max()}")
    return Split(x1.float(), x2.float(), y.long(), torch.arange(n), types)
