"""Segmentation data: image/mask pairs and the official (mmseg) training and test pipelines.

Layouts: :func:`ade20k` (``images/{training,validation}/*.jpg`` with ``annotations/<split>/*.png``,
``reduce_zero_label``: 0, "other", becomes the ignore index 255 and every other label goes down by one)
and :class:`SegmentationFolder` (an image folder and a mask folder whose files share their stems).

Masks are read as integer labels: grey (8 or 16 bits) and palette PNGs give their stored values (a
palette's indices, never its colours); RGB masks are refused. Masks are resized by nearest neighbour
only. Every random draw comes from the ``random.Random`` a :class:`beitfast.data.BatchStream` gives each
sample, so batches are functions of ``(seed, step, position)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import IMAGE_EXTENSIONS, BatchStream, ImagePaths, find_images

__all__ = [
    "IGNORE_INDEX", "MEAN", "STD", "SegmentationFolder", "ade20k", "load_mask", "rescale_size",
    "photometric_distortion", "SegmentationTrainTransform", "SegmentationTestTransform", "SegmentationSample",
    "segmentation_stream", "evaluation_pairs", "image_tensor",
]

IGNORE_INDEX = 255
# mmseg's normalisation (ImageNet's, on 0-255 RGB)
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".pgm")


class SegmentationFolder(ImagePaths):
    """Images under ``images`` (recursive) paired with the mask of the same stem (and relative folder)
    under ``masks``. ``source.labels`` holds each image's mask path (what the stream hands the sample
    maker); ``reduce_zero_label`` and ``num_classes`` tell how masks are read (:func:`load_mask`).
    An image without a mask, or a split without images, is refused naming the folder or file."""

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, num_classes: int,
                 reduce_zero_label: bool = False):
        super().__init__()
        self.root, self.mask_root = Path(images), Path(masks)
        for name, folder in (("images", self.root), ("masks", self.mask_root)):
            if not folder.is_dir():
                raise FileNotFoundError(f"SegmentationFolder: {name} folder {str(folder)!r} does not exist")
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.paths, _ = find_images(self.root, IMAGE_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"SegmentationFolder: no images in {str(self.root)!r}")
        masks_by_stem: dict[Path, Path] = {}
        for path in find_images(self.mask_root, MASK_EXTENSIONS)[0]:
            stem = path.relative_to(self.mask_root).with_suffix("")
            if stem in masks_by_stem:
                raise ValueError(f"SegmentationFolder: two masks for {str(stem)!r}: "
                                 f"{str(masks_by_stem[stem])!r} and {str(path)!r}")
            masks_by_stem[stem] = path
        stems = [p.relative_to(self.root).with_suffix("") for p in self.paths]
        missing = [str(p) for p, stem in zip(self.paths, stems) if stem not in masks_by_stem]
        if missing:
            raise FileNotFoundError(
                f"SegmentationFolder: {len(missing)} image(s) have no mask of the same stem in "
                f"{str(self.mask_root)!r}, first {missing[0]!r}"
            )
        self.labels = [masks_by_stem[stem] for stem in stems]

    def mask(self, index: int) -> torch.Tensor:
        """The labels of image ``index``, ``[H, W]`` int64 (:func:`load_mask`)."""
        return load_mask(self.labels[index], self.num_classes, self.reduce_zero_label)


def ade20k(root: str | os.PathLike, split: str = "training", num_classes: int = 150) -> SegmentationFolder:
    """ADE20K (ADEChallengeData2016) as the official configs read it: ``reduce_zero_label``."""
    if split not in ("training", "validation"):
        raise ValueError(f"ade20k: split must be 'training' or 'validation', got {split!r}")
    root = Path(root)
    return SegmentationFolder(root / "images" / split, root / "annotations" / split, num_classes,
                              reduce_zero_label=True)


def load_mask(path, num_classes: int, reduce_zero_label: bool = False,
              name: str | None = None) -> torch.Tensor:
    """A mask file (a path, or a file object with its ``name`` for the errors) as ``[H, W]`` int64 labels
    in ``[0, num_classes)`` or 255; ``reduce_zero_label`` as mmseg's ``LoadAnnotations`` (0 -> 255, others
    - 1, 255 stays 255). Values outside are refused."""
    path_name = str(path) if name is None else name
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N"):
            raise ValueError(f"mask {path_name!r}: mode {image.mode} is not a label mask (expected grey "
                             f"8/16-bit or palette indices; convert colour masks to class indices first)")
        labels = np.asarray(image).astype(np.int64)
    if reduce_zero_label:
        labels = np.where(labels == 0, IGNORE_INDEX, labels - 1)
        labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
    bad = (labels < 0) | ((labels >= num_classes) & (labels != IGNORE_INDEX))
    if bad.any():
        values = sorted(set(np.unique(labels[bad])[:8].tolist()))
        raise ValueError(f"mask {path_name!r}: labels must be in [0, {num_classes}) or {IGNORE_INDEX}"
                         f"{' after reduce_zero_label' if reduce_zero_label else ''}, found {values}")
    return torch.from_numpy(labels)


def image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` (keep ratio): the largest size whose long side fits ``max(scale)`` and
    short side ``min(scale)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (half-pixel centres, no antialiasing: cv2's INTER_LINEAR, which mmcv uses), uint8."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return x.round().clamp(0, 255).to(torch.uint8)


def resize_mask(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest neighbour as cv2's INTER_NEAREST: source index floor(i * old / new)."""
    h, w = labels.shape
    rows = torch.arange(size[0]) * h // size[0]
    cols = torch.arange(size[1]) * w // size[1]
    return labels[rows[:, None], cols[None, :]]


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion.convert``: x * alpha + beta clipped to [0, 255], cut to integers."""
    return (x * alpha + beta).clamp(0, 255).floor()


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit HSV: H in [0, 180) (degrees / 2), S and V in [0, 255], rounded."""
    r, g, b = x
    v, _ = x.max(0)
    delta = v - x.min(0).values
    s = torch.where(v > 0, delta * 255 / v.clamp(min=1), torch.zeros_like(v))
    safe = delta.clamp(min=1e-12)
    h = torch.where(v == r, 60 * (g - b) / safe, torch.where(v == g, 120 + 60 * (b - r) / safe,
                                                             240 + 60 * (r - g) / safe))
    h = torch.where(delta > 0, h, torch.zeros_like(h)) % 360
    return torch.stack([(h / 2).round() % 180, s.round(), v])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv[0] * 2, hsv[1] / 255, hsv[2]
    k = torch.stack([(n + h / 60) % 6 for n in (5.0, 3.0, 1.0)])
    rgb = v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))
    return rgb.round().clamp(0, 255)


