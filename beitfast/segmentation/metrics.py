"""Segmentation metrics as mmseg computes them: per-class intersection, union, label and prediction pixel
counts summed over every image (and every process), then mIoU, per-class IoU, pixel accuracy (aAcc) and
mean class accuracy. Pixels labelled ``ignore_index`` do not count. A class with no pixel in the labels
nor in the predictions has IoU NaN; a class with no labelled pixel has accuracy NaN; the means skip NaN
(``nanmean``), as mmseg's ``mean_iou``."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["SegmentationMetrics", "format_table"]


class SegmentationMetrics:
    """Counts accumulated over batches: ``update(predictions, labels)`` with integer tensors of one shape
    (``[B, H, W]`` or ``[H, W]``), ``all_reduce()`` sums the counts of every process (call it once,
    on every rank, before ``compute``), ``compute()`` the numbers."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SegmentationMetrics: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        # rows: intersection, prediction, label pixels per class (union = prediction + label - intersection)
        self.counts = torch.zeros(3, num_classes, dtype=torch.int64, device=device)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        if predictions.shape != labels.shape:
            raise ValueError(f"SegmentationMetrics: predictions {tuple(predictions.shape)} and labels "
                             f"{tuple(labels.shape)} must have the same shape")
        for name, t in (("predictions", predictions), ("labels", labels)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"SegmentationMetrics: {name} must be an integer tensor, got {t.dtype}")
        c = self.num_classes
        valid = labels != self.ignore_index
        labels = labels[valid].to(self.counts.device, torch.int64)
        predictions = predictions[valid].to(self.counts.device, torch.int64)
        for name, t in (("labels", labels), ("predictions", predictions)):
            bad = (t < 0) | (t >= c)
            if bad.any():
                values = sorted(t[bad].unique()[:8].tolist())
                raise ValueError(f"SegmentationMetrics: {name} must be in [0, {c}) (labels may also be "
                                 f"ignore_index {self.ignore_index}), got {values}")
        hit = predictions == labels
        self.counts[0] += torch.bincount(labels[hit], minlength=c)
        self.counts[1] += torch.bincount(predictions, minlength=c)
        self.counts[2] += torch.bincount(labels, minlength=c)

    def all_reduce(self) -> None:
        """Sum the counts over the processes of the default group (nothing without one)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts)

    def compute(self) -> dict:
        """``aAcc``, ``mIoU``, ``mAcc`` (NaN when nothing counts), ``IoU`` and ``Acc`` per class (NaN where
        undefined), ``pixels`` (labelled pixels counted) and the raw ``intersection``, ``union``,
        ``label`` and ``prediction`` counts."""
        intersection, prediction, label = (row.double() for row in self.counts.cpu())
        union = prediction + label - intersection
        iou = intersection / union  # 0 / 0 = NaN: absent from labels and predictions
        acc = intersection / label
        pixels = label.sum().item()
        return {
            "aAcc": intersection.sum().item() / pixels if pixels else math.nan,
            "mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
            "IoU": iou.tolist(), "Acc": acc.tolist(), "pixels": int(pixels),
            "intersection": intersection.long().tolist(), "union": union.long().tolist(),
            "label": label.long().tolist(), "prediction": prediction.long().tolist(),
        }


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return defined.mean().item() if defined.numel() else math.nan


def format_table(result: dict, class_names=None) -> str:
    """The per-class IoU and accuracy table (percent) and the summary line, as text."""
    names = [str(n) for n in (class_names or range(len(result["IoU"])))]
    width = max([5] + [len(n) for n in names])

    def percent(value):
        return "   nan" if math.isnan(value) else f"{100 * value:6.2f}"

    lines = [f"{'class':<{width}}    IoU    Acc"]
    lines += [f"{name:<{width}} {percent(iou)} {percent(acc)}"
              for name, iou, acc in zip(names, result["IoU"], result["Acc"])]
    lines.append(f"mIoU {percent(result['mIoU']).strip()}  mAcc {percent(result['mAcc']).strip()}  "
                 f"aAcc {percent(result['aAcc']).strip()}  ({result['pixels']} labelled pixels)")
    return "\n".join(lines)
