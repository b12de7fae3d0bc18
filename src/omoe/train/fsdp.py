"""FSDP (PyTorch FSDP2, ``fully_shard``): shard the frozen base weights and the adapter over processes.

Turned on by ``fsdp: true`` or by ``accelerate launch --config_file configs/accelerate_fsdp.yaml``
(which sets ``ACCELERATE_USE_FSDP``). Every transformer block is sharded, then the whole model; the
parameters become DTensors. Checkpoints and the final adapter hold full (gathered) tensors keyed by
name, so they are the same files as without FSDP and a run may resume under either.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from omoe.train.distributed import DistInfo


def requested(config_flag: bool) -> bool:
    """FSDP was asked for in the config or by ``accelerate launch`` with an FSDP config."""
    return config_flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def shard(base: nn.Module, info: DistInfo) -> list[str]:
    """``fully_shard`` each transformer block of ``base``, then ``base``; return the wrapped class names.

    Blocks are the classes named by ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (accelerate) or else the model's
    ``_no_split_modules`` (``LlamaDecoderLayer`` for LLaMA/SmolLM2).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    classes = {n.strip() for n in names.split(",") if n.strip()} or set(
        getattr(base, "_no_split_modules", None) or ()
    )
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for module in base.modules():
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(base, mesh=mesh, reshard_after_forward=reshard)
    return sorted(classes)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process if it is sharded; collective)."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out like ``param``: this process's shard when ``param`` is sharded."""
    if not is_sharded(param) or value.dim() == 0:
        return value.to(param.device if not is_sharded(param) else value.device)
    from torch.distributed.tensor import distribute_tensor

    value = value.to(param.to_local().device)
    try:  # every process holds the full value: take the local shard without communication
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    except TypeError:  # older torch: scatter from rank 0 (the values are equal anyway)
        return distribute_tensor(value, param.device_mesh, param.placements)
