"""Semantic segmentation fine-tuning on :class:`beitfast.train.Trainer`, and its evaluation, with the
official recipe (microsoft/unilm ``beit/semantic_segmentation``, ADE20K UPerNet configs):

* AdamW (0.9, 0.999), lr 7e-4 with layer-wise decay 0.65 for self-supervised checkpoints (3e-5 / 0.9 for
  intermediate fine-tuned ones), the official layer ids (embeddings 0, block i i + 1, neck and heads
  scale 1), weight decay 0.05 except on 1-D parameters, biases, the position embedding and the cls token;
* the poly schedule (power 1, down to 0) after a linear warmup from 1e-6 of it (mmcv's), no gradient
  clipping, drop path 0.1, 160k steps of 16 crops of 512 pixels.

The task gives the Trainer its parameter groups (``param_groups``) and learning-rate schedule
(``lr_schedule``); batches are ``(images, labels)`` of :func:`beitfast.segmentation.data.segmentation_stream`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train import TrainConfig, Trainer, resolve_device, setup_distributed
from ..training.optimization import layer_id, param_groups
from .data import SegmentationTestTransform, evaluation_pairs
from .global_batchnorm import convert_global_batchnorm
from .inference import segment_logits
from .metrics import SegmentationMetrics
from .model import BEiTForSegmentation

__all__ = [
    "Segmentation", "poly_schedule", "segmentation_layer_id", "segmentation_param_groups",
    "segmentation_recipe", "segmentation_trainer", "predict_labels", "evaluate_segmentation", "WARMUP_RATIO",
]

WARMUP_RATIO = 1e-6  # the official lr_config: warmup from 1e-6 of the scheduled value


def poly_schedule(step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                  power: float = 1.0) -> float:
    """mmcv's ``poly`` policy with ``linear`` warmup, per step: ``(base - final) * (1 - step / total) **
    power + final``, multiplied during the first ``warmup_steps`` by ``1 - (1 - step / warmup_steps) *
    (1 - 1e-6)``; ``final`` from ``total_steps`` on. (Same arguments as ``train.cosine_schedule``.)"""
    if step >= total_steps:
        return final
    value = (base - final) * (1 - step / total_steps) ** power + final
    if step < warmup_steps:
        value *= 1 - (1 - step / warmup_steps) * (1 - WARMUP_RATIO)
    return value


def segmentation_layer_id(name: str, num_layers: int) -> int:
    """The official ``get_num_layer_for_vit``: ``backbone.`` tokens, position embedding and patch
    embedding 0, ``backbone.blocks.i`` i + 1, everything else (neck, heads, a shared bias table)
    ``num_layers - 1``, i.e. lr scale 1."""
    return layer_id(name, num_layers, "backbone.")


def segmentation_param_groups(model: BEiTForSegmentation, weight_decay: float,
                              layer_decay: float | None = None) -> list[dict]:
    """AdamW groups of a :class:`BEiTForSegmentation`, in the form of ``train.param_groups`` (``lr_scale``,
    ``decay``, ``names``): no weight decay on 1-D parameters, biases, ``backbone.pos_embed`` and
    ``backbone.cls_token`` (the backbone's ``no_weight_decay()``); lr scale ``layer_decay ** (depth + 1 -
    layer_id)``. Frozen parameters are left out."""
    if not isinstance(model, BEiTForSegmentation):
        raise TypeError(f"segmentation_param_groups: model must be a BEiTForSegmentation, got "
                        f"{type(model).__name__}")
    return param_groups(model, weight_decay, layer_decay, backbone="backbone")


def segmentation_recipe(intermediate: bool = False, **overrides) -> TrainConfig:
    """The official ADE20K fine-tuning as a :class:`TrainConfig` (BEiT-B, 512 px): 160k steps of 16, lr
    7e-4 and layer decay 0.65 (``intermediate``: a checkpoint already fine-tuned on ImageNet, 3e-5 and
    0.9), 1500 warmup steps, final lr 0, weight decay 0.05, no gradient clipping. ``overrides`` change
    any field. Drop path (0.1) is the model's: ``BEiTConfig(drop_path_rate=0.1)``."""
    values = dict(steps=160_000, batch_size=16, lr=3e-5 if intermediate else 7e-4, min_lr=0.0,
                  warmup_steps=1500, weight_decay=0.05, clip_grad=None,
                  layer_decay=0.9 if intermediate else 0.65, output_dir="beitfast-segment")
    return TrainConfig(**{**values, **overrides})


