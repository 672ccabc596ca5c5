"""The official per-step schedules and AdamW's parameter groups (weight decay, layer-wise lr decay)."""

from __future__ import annotations

import math

from ..model import BEiT

__all__ = ["cosine_schedule", "layer_id", "param_groups"]


def cosine_schedule(step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> float:
    """The value at ``step`` of the official per-step schedule: ``warmup_steps`` values linearly from
    ``start_warmup`` to ``base`` (both included), then a half cosine from ``base`` towards ``final``
    over the remaining steps; ``final`` after ``total_steps``."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup
        return start_warmup + (base - start_warmup) * step / (warmup_steps - 1)
    decay_steps = total_steps - warmup_steps
    if step >= total_steps or decay_steps <= 0:
        return final
    progress = (step - warmup_steps) / decay_steps
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay (official rule): embeddings and tokens 0, block
    ``i`` ``i + 1``, everything else (shared bias, norms, heads) ``num_layers - 1``."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def param_groups(model: BEiT, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters, biases and ``model.no_weight_decay()``; with
    ``layer_decay``, lr scale ``layer_decay ** (depth + 1 - layer_id)``. Frozen parameters are left
    out. Each group carries ``lr_scale`` and ``decay`` (whether the wd schedule applies)."""
    skip = model.no_weight_decay()
    num_layers = model.config.depth + 2
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.dim() == 1 or name.endswith(".bias") or name in skip)
        depth = layer_id(name, num_layers) if layer_decay is not None else num_layers - 1
        scale = layer_decay ** (num_layers - 1 - depth) if layer_decay is not None else 1.0
        group = groups.setdefault((depth, decay), {
            "params": [], "names": [], "lr_scale": scale, "decay": decay,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]
