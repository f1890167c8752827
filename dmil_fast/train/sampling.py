"""Data order and loading: which samples each rank trains on at each step, and the DataLoader.

Order (resumable, rank-aware): the epoch's permutation is :class:`DistributedSampler`'s with
``seed`` and ``set_epoch(epoch)`` (a ``torch.Generator`` seeded with ``seed + epoch``; nothing is
drawn from the global RNG). Rank r takes every ``world_size``-th entry starting at r and cuts them
into batches of ``batch_size / world_size``; step t's global batch is therefore the same
contiguous block of the permutation for every world size. A resumed epoch skips its first
``start_step`` batches. Evaluation shards are ``positions[rank::world_size]``, unpadded.

Loading: a split exposes ``fetch(positions) -> (x1, x2, y, idx)``; :func:`make_loader` runs
it in DataLoader workers (whole batches at once, optional pinned memory). A failure while
loading (an unreadable media file mid-epoch) comes back as a :class:`LoadFailure` and is raised
in the training process as a ValueError naming the sample and file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

Tensor = torch.Tensor


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """``batch_size / world_size``; raises ValueError unless the global batch divides evenly."""
    _check_int("batch_size", batch_size, 1)
    _check_int("world_size", world_size, 1)
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world_size}): "
                         "batch_size is the global batch, split evenly across ranks")
    return batch_size // world_size


def train_batches(n: int, *, batch_size: int, seed: int, epoch: int, world_size: int = 1, rank: int = 0,
                  drop_singleton: bool = True) -> List[Tensor]:
    """This rank's batches of ``epoch``: a list of (b,) int64 positions into a split of ``n`` samples.

    ``batch_size`` is global. Every rank gets the same number of batches (DistributedSampler pads
    the permutation with its first entries to a multiple of ``world_size``). ``drop_singleton``
    drops a last batch of one sample per rank (BatchNorm cannot train on it; the official trainer
    drops it too).
    """
    _check_int("n", n, 1)
    per_rank = per_rank_batch(batch_size, world_size)
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.int64)  # (ceil(n / W),)
    batches = list(order.split(per_rank))
    if drop_singleton and batches and len(batches[-1]) == 1:
        batches.pop()
    return batches


def eval_batches(n: int, *, batch_size: int, world_size: int = 1, rank: int = 0) -> List[Tensor]:
    """This rank's evaluation shard ``positions[rank::world_size]`` in batches of ``batch_size``
    (unpadded: the shards of all ranks cover every sample exactly once)."""
    _check_int("batch_size", batch_size, 1)
    shard = torch.arange(rank, n, world_size, dtype=torch.int64)
    return list(shard.split(batch_size)) if len(shard) else []


@dataclass
class LoadFailure:
    """What a loader returns in place of a batch it could not load (message names sample and file)."""

    message: str


class _BatchFetcher(Dataset):
    """Maps a (b,) tensor of positions to the split's batch; errors become a LoadFailure."""

    def __init__(self, split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, positions: Tensor):
        try:
            return self.split.fetch(positions)
        except Exception as exc:  # reported by the training process, with the file it names
            return LoadFailure(f"{type(exc).__name__}: {exc}")


def make_loader(split, batches: Sequence[Tensor], *, workers: int = 0, pin_memory: bool = False,
                seed: int = 0) -> DataLoader:
    """A DataLoader yielding ``split.fetch(b)`` for each positions tensor ``b`` of ``batches``, in order.

    ``workers`` processes prefetch whole batches (0: in this process); ``pin_memory`` pins them
    for asynchronous copies to the GPU. The loader's own generator (seeded with ``seed``) provides
    the worker seeds, so creating it never advances the global RNG.
    """
    _check_int("workers", workers, 0)
    return DataLoader(_BatchFetcher(split), sampler=list(batches), batch_size=None, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)


def iterate(loader: DataLoader) -> Iterator:
    """The loader's batches; a :class:`LoadFailure` is raised as ValueError."""
    for batch in loader:
        if isinstance(batch, LoadFailure):
            raise ValueError(batch.message)
        yield batch