class Segmentation:
    """The training task: ``model(images, labels)`` (decode head's cross-entropy + 0.4 x the auxiliary
    head's); its metric is the pixel accuracy of the batch (labelled pixels, the decode head's logits
    upsampled to the labels: mmseg's ``acc_seg``). Batches ``(images [B, 3, S, S], labels [B, S, S])``."""

    name = "segment"
    param_groups = staticmethod(segmentation_param_groups)
    lr_schedule = staticmethod(poly_schedule)

    def __init__(self):
        self._hooked: BEiTForSegmentation | None = None
        self._logits: torch.Tensor | None = None

    def check(self, config) -> None:
        pass  # the model checks its inputs and labels

    def to(self, device: torch.device) -> None:
        pass

    def _keep_logits(self, module, inputs, output) -> None:
        self._logits = output.detach()

    def __call__(self, model, batch):
        images, labels = batch
        inner = model
        while not isinstance(inner, BEiTForSegmentation):  # under DDP (.module) or torch.compile (._orig_mod)
            inner = getattr(inner, "_orig_mod", None) or inner.module
        if self._hooked is not inner:  # the decode head's logits, for the accuracy, without a second forward
            inner.decode_head.register_forward_hook(self._keep_logits)
            self._hooked = inner
        loss = model(images, labels)
        with torch.no_grad():
            logits = F.interpolate(self._logits.float(), size=labels.shape[-2:], mode="bilinear",
                                   align_corners=False)
            labelled = labels != inner.segmentation_config.ignore_index
            hits = (logits.argmax(1) == labels) & labelled
            accuracy = hits.sum() / labelled.sum().clamp(min=1)
        self._logits = None
        return loss, accuracy, torch.tensor(labels.shape[0], device=labels.device)


def segmentation_trainer(model: BEiTForSegmentation, stream, config: TrainConfig, on_step=None) -> Trainer:
    """The :class:`Trainer` of a segmentation fine-tuning run (``stream``: made for this rank). Under DDP the
    heads' BatchNorm layers normalise with the statistics of the global batch, as the official recipe:
    torch's SyncBatchNorm on GPUs, :class:`GlobalBatchNorm2d` elsewhere (gloo on CPU)."""
    ctx = setup_distributed()
    if ctx.enabled:
        if resolve_device(config.device, ctx.local_rank).type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = convert_global_batchnorm(model)
    return Trainer(model, Segmentation(), stream, config, on_step=on_step)


@torch.no_grad()
def predict_labels(model: BEiTForSegmentation, image: torch.Tensor, size, mode: str = "slide", crop=None,
                   stride=None) -> torch.Tensor:
    """Labels ``[H, W]`` (int64, on the model's device) of one test-transformed ``image`` ``[3, h, w]``:
    logits by ``mode`` (:func:`segment_logits`; bf16 autocast on CUDA), resized bilinearly to ``size``
    (the original image's ``(H, W)``), argmax. The model should be in eval mode."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = segment_logits(model, image[None].to(device), mode, crop, stride)
    logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


@torch.no_grad()
def evaluate_segmentation(model: BEiTForSegmentation, source,
                          transform: SegmentationTestTransform | None = None, mode: str = "slide", crop=None,
                          stride=None, device: str | torch.device = "auto") -> dict:
    """mIoU and the other numbers of :class:`SegmentationMetrics` of ``model`` on every decodable image of
    ``source`` (all ranks together), as the official evaluation: each image resized by ``transform``
    (default: to fit (2048, 512)), labelled by :func:`predict_labels` at the mask's size. Adds ``images``
    (the count) and ``classes`` (the source's class names when it has them)."""
    ctx = setup_distributed()
    device = resolve_device(device, ctx.local_rank) if isinstance(device, str) else device
    was_training = model.training
    model.eval().to(device)
    metrics = SegmentationMetrics(model.segmentation_config.num_classes,
                                  model.segmentation_config.ignore_index, device)
    images = torch.zeros((), dtype=torch.int64, device=device)
    transform = transform or SegmentationTestTransform()
    for _, image, labels in evaluation_pairs(source, transform, ctx.rank, ctx.world_size):
        metrics.update(predict_labels(model, image, labels.shape, mode, crop, stride), labels.to(device))
        images += 1
    metrics.all_reduce()
    if ctx.enabled:
        torch.distributed.all_reduce(images)
    model.train(was_training)
    result = metrics.compute()
    result["images"] = int(images)
    result["classes"] = list(getattr(source, "classes", None) or range(metrics.num_classes))
    return result
