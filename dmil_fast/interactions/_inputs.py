"""Input handling shared by the LSMI estimator: validation and aligned, streamed batches.

A *source* yields ``(x1, x2, y)`` batches from tensors / arrays (sliced in place) or from a
map-style dataset whose items start with ``(x1, x2, label)`` (a :class:`FeatureDataset`, read
through a DataLoader so that large sets are streamed, never loaded whole).
"""

from __future__ import annotations

import math
import numbers
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..ops._validate import check_label_dtype


def positive_int(name: str, value, low: int = 1) -> int:
    """``value`` (a Python or NumPy integer) as an int >= ``low``; a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be {'a positive int' if low == 1 else f'an int >= {low}'}, got {value!r}")
    return int(value)


def real_number(name: str, value, *, low: float, low_ok: bool) -> float:
    """``value`` (a Python or NumPy number, or a 0-d floating tensor) as a finite float > ``low``
    (>= with ``low_ok``); a ValueError naming ``name`` otherwise."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype.is_floating_point:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not (value >= low if low_ok else value > low):
        raise ValueError(f"{name} must be a finite number {'>=' if low_ok else '>'} {low:g}, got {value!r}")
    return float(value)


def progress_bar(iterable, *, enabled: bool, desc: str, total: Optional[int] = None):
    """``iterable`` wrapped in a tqdm bar when ``enabled``, else unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def check_batch(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                dims: Optional[Tuple[int, int]] = None, names=("x1", "x2", "y")) -> None:
    """Validate one aligned batch; raises ValueError/TypeError naming the argument."""
    n1, n2, ny = names
    for name, x in ((n1, x1), (n2, x2)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D) features, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floating-point features, got dtype {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} has feature dimension 0, shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise ValueError(f"{ny} must be 1-D (N,) labels, got shape {tuple(y.shape)}")
    check_label_dtype(ny, y)
    if x2.shape[0] != x1.shape[0]:
        raise ValueError(f"{n2} has {x2.shape[0]} samples but {n1} has {x1.shape[0]}; expected one row per sample")
    if y.shape[0] != x1.shape[0]:
        raise ValueError(f"{ny} has {y.shape[0]} labels but {n1} has {x1.shape[0]} samples; expected one per sample")
    if dims is not None:
        for name, x, d in ((n1, x1, dims[0]), (n2, x2, dims[1])):
            if x.shape[1] != d:
                raise ValueError(f"{name} must have {d} features per sample (as at fit), got shape {tuple(x.shape)}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            hint = f"; the estimator's num_classes is {num_classes}" + (
                f", the labels need num_classes >= {hi + 1}" if hi >= num_classes else "")
            raise ValueError(f"{ny} must lie in [0, {num_classes}), got values in [{lo}, {hi}]{hint}")
    for name, x in ((n1, x1), (n2, x2)):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")


def _to_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got dtype object")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


class Source:
    """Aligned (x1, x2, y) batches from tensors or a dataset.

    ``Source(x1, x2, y)`` with tensors/arrays, or ``Source(dataset)`` with x2 = y = None.
    ``dims``: (D1, D2); ``len(source)``: number of samples. ``seed`` seeds the private generator of
    a dataset's loader when :meth:`batches` is given none (the global RNG is never drawn from).
    """

    def __init__(self, x1, x2=None, y=None, *, num_classes: int, num_workers: int = 0, seed: int = 0):
        self.num_classes = num_classes
        self.num_workers = num_workers
        self.seed = seed
        if isinstance(x1, Dataset) and not isinstance(x1, (torch.Tensor, np.ndarray)):
            if x2 is not None or y is not None:
                raise ValueError("pass either a dataset as x1 (with x2 and y left None) or x1, x2 and y arrays")
            self.dataset, self.tensors = x1, None
            self.names = ("dataset modality 1", "dataset modality 2", "dataset labels")
            if len(x1) == 0:
                raise ValueError("dataset is empty; expected at least one sample")
            dims = getattr(x1, "dims", None)
            if dims is None:
                first = x1[0]
                dims = (int(first[0].numel()), int(first[1].numel()))
            self.dims = (int(dims[0]), int(dims[1]))
            self.length = len(x1)
        else:
            if x2 is None or y is None:
                raise ValueError("x2 and y are required when x1 is not a dataset")
            t1, t2, ty = _to_tensor("x1", x1), _to_tensor("x2", x2), _to_tensor("y", y)
            if t1.numel() == 0 or t1.shape[0] == 0:
                raise ValueError(f"x1 is empty (shape {tuple(t1.shape)}); expected at least one sample")
            check_batch(t1, t2, ty, num_classes=num_classes)
            self.dataset, self.tensors = None, (t1, t2, ty)
            self.names = ("x1", "x2", "y")
            self.dims = (int(t1.shape[1]), int(t2.shape[1]))
            self.length = int(t1.shape[0])

    def __len__(self) -> int:
        return self.length

    def subset(self, rows: torch.Tensor) -> "Source":
        """The samples at positions ``rows`` (1-D int64) as a new source (tensors are copied)."""
        out = Source.__new__(Source)
        out.__dict__.update(self.__dict__)
        if self.tensors is not None:
            out.tensors = tuple(t[rows.to(t.device)] for t in self.tensors)
        else:
            out.dataset = Subset(self.dataset, rows.tolist())
        out.length = int(rows.numel())
        return out

    def num_batches(self, batch_size: int) -> int:
        return -(-self.length // batch_size)

    def take(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Features (x1, x2) of the given sample positions."""
        if self.tensors is not None:
            return self.tensors[0][rows], self.tensors[1][rows]
        items = [self.dataset[int(i)] for i in rows]
        return (torch.stack([torch.as_tensor(it[0]).reshape(-1) for it in items]),
                torch.stack([torch.as_tensor(it[1]).reshape(-1) for it in items]))

    def batches(self, batch_size: int, *, device: torch.device, shuffle: bool = False,
                generator: Optional[torch.Generator] = None, check: bool = True,
                ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x1 (B, D1) float32, x2 (B, D2) float32, y (B,) int64) on ``device``.

        Without ``shuffle`` the batches follow the sample order exactly (sample i of the source is
        row i of the concatenated batches). ``check`` validates each batch of a dataset source.
        ``generator`` shuffles (and gives a dataset's loader its base seed); None = one seeded with
        the source's ``seed``.
        """
        non_blocking = device.type == "cuda"
        if self.tensors is not None:
            t1, t2, ty = self.tensors
            order = torch.randperm(self.length, generator=generator) if shuffle else None
            for start in range(0, self.length, batch_size):
                if order is None:
                    sl = slice(start, start + batch_size)
                    b1, b2, by = t1[sl], t2[sl], ty[sl]
                else:
                    rows = order[start:start + batch_size].to(t1.device)
                    b1, b2, by = t1[rows], t2[rows], ty[rows.to(ty.device)]
                yield (b1.to(device, torch.float32, non_blocking=non_blocking),
                       b2.to(device, torch.float32, non_blocking=non_blocking),
                       by.to(device, torch.int64, non_blocking=non_blocking))
            return
        if generator is None:  # the loader draws its workers' base seed even without shuffling
            generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                            num_workers=self.num_workers, pin_memory=non_blocking, drop_last=False)
        for item in loader:
            b1, b2, by = item[0], item[1], item[2]
            b1, b2 = b1.reshape(b1.shape[0], -1), b2.reshape(b2.shape[0], -1)
            if check:
                check_batch(b1, b2, by, num_classes=self.num_classes, dims=self.dims, names=self.names)
            yield (b1.to(device, torch.float32, non_blocking=non_blocking),
                   b2.to(device, torch.float32, non_blocking=non_blocking),
                   by.to(device, torch.int64, non_blocking=non_blocking))


def feature_stats(source: Source, *, batch_size: int, device: torch.device):
    """One pass in order: per-feature mean and std of each modality and the class counts.

    Returns (mean1 (D1,), std1 (D1,), mean2 (D2,), std2 (D2,), counts (C,) int64), float64 on ``device``.
    """
    d1, d2 = source.dims
    acc = [torch.zeros(d, dtype=torch.float64, device=device) for d in (d1, d1, d2, d2)]
    counts = torch.zeros(source.num_classes, dtype=torch.int64, device=device)
    n = 0
    for b1, b2, by in source.batches(batch_size, device=device):
        b1, b2 = b1.double(), b2.double()
        acc[0] += b1.sum(0)
        acc[1] += b1.pow(2).sum(0)
        acc[2] += b2.sum(0)
        acc[3] += b2.pow(2).sum(0)
        counts += torch.bincount(by, minlength=source.num_classes)
        n += b1.shape[0]
    mean1, mean2 = acc[0] / n, acc[2] / n
    var1 = (acc[1] / n - mean1.pow(2)).clamp_min(0.0) * n / max(n - 1, 1)
    var2 = (acc[3] / n - mean2.pow(2)).clamp_min(0.0) * n / max(n - 1, 1)
    # Constant features get unit scale: standardising them must not divide by zero.
    std1 = torch.where(var1 > 1e-12, var1.sqrt(), torch.ones_like(var1))
    std2 = torch.where(var2 > 1e-12, var2.sqrt(), torch.ones_like(var2))
    return mean1, std1, mean2, std2, counts
