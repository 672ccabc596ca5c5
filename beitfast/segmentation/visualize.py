"""Pictures of segmentations a person can look at: label masks as palette PNGs (the pixel values stay the
labels; the palette colours them) and overlays of the colours on the image."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image

__all__ = ["palette", "mask_image", "overlay"]


def palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 colours, neighbours far apart in hue (golden-ratio steps), alternating
    in brightness; the same for every run."""
    colours = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * (i % 2),
                                   0.95 - 0.3 * (i % 3 == 2)) for i in range(num_classes)]
    return (np.array(colours) * 255).round().astype(np.uint8)


def mask_image(labels: torch.Tensor | np.ndarray, colours: np.ndarray) -> Image.Image:
    """A palette ("P") PNG-ready image of ``[H, W]`` labels in [0, 256): its values are the labels."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.max(initial=0) > 255 or labels.min(initial=0) < 0:
        raise ValueError(f"mask_image: labels must be in [0, 256) for a palette image, got "
                         f"[{labels.min()}, {labels.max()}]")
    image = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")
    flat = np.zeros((256, 3), np.uint8)
    flat[:len(colours)] = colours[:256]
    image.putpalette(flat.flatten().tolist())
    return image


def overlay(image: Image.Image, labels: torch.Tensor | np.ndarray, colours: np.ndarray,
            opacity: float = 0.5) -> Image.Image:
    """``image`` (RGB) with each pixel's class colour blended in at ``opacity``."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if pixels.shape[:2] != labels.shape:
        raise ValueError(f"overlay: labels {labels.shape} and image {pixels.shape[:2]} differ in size")
    blended = (1 - opacity) * pixels + opacity * colours[labels].astype(np.float32)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
