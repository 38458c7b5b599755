"""OSFT under several processes: which launches are supported (DDP, FSDP2) and which are
refused (FSDP1, DeepSpeed), each process's row block of a sharded matrix, and the collectives."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from forgetless.errors import ForgetlessError


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    if is_distributed():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


# How `accelerate launch` asks for sharded training: TrainingArguments' own fields stay empty.
SHARDING_ENVIRONMENT = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
DEEPSPEED_REFUSAL = (
    "OSFT does not support DeepSpeed ZeRO (requested by {}): DeepSpeed's optimizer steps its "
    "own flattened, partitioned master weights and gradients and copies them over the model's, "
    "so a projection of the model's weights is lost at the next step; use FSDP2 "
    "(fsdp_version: 2) or DDP"
)
FSDP1_REFUSAL = (
    "OSFT does not support FSDP1 ({}): its FlatParameter flattens and shards the matrices so "
    "that no process holds a block of rows; use FSDP2 (fsdp_version: 2 in accelerate, or "
    "torch's fully_shard) or DDP"
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def refuse_sharded_launch(args=None) -> None:
    """Refuse DeepSpeed and FSDP1 before any step, however they were requested (FSDP2 and DDP
    are supported).

    DeepSpeed ZeRO (any stage, ZeRO-1 and 2 included, where every process holds the whole
    model) steps fp32 master weights of its own, flattened and partitioned across processes,
    with gradients in its own buffers, then copies them over the model's parameters: the
    projected step written into the parameters would be overwritten by the next one, and the
    gradients are out of reach of the Trainer's ``on_pre_optimizer_step``.
    FSDP1 is recognised from accelerate's environment (``FSDP_VERSION`` unset or 1) and from an
    explicit ``fsdp_config["version"] = 1``; whatever the launch, the callback checks the wrapped
    model and its parameters again when training begins.
    """
    deepspeed = ["ACCELERATE_USE_DEEPSPEED"] if _flag("ACCELERATE_USE_DEEPSPEED") else []
    if args is not None and getattr(args, "deepspeed", None):
        deepspeed.append("TrainingArguments")
    if deepspeed:
        raise ForgetlessError(DEEPSPEED_REFUSAL.format(", ".join(deepspeed)))
    trainer_fsdp = args is not None and getattr(args, "fsdp", None)
    if trainer_fsdp:
        fsdp_config = getattr(args, "fsdp_config", None) or {}
        version = fsdp_config.get("version", fsdp_config.get("fsdp_version"))
        if version is not None and int(version) == 1:
            raise ForgetlessError(FSDP1_REFUSAL.format("fsdp_config version 1"))
    elif _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ForgetlessError(
            FSDP1_REFUSAL.format("requested by ACCELERATE_USE_FSDP without FSDP_VERSION=2")
        )


def refuse_unsupported_sharding(model: nn.Module) -> None:
    """Refuse FSDP1 and DeepSpeed ZeRO-3 from the model they have wrapped or partitioned."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise ForgetlessError(FSDP1_REFUSAL.format("found wrapping the model"))
    for name, param in model.named_parameters():
        if "_flat_param" in name:
            raise ForgetlessError(FSDP1_REFUSAL.format("found wrapping the model"))
        if hasattr(param, "ds_id"):
            raise ForgetlessError(DEEPSPEED_REFUSAL.format("ZeRO-3 partitioned parameters"))


def is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's block of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def row_block(name: str, weight: torch.Tensor):
    """``(first row, rows, group)`` of this process's block of a DTensor weight sharded by rows
    (FSDP2's ``Shard(0)``, possibly replicated over other mesh dimensions as in HSDP), ``None``
    for a whole tensor. ``group`` is the mesh dimension's process group over which the rows
    are spread."""
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, weight.placements
    sharded = [
        dim for dim, placement in enumerate(placements) if not isinstance(placement, Replicate)
    ]
    if not sharded:
        return None
    if len(sharded) > 1 or type(placements[sharded[0]]) is not Shard or placements[sharded[0]].dim:
        raise ForgetlessError(
            f"OSFT needs {name} whole or sharded by rows over one mesh dimension (FSDP2's "
            f"default), not {tuple(placements)}; use fully_shard without shard_placement_fn "
            "or tensor parallelism"
        )
    dim = sharded[0]
    # Shard(0) splits like torch.chunk: ceil(m / size) rows per process, the last ones fewer
    # (or none); the same rule as compute_local_shape_and_global_offset.
    size, coordinate = mesh.size(dim), mesh.get_local_rank(dim)
    rows = weight.shape[0]
    chunk = -(-rows // size)
    start = min(coordinate * chunk, rows)
    length = min(chunk, rows - start)
    if weight.to_local().shape[0] != length:
        raise ForgetlessError(
            f"OSFT: {name} holds {weight.to_local().shape[0]} rows on this process, not the "
            f"{length} of an even Shard(0) split of {rows} rows over {size} processes"
        )
    return start, length, mesh.get_group(dim)


def _through_accelerator(tensor: torch.Tensor, group=None) -> bool:
    """NCCL takes only GPU tensors: stage a CPU tensor (e.g. under CPU offload) on the GPU."""
    return tensor.device.type == "cpu" and dist.get_backend(group) == "nccl"


def all_reduce_(tensor: torch.Tensor, group=None) -> None:
    if _through_accelerator(tensor, group):
        staged = tensor.cuda()
        dist.all_reduce(staged, group=group)
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, group=group)


def broadcast_(tensor: torch.Tensor) -> None:
    """Overwrite ``tensor`` with rank 0's on every process."""
    if _through_accelerator(tensor):
        staged = tensor.cuda()
        dist.broadcast(staged, src=0)
        tensor.copy_(staged)
    else:
        dist.broadcast(tensor, src=0)