def photometric_distortion(image: torch.Tensor, rng: random.Random, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18
                           ) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on a ``[3, H, W]`` image of 0-255 integer values (any dtype;
    float32 back): random brightness, contrast before or after (equal odds), saturation and hue, each
    applied with probability 1/2, in mmseg's order of draws. The HSV conversions are OpenCV's 8-bit
    ones computed in floating point (rounding may differ by one level from cv2's fixed-point code)."""
    x = image.float()
    if rng.random() < 0.5:
        x = _convert(x, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.random() < 0.5

    def contrast(x):
        return _convert(x, alpha=rng.uniform(*contrast_range)) if rng.random() < 0.5 else x

    if contrast_first:
        x = contrast(x)
    if rng.random() < 0.5:
        hsv = _rgb_to_hsv(x)
        hsv[1] = _convert(hsv[1], alpha=rng.uniform(*saturation_range))
        x = _hsv_to_rgb(hsv)
    if rng.random() < 0.5:
        hsv = _rgb_to_hsv(x)
        hsv[0] = (hsv[0] + rng.randrange(-hue_delta, hue_delta)) % 180
        x = _hsv_to_rgb(hsv)
    if not contrast_first:
        x = contrast(x)
    return x


def normalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image.float() - mean) / std


class SegmentationTrainTransform:
    """The official ADE20K training pipeline (mmseg): resize to a random ratio in ``ratio_range`` of
    ``scale`` keeping the aspect ratio; random ``crop`` whose most frequent labelled class covers less
    than ``cat_max_ratio`` of the labelled pixels (up to 10 new draws, the last one kept); horizontal flip
    with probability 1/2; photometric distortion; normalisation; padding to ``crop`` (image 0 after
    normalisation, labels 255). ``(image, labels, rng)`` -> ``([3, crop, crop] float32, [crop, crop]
    int64)``."""

    def __init__(self, crop: int = 512, scale: tuple[int, int] = (2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio: float = 0.75, flip: float = 0.5, distortion: bool = True):
        self.crop, self.scale, self.ratio_range = crop, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip, self.distortion = cat_max_ratio, flip, distortion

    def _crop_box(self, height: int, width: int, rng: random.Random) -> tuple[int, int]:
        top = rng.randint(0, max(height - self.crop, 0))
        left = rng.randint(0, max(width - self.crop, 0))
        return top, left

    def __call__(self, image: torch.Tensor, labels: torch.Tensor, rng: random.Random):
        low, high = self.ratio_range
        ratio = rng.random() * (high - low) + low
        size = rescale_size(*image.shape[-2:], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, labels = resize_image(image, size), resize_mask(labels, size)
        c = self.crop
        top, left = self._crop_box(*size, rng)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                window = labels[top:top + c, left:left + c]
                counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._crop_box(*size, rng)
        image, labels = image[:, top:top + c, left:left + c], labels[top:top + c, left:left + c]
        if rng.random() < self.flip:
            image, labels = image.flip(-1), labels.flip(-1)
        x = photometric_distortion(image, rng) if self.distortion else image.float()
        x = normalize(x)
        pad = (0, c - x.shape[-1], 0, c - x.shape[-2])
        return F.pad(x, pad), F.pad(labels, pad, value=IGNORE_INDEX)


class SegmentationTestTransform:
    """The official test pipeline: resize keeping the aspect ratio to fit ``scale`` (2048, 512), bilinear;
    normalisation. The labels stay at the original size (predictions are resized back to them)."""

    def __init__(self, scale: tuple[int, int] = (2048, 512)):
        self.scale = tuple(scale)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return normalize(resize_image(image, rescale_size(*image.shape[-2:], self.scale)))


def check_pair(image: torch.Tensor, labels: torch.Tensor, mask_name) -> None:
    if tuple(image.shape[-2:]) != tuple(labels.shape):
        raise ValueError(f"mask {str(mask_name)!r} is {labels.shape[1]}x{labels.shape[0]} (width x height), "
                         f"its image {image.shape[-1]}x{image.shape[-2]}: they must match")


class SegmentationSample:
    """A :class:`beitfast.data.BatchStream` sample maker: ``(image, mask, rng, key)`` -> the transformed
    ``(image, labels)``; ``mask`` is a mask file's path, or the labels themselves (in-memory scenes)."""

    def __init__(self, transform: SegmentationTrainTransform, num_classes: int, reduce_zero_label: bool):
        self.transform, self.num_classes, self.reduce_zero_label = transform, num_classes, reduce_zero_label

    def __call__(self, image, mask, rng, key):
        if isinstance(mask, torch.Tensor):
            labels, mask = mask, f"the mask of sample {key}"
        else:
            labels = load_mask(mask, self.num_classes, self.reduce_zero_label)
        pixels = image_tensor(image)
        check_pair(pixels, labels, mask)
        return self.transform(pixels, labels, rng)


def segmentation_stream(source: SegmentationFolder, transform: SegmentationTrainTransform, batch_size: int,
                        **stream_args) -> BatchStream:
    """Batches ``(images [b, 3, crop, crop], labels [b, crop, crop] int64)``."""
    sample = SegmentationSample(transform, source.num_classes, source.reduce_zero_label)
    return BatchStream(source, sample, batch_size, **stream_args)


def evaluation_pairs(source: SegmentationFolder, transform: SegmentationTestTransform, rank: int = 0,
               world_size: int = 1):
    """Every image of ``source`` once (this rank's share, in order): ``(index, image [3, h, w], labels
    [H, W])``; undecodable images are skipped (counted in ``source.skipped``)."""
    for i in range(rank, len(source), world_size):
        image = source.load(i)
        if image is None:
            continue
        pixels, labels = image_tensor(image), source.mask(i)
        check_pair(pixels, labels, source.labels[i] if isinstance(source, SegmentationFolder)
                   else f"the mask of image {i}")
        yield i, transform(pixels), labels
