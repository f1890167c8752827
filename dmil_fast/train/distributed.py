"""Data-parallel training across processes: the process group, rank-aware helpers and DDP wrapping.

``torchrun --nproc_per_node N -m dmil_fast train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_distributed`
reads them and joins the process group (NCCL when the processes train on GPUs, gloo on the CPU).
A plain ``python -m dmil_fast train`` is world size 1: every helper here is then a no-op.

Conventions of the trainer built on this: ``batch_size`` is the global batch (each rank takes
``batch_size / world_size`` samples of it), the model is initialised identically on every rank
(DDP broadcasts rank 0's weights), each rank draws its own sampling noise (torch seeded with
``seed + rank``), metrics are reduced across ranks, and only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .._settings import check_device

BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` in [0, world_size), its GPU index ``local_rank``, the
    process-group ``backend`` (None when ``world_size == 1``) and the ``device`` it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives live (NCCL needs them on the GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (or stay single-process).

    Args:
        device: ``"auto"`` (this rank's GPU ``cuda:LOCAL_RANK`` when CUDA is available, else the
            CPU), ``"cpu"``, ``"cuda"`` (= ``cuda:LOCAL_RANK`` when distributed) or an explicit device.

    Returns the :class:`DistContext`; with ``WORLD_SIZE`` unset or 1 no process group is created.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of the group")
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if world == 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=dev)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after the last collective of the run)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if ctx.enabled:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(ctx: DistContext, values: Sequence[float]) -> List[float]:
    """Element-wise sum over ranks of a list of numbers, in float64 (exact for counts < 2**53)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_gather_objects(ctx: DistContext, obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, CPU tensors)."""
    if not ctx.enabled:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each training forward, after which every rank updates its own
    copy; evaluating right after training would otherwise see slightly different statistics
    on each rank.
    """
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def wrap_model(model: nn.Module, ctx: DistContext, *, compiled: bool = False) -> nn.Module:
    """``model`` inside DistributedDataParallel (world size > 1), else ``model`` itself.

    Wrap again whenever the set of trainable parameters changes (DMIL's stage switches): DDP
    fixes its gradient buckets at construction. Construction broadcasts rank 0's parameters and
    buffers, so every rank starts the stage from identical weights. A DMIL stage may leave
    trainable parameters without gradient (stage 1 never runs the second-level heads); DDP
    runs with ``static_graph`` (the used set is fixed within a stage; learned in the first step),
    or ``find_unused_parameters`` when the model is going to be compiled (``compiled``). Either
    way unused parameters keep ``grad = None`` on every rank, as in a single process.
    """
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    graph = {"find_unused_parameters": True} if compiled else {"static_graph": True}
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **graph)
