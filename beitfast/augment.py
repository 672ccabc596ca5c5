"""The official augmentation of BEiT, shared by the reference input path (:mod:`beitfast.data`, which
re-exports every name) and the fast ones (:mod:`beitfast.pipeline`): random resized crops, flips, colour
jitter with PIL's operations, normalisation; the transforms of pre-training (two views), fine-tuning and
evaluation; and the decoding of an opened image to RGB pixels. Every random choice comes from the ``rng``
a transform is given.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageStat

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "JITTER_OPERATIONS", "random_resized_crop_box", "draw_jitter",
    "apply_color_jitter", "color_jitter", "draw_flip_and_box", "flip_and_crop_box", "to_tensor", "normalize",
    "TwoViewTransform", "ClassifyTransform", "EvalTransform", "DecodeError", "decode_rgb",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ColorJitter's operations, in the order of torchvision's (and PIL's ImageEnhance classes).
JITTER_OPERATIONS = ("brightness", "contrast", "saturation")
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a crop covering ``scale`` of the area with aspect ``ratio`` (ten tries,
    then the largest centred crop of a clamped aspect: the torchvision RandomResizedCrop rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draw_jitter(strength: float, rng: random.Random) -> list[tuple[int, float]]:
    """The draws of ColorJitter(strength, strength, strength): ``[(operation, factor)]`` in the order
    they apply, operations being indices into ``JITTER_OPERATIONS`` and factors drawn from
    ``[1 - strength, 1 + strength]``; empty when ``strength <= 0``."""
    if strength <= 0:
        return []
    operations = list(range(len(JITTER_OPERATIONS)))
    rng.shuffle(operations)
    return [(op, rng.uniform(max(0.0, 1 - strength), 1 + strength)) for op in operations]


_IDENTITY_TABLE = bytes(range(256))


def _blend_table(table: bytes, constant: int, factor: float) -> bytes:
    """``Image.blend`` of a constant image and an image of each 8-bit value of ``table``: what PIL's
    blend makes of every value, computed by PIL itself."""
    values = Image.frombytes("L", (256, 1), table)
    return Image.blend(Image.new("L", (256, 1), constant), values, factor).tobytes()


def apply_color_jitter(image: Image.Image, jitter: list[tuple[int, float]], grey_mean: float | None = None
                       ) -> Image.Image:
    """``draw_jitter``'s draws applied to an RGB image, pixel for pixel as ``color_jitter``'s ImageEnhance
    operations compute them, faster: brightness and contrast map each 8-bit value on its own (a blend
    with a constant image), so consecutive ones are one ``Image.point`` table made by PIL's own blend of
    the 256 values; saturation is ImageEnhance.Color.

    ``grey_mean``: for a view cut from a larger image, the grey mean (0-255) of that whole image before
    the jitter, which contrast blends towards (carried through the brightness factors applied before
    it, without clipping); None: the image's own mean, as ImageEnhance.Contrast computes it."""
    table, brightness = _IDENTITY_TABLE, 1.0

    def flushed(image: Image.Image) -> Image.Image:
        return image if table == _IDENTITY_TABLE else image.point(list(table) * 3)

    for op, factor in jitter:
        if JITTER_OPERATIONS[op] == "saturation":
            image, table = ImageEnhance.Color(flushed(image)).enhance(factor), _IDENTITY_TABLE
        elif JITTER_OPERATIONS[op] == "brightness":
            table, brightness = _blend_table(table, 0, factor), brightness * factor
        elif grey_mean is None:  # contrast around the image's own mean, as ImageEnhance.Contrast
            image, table = flushed(image), _IDENTITY_TABLE
            table = _blend_table(table, int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5), factor)
        else:
            table = _blend_table(table, int(min(grey_mean * brightness, 255) + 0.5), factor)
    return flushed(image)


