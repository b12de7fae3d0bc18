"""Multi-process data parallelism with ``torch.distributed`` (``torchrun`` or ``accelerate launch``).

Only the adapter is trained, so instead of wrapping the model in DDP the trainer all-reduces the
adapter's gradients once per optimizer step (one flat buffer). This needs no ``no_sync`` for
gradient accumulation and no ``find_unused_parameters`` for top-k routing (an expert no token chose
contributes zeros). Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from omoe.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group started by the launcher (``WORLD_SIZE`` > 1), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but CUDA is not available; use device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        initialized_here = True
    return DistInfo(rank, world_size, local_rank, dev, initialized_here)


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(params: list[torch.Tensor], info: DistInfo) -> None:
    """Give every process rank 0's values (the adapters are initialised the same; this makes sure)."""
    if not info.enabled:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def all_reduce_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Sum the gradients of ``params`` over processes (the loss is already a global-batch mean)."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total trainable,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few scalars over processes (for logging)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every process (e.g. an error message, so all ranks stop together)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
