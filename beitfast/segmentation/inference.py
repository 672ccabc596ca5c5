"""Segmentation inference on images of any size, as mmseg's ``EncoderDecoder`` test modes.

* ``"slide"`` (the official evaluation): windows of ``crop`` pixels every ``stride`` pixels cover the
  image (the last row and column of windows aligned with its bottom and right edges); each window's
  logits, upsampled bilinearly to the window, are summed where windows overlap and divided by the
  number of windows that cover each pixel. The official configs: crop 512, stride 341 (640 and 426 for
  BEiT-L); the defaults here are the model's input size and two thirds of it, rounded down.
* ``"whole"``: the image in one piece.

The model takes images of its input size only (``model.config.image_hw``): a window or image smaller
than that is padded at the bottom and right with zeros (the mean colour after normalisation) and its
logits cut back, which is what mmseg does for an image smaller than the crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MODES", "default_stride", "window_boxes", "segment_logits"]

MODES = ("slide", "whole")


def default_stride(crop: tuple[int, int]) -> tuple[int, int]:
    """Two thirds of the crop, rounded down: 341 for 512 and 426 for 640, as the official configs."""
    return (crop[0] * 2 // 3, crop[1] * 2 // 3)


def window_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]):
    """The ``(top, bottom, left, right)`` of mmseg's ``slide_inference`` windows, row by row."""
    rows = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride[0] + crop[0], height), min(c * stride[1] + crop[1], width)
            boxes.append((max(bottom - crop[0], 0), bottom, max(right - crop[1], 0), right))
    return boxes


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"segment_logits: {name} must be a positive int or a pair of them, got {value!r}")
    return pair


def _window_logits(model, windows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``[n, C, h, w]`` of windows ``[n, 3, h, w]`` no larger than the model's input ``size``."""
    h, w = windows.shape[-2:]
    padded = F.pad(windows, (0, size[1] - w, 0, size[0] - h)) if (h, w) != size else windows
    logits = model(padded)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


@torch.no_grad()
def segment_logits(model, images: torch.Tensor, mode: str = "slide", crop=None, stride=None,
                   windows_per_batch: int = 8) -> torch.Tensor:
    """Logits ``[B, C, H, W]`` (float32, or the images' dtype if wider) of normalised ``images``
    ``[B, 3, H, W]`` of any size, by ``mode`` (:data:`MODES`). ``crop`` (default and largest: the
    model's input size) and ``stride`` (default :func:`default_stride`) are ints or (h, w) pairs;
    ``windows_per_batch`` windows go through the model at once. The model is used as it is (put it in
    eval mode first)."""
    size = tuple(model.config.image_hw)
    if images.dim() != 4:
        raise ValueError(f"segment_logits: images must be a [B, 3, H, W] tensor, got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    dtype = torch.promote_types(images.dtype, torch.float32)
    if mode == "whole":
        if height > size[0] or width > size[1]:
            raise ValueError(f"segment_logits: mode 'whole' takes images up to the model's input size "
                             f"{size[0]}x{size[1]}, got {height}x{width}; use mode 'slide' or resize them")
        return _window_logits(model, images, size).to(dtype)
    if mode != "slide":
        raise ValueError(f"segment_logits: mode must be one of {MODES}, got {mode!r}")
    crop = size if crop is None else _pair("crop", crop)
    if crop[0] > size[0] or crop[1] > size[1]:
        raise ValueError(f"segment_logits: crop {crop} is larger than the model's input size {size}")
    stride = default_stride(crop) if stride is None else _pair("stride", stride)
    boxes = window_boxes(height, width, crop, stride)
    total = count = None
    for first in range(0, len(boxes), windows_per_batch):
        chunk = boxes[first:first + windows_per_batch]
        # Windows of one chunk share a size except at the edges: group them by size.
        for shape in dict.fromkeys((b - t, r - l) for t, b, l, r in chunk):
            same = [box for box in chunk if (box[1] - box[0], box[3] - box[2]) == shape]
            crops = torch.cat([images[:, :, t:b, l:r] for t, b, l, r in same])
            logits = _window_logits(model, crops, size).to(dtype).unflatten(0, (len(same), images.shape[0]))
            if total is None:
                total = images.new_zeros((images.shape[0], logits.shape[2], height, width), dtype=dtype)
                count = images.new_zeros((1, 1, height, width), dtype=dtype)
            for (t, b, l, r), window in zip(same, logits):
                total[:, :, t:b, l:r] += window
                count[:, :, t:b, l:r] += 1
    return total / count
