"""Classification (fine-tuning and linear probing): cross-entropy with label smoothing on ``(images,
labels)`` batches; a classifier made from pre-trained weights; its evaluation (loss, top-1, top-5, per
class) over a whole data set and every rank."""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ... import checkpoint
from ...config import BEiTConfig
from ...data import EvalTransform, ImageSource, eval_batches
from ...model import BEiT
from ..devices import resolve_device, setup_distributed

__all__ = ["Classification", "classifier_from_pretrained", "evaluation", "evaluate"]


class Classification:
    """Fine-tuning and linear probing: cross-entropy with label smoothing. Batches ``(images, labels)``."""

    name = "classify"

    def __init__(self, label_smoothing: float = 0.1):
        self.label_smoothing = label_smoothing

    def check(self, config: BEiTConfig) -> None:
        if config.num_classes <= 0:
            raise ValueError("classification needs a model with num_classes > 0")

    def to(self, device: torch.device) -> None:
        pass

    def __call__(self, model, batch):
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, accuracy, torch.tensor(labels.shape[0], device=labels.device)


def classifier_from_pretrained(pretrained: BEiT | str | os.PathLike, num_classes: int,
                               drop_path_rate: float = 0.1, log: Callable[[str], None] | None = None,
                               **overrides) -> BEiT:
    """A classifier (mean pooling, no LM head) from pre-trained weights: a :class:`BEiT`, a training
    checkpoint of this trainer, or any file or folder :meth:`BEiT.from_file` reads. The head of a
    classifier of another class count is dropped (re-initialised, as the official recipe does), which
    ``log`` (default: a warning) is told in one line."""
    if isinstance(pretrained, BEiT):
        state, config = pretrained.state_dict(), pretrained.config
    else:
        model = BEiT.from_file(pretrained)  # verified; a training checkpoint gives its model config
        state, config = model.state_dict(), model.config
    target = config.replace(vocab_size=0, num_classes=num_classes, use_mean_pooling=True,
                            drop_path_rate=drop_path_rate, **overrides)
    model = BEiT(target)
    state = checkpoint.adapt_state_dict(checkpoint.to_official_names(state)[0], target)
    # The LM head, the mask token and the final norm (replaced by fc_norm) are not used.
    state = {k: v for k, v in state.items() if not k.startswith(("lm_head.", "mask_token", "norm."))}
    head = state.get("head.weight")
    if head is not None and head.shape[0] != num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        notice = (f"the pre-trained classifier's head has {head.shape[0]} classes, this one {num_classes}: "
                  f"its head is dropped and a new one initialised")
        if log is None:
            warnings.warn(notice, stacklevel=2)
        else:
            log(notice)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_layers = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if new_layers or unexpected:
        raise ValueError(
            f"classifier_from_pretrained: weights do not fit (missing {new_layers}, unexpected {unexpected})"
        )
    return model


@torch.no_grad()
def evaluation(model: BEiT, source: ImageSource, transform: EvalTransform, batch_size: int = 256,
               device: str | torch.device = "auto") -> dict:
    """``model`` on every decodable image of ``source`` (all ranks together): ``images``, the mean
    cross-entropy ``loss`` (no label smoothing), ``top1``, ``top5`` (top-k with k = min(5, classes)) and
    ``per_class``, the top-1 accuracy of each class (by name, ``source.classes``, when it has them; None
    for a class without images)."""
    ctx = setup_distributed()
    device = resolve_device(device, ctx.local_rank) if isinstance(device, str) else device
    was_training = model.training
    model.eval().to(device)
    num_classes = model.config.num_classes
    # loss sum, top-1 hits, top-k hits, images; then per class: hits, images
    sums = torch.zeros(4 + 2 * num_classes, dtype=torch.float64, device=device)
    for images, labels in eval_batches(source, transform, batch_size, ctx.rank, ctx.world_size):
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images.to(device))
        logits = logits.float()
        hits = logits.argmax(-1) == labels
        top = logits.topk(min(5, num_classes), dim=-1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += hits.sum()
        sums[2] += (top == labels[:, None]).any(-1).sum()
        sums[3] += labels.numel()
        sums[4:4 + num_classes] += torch.bincount(labels[hits], minlength=num_classes)
        sums[4 + num_classes:] += torch.bincount(labels, minlength=num_classes)
    if ctx.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    sums = sums.tolist()
    count = max(sums[3], 1)
    names = list(getattr(source, "classes", None) or range(num_classes))
    per_class = {str(name): (hits / total if total else None)
                 for name, hits, total in zip(names, sums[4:4 + num_classes], sums[4 + num_classes:])}
    return {"images": int(sums[3]), "loss": sums[0] / count, "top1": sums[1] / count, "top5": sums[2] / count,
            "per_class": per_class}


def evaluate(model: BEiT, source: ImageSource, transform: EvalTransform, batch_size: int = 256,
             device: str | torch.device = "auto") -> float:
    """Top-1 accuracy of ``model`` on every decodable image of ``source`` (all ranks together); the
    other numbers: :func:`evaluation`."""
    return evaluation(model, source, transform, batch_size, device)["top1"]
