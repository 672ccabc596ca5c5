"""Where and how the model runs: the processes of ``torchrun``, this rank's device, DDP or FSDP,
``torch.compile`` (with CUDA graphs) and torchao's float8 training layers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model import BEiT, Block
from .config import TrainConfig

__all__ = ["Distributed", "setup_distributed", "resolve_device", "wrap_model", "float8_training"]


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): nccl with GPUs, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device called ``name`` ("auto": this rank's GPU when there is one, else CPU); a CUDA device
    that is not there is a ``ValueError`` at once, not a failure after the data and tokenizer work."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA GPU is available here; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: there are {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def wrap_model(model: BEiT, config: TrainConfig, ctx: Distributed, device: torch.device):
    """DDP or FSDP under torchrun (``config.parallel``), then torch.compile when asked (compile goes
    outside DDP)."""
    wrapped = model
    if ctx.enabled and config.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each Transformer block's parameters gathered just before it runs, wherever the task's model
        # holds them (BEiT.blocks, BEiTForSegmentation.backbone.blocks); the rest sharded as one unit.
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)
        wrapped = fully_shard(model)
    elif ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
    if config.cuda_graphs:
        return torch.compile(wrapped, mode="reduce-overhead")
    if config.compile:
        return torch.compile(wrapped)
    return wrapped


def float8_training(model: BEiT, device: torch.device) -> None:
    """Swap the linear layers of the blocks for torchao's float8 training layers (rowwise scaling:
    a scale per row of each operand), in place. Needs a CUDA GPU of compute capability 8.9 or more
    (Ada, Hopper) and torchao; the LM head (inside the fused loss) and the patch projection stay."""
    if device.type != "cuda":
        raise ValueError(f"fp8: float8 linear layers need a CUDA GPU of compute capability >= 8.9 (Ada, "
                         f"Hopper); this run is on {device}, where there are no float8 matrix units")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"fp8: float8 linear layers need compute capability >= 8.9, "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ImportError(f"fp8: needs torchao (pip install torchao): {error}") from error

    def in_blocks(module, name):  # float8 GEMMs need both dimensions divisible by 16
        return name.startswith("blocks.") and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=in_blocks)