def color_jitter(image: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """ColorJitter(strength, strength, strength): brightness, contrast and saturation factors drawn
    from ``[1 - strength, 1 + strength]`` and applied in a random order (ImageEnhance, as torchvision
    does for PIL images)."""
    for op, factor in draw_jitter(strength, rng):
        image = _ENHANCERS[op](image).enhance(factor)
    return image


def draw_flip_and_box(width: int, height: int, rng: random.Random, flip: bool, scale, ratio
                      ) -> tuple[bool, tuple[int, int, int, int]]:
    """The draws of RandomHorizontalFlip (when ``flip``) then RandomResizedCrop: whether the image is
    flipped, and the crop ``(left, top, w, h)`` in the flipped image."""
    flipped = flip and rng.random() < 0.5
    return flipped, random_resized_crop_box(width, height, rng, scale, ratio)


def flip_and_crop_box(image: Image.Image, rng: random.Random, flip: bool, scale, ratio
                      ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """RandomHorizontalFlip (when ``flip``), then a RandomResizedCrop box ``(left, top, right, bottom)``
    for ``image.resize(..., box=box)``."""
    flipped, (left, top, w, h) = draw_flip_and_box(image.width, image.height, rng, flip, scale, ratio)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image, (left, top, left + w, top + h)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` float32 in ``[0, 1]``."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class TwoViewTransform:
    """BEiT's pre-training augmentation: ColorJitter(0.4, 0.4, 0.4), RandomHorizontalFlip, then ONE
    RandomResizedCrop giving two views of the same region:

    * the model view, ``model_size`` square, bicubic, normalised with the ImageNet mean/std;
    * the tokenizer view, ``tokenizer_size`` square, Lanczos, in ``[0, 1]``.

    ``transform(image, rng)`` with a PIL image and a ``random.Random`` returns both ``[3, S, S]``.
    """

    def __init__(self, model_size: int = 224, tokenizer_size: int = 112, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), jitter: float = 0.4, flip: bool = True):
        if model_size <= 0 or tokenizer_size <= 0:
            raise ValueError(
                f"TwoViewTransform: sizes must be positive, got model_size={model_size}, "
                f"tokenizer_size={tokenizer_size}"
            )
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"TwoViewTransform: scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.model_size, self.tokenizer_size = model_size, tokenizer_size
        self.scale, self.ratio, self.jitter, self.flip = tuple(scale), tuple(ratio), jitter, flip

    def _augment(self, image: Image.Image, rng: random.Random) -> tuple[Image.Image, tuple[int, int, int, int]]:
        image = color_jitter(decode_rgb(image), self.jitter, rng)
        return flip_and_crop_box(image, rng, self.flip, self.scale, self.ratio)

    def _tokenizer_view(self, image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
        return to_tensor(image.resize((self.tokenizer_size,) * 2, Image.Resampling.LANCZOS, box=box))

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        image, box = self._augment(image, rng)
        model_view = image.resize((self.model_size,) * 2, Image.Resampling.BICUBIC, box=box)
        return normalize(to_tensor(model_view)), self._tokenizer_view(image, box)

    def tokenizer_view(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        """The tokenizer view alone (same augmentation)."""
        return self._tokenizer_view(*self._augment(image, rng))

    def draw(self, width: int, height: int, rng: random.Random
             ) -> tuple[list[tuple[int, float]], bool, tuple[int, int, int, int]]:
        """The random choices ``__call__`` makes for a ``width`` x ``height`` image with ``rng``, in the
        same order: ``(jitter, flipped, (left, top, w, h))`` (``draw_jitter``, ``draw_flip_and_box``)."""
        jitter = draw_jitter(self.jitter, rng)
        return (jitter, *draw_flip_and_box(width, height, rng, self.flip, self.scale, self.ratio))


class ClassifyTransform:
    """Fine-tuning augmentation: RandomResizedCrop (bicubic) and flip, normalised. ``scale=(1, 1)``
    keeps the whole image (small images such as digits)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image, box = flip_and_crop_box(decode_rgb(image), rng, self.flip, self.scale, self.ratio)
        return normalize(to_tensor(image.resize((self.size,) * 2, Image.Resampling.BICUBIC, box=box)))


class EvalTransform:
    """Evaluation: resize the shorter side to ``size / crop_pct`` (bicubic), centre crop ``size``."""

    def __init__(self, size: int, crop_pct: float = 0.875):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"EvalTransform: crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = decode_rgb(image)
        short = int(round(self.size / self.crop_pct))
        w, h = image.size
        scale = short / min(w, h)
        image = image.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (image.width - self.size) // 2, (image.height - self.size) // 2
        return normalize(to_tensor(image.crop((left, top, left + self.size, top + self.size))))


# -- decoding --------------------------------------------------------------------------------------


class DecodeError(Exception):
    """An image could not be decoded; raised by a sample maker that decodes its own images (its cause
    is the decoder's error). The stream skips the image, counted by the source."""


# How PIL opens 16-bit grey images (PNG, TIFF; "I" in older Pillow): 0-65535, which its convert("RGB")
# clips at 255 (white). 16-bit colour PNGs PIL reads as 8-bit RGB itself (the high byte).
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def decode_rgb(image: Image.Image) -> Image.Image:
    """The pixels of an opened image, as RGB (decodes now; PIL decodes lazily). 16-bit grey is scaled
    from 0-65535 to 0-255 (rounded; values of an "I" image outside that range are clipped)."""
    image.load()
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")
