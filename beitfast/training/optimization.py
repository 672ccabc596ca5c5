"""Optimisation of a run: AdamW's parameter groups (weight decay, layer-wise lr decay), the official
per-step schedules, gradient clipping, and the step skipped when the loss or the gradient norm is not
finite."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

__all__ = ["cosine_schedule", "layer_id", "param_groups", "adamw", "set_schedules", "clip_gradients",
           "step_if_finite"]


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


def layer_id(name: str, num_layers: int, prefix: str = "") -> int:
    """Depth of a parameter for layer-wise lr decay (official rule, ``get_num_layer_for_vit``):
    embeddings and tokens 0, block ``i`` ``i + 1``, everything else (shared bias, norms, heads, a
    segmentation model's neck) ``num_layers - 1``. ``prefix``: where the BEiT sits in a larger model
    (``"backbone."`` in segmentation)."""
    if not name.startswith(prefix):
        return num_layers - 1
    name = name[len(prefix):]
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None,
                 backbone: str = "") -> list[dict]:
    """AdamW groups: no decay on 1-D parameters, biases and the BEiT's ``no_weight_decay()``; with
    ``layer_decay``, lr scale ``layer_decay ** (depth + 1 - layer_id)``. Frozen parameters are left
    out. Each group carries ``lr_scale`` and ``decay`` (whether the wd schedule applies). ``backbone``:
    the name of the BEiT inside ``model`` (``"backbone"`` in segmentation; ``""``: the model is one)."""
    beit = model.get_submodule(backbone)
    prefix = f"{backbone}." if backbone else ""
    skip = {prefix + name for name in beit.no_weight_decay()}
    num_layers = beit.config.depth + 2
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.dim() == 1 or name.endswith(".bias") or name in skip)
        depth = layer_id(name, num_layers, prefix) if layer_decay is not None else num_layers - 1
        scale = layer_decay ** (num_layers - 1 - depth) if layer_decay is not None else 1.0
        group = groups.setdefault((depth, decay), {
            "params": [], "names": [], "lr_scale": scale, "decay": decay,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def adamw(groups: list[dict], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``groups`` (:func:`param_groups`'s form) with the settings of ``config``."""
    return torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=config.lr, betas=config.betas, eps=config.eps, fused=config.fused_optimizer,
    )


def set_schedules(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int,
                  lr_schedule=cosine_schedule) -> tuple[float, float]:
    """Set each group's learning rate and weight decay for ``step``: ``lr_schedule`` (same arguments as
    :func:`cosine_schedule`) times the group's ``lr_scale``; the cosine weight-decay schedule where the
    group decays. Returns ``(lr, weight_decay)`` before scaling."""
    c = config
    lr = lr_schedule(step, c.lr, c.min_lr, c.steps, c.warmup_steps)
    wd_end = c.weight_decay if c.weight_decay_end is None else c.weight_decay_end
    wd = cosine_schedule(step, c.weight_decay, wd_end, c.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
        group["weight_decay"] = wd if group["decay"] else 0.0
    return lr, wd


def clip_gradients(params: list[torch.Tensor], clip_grad: float | None, device: torch.device) -> torch.Tensor:
    """The total gradient norm of ``params`` (float32 on ``device``), after scaling the gradients down to
    ``clip_grad`` when it is exceeded (None: no clipping)."""
    max_norm = clip_grad if clip_grad is not None else float("inf")
    # Clipping is decided on the device (a scale of min(1, max_norm / norm)), no host read.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
        grad_norm = grad_norm.full_tensor()
    return grad_norm.to(device, torch.float32)


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, grad_norm: torch.Tensor, fused: bool
                   ) -> None:
    """``optimizer.step()``, skipped when the loss or the gradient norm is not finite. The ``fused`` AdamW
    kernel decides on the device (it reads ``found_inf`` as under a GradScaler and leaves parameters
    and state untouched), so the host queues the next step without waiting; the plain optimizer
    cannot skip on the device, so its step waits for the host to read the two values."""
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if not fused:
        if bool(finite):  # a host synchronisation, only without the fused optimizer
            optimizer.step()
        return
    optimizer.found_inf = (~finite).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
