"""The fast input path of pre-training: ``TwoViewTransform``'s augmentation with the same random draws,
restructured so that the costly work is done once, on small images.

``TwoViewTransform`` (the official order) jitters the colours of the whole decoded image, flips it,
then resamples the crop twice (224 bicubic, 112 Lanczos). ``FastTwoView`` (CPU):

* decodes once; a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT domain (PIL's ``draft``) when the
  crop keeps at least ``reducing_gap`` times the model view's side (Pillow's rule for ``thumbnail``);
* resamples the crop to the model view first, with torch's antialiased bicubic on 8-bit pixels (PIL's
  filter, vectorised; the crop is cut at the box, as torchvision's ``resized_crop`` of the official
  code does);
* jitters the model view, not the whole image, with PIL's own operations (``apply_color_jitter``);
  contrast blends towards the grey mean of the whole image, as the official code does (an image
  smaller than the view is jittered whole, first, as in the official order);
* makes the tokenizer view the Lanczos reduction of the jittered model view when it is at most half
  its size (BEiT's 112 and 224; else it resamples the crop), and flips both views.

Each operation of the jitter is an affine map of a pixel's RGB values (brightness ``f x``, contrast
``f x + (1 - f) m``, saturation ``f x + (1 - f) grey(x)``) and resampling is linear, so the order
changes results only through clipping to ``[0, 255]`` and 8-bit rounding. Approximations, whose size
tests/test_pipeline.py bounds against ``TwoViewTransform`` per image and in distribution: that
reordering; the contrast mean estimated on every 16th pixel and carried through a
brightness drawn before it without clipping; the tokenizer view reduced from the 224 bicubic view
rather than resampled from the crop; the DCT-domain reduction of large crops.

``DeviceTwoView`` runs the same augmentation as batched tensor code on any device (the GPU path:
nvJPEG through ``torchvision.io.decode_jpeg``, the crops of the batch resampled together as two batched
matrix products per view with PIL's filters, the jitter as batched 3x3 colour matrices with PIL's 8-bit
truncation, ``apply_jitter``); the tests run it on CPU tensors.

Training takes one of two input paths (``resolve_input_path``; ``TrainConfig.input_path``, ``beitfast
pretrain --input-path``): ``"cpu"``, ``FastPretrainSample`` in the DataLoader workers, the default off
CUDA; ``"device"``, the default on CUDA: ``DevicePretrainSample`` leaves the workers only the cheap
part (read the stored bytes, the header's size, ``TwoViewTransform.draw`` with the sample's own
generator, the masks; PIL decodes the images that are not JPEGs), an ``EncodedBatch`` crosses to the
training process, and ``BatchStream.prepare`` decodes and augments it there on the training device
(the trainer issues that work while the device runs the previous step). Both paths draw the same numbers, so a batch stays a function of its step.

The device decoder is ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG, batched) rather than
NVIDIA DALI: DALI is a separate, large, CUDA-specific dependency with its own reader and augmentation
graph, which could not be the code the CPU tests run; torchvision is a dependency already
and the same tensor code runs on CPU in the tests. The GPU throughput of the two is not measured yet
(``beitfast bench --data`` and the step benchmark's ``beitfast-jpeg`` variant measure this path). Since
torchvision 0.29 its image decoders are marked deprecated in favour of TorchCodec: only
``DeviceTwoView.decode`` would change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import random
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import check_choice
from .augment import (IMAGENET_MEAN, IMAGENET_STD, JITTER_OPERATIONS, DecodeError, TwoViewTransform,
                      apply_color_jitter, decode_rgb)
from .masking import batch_masks

__all__ = ["GREY_WEIGHTS", "jitter_stages", "apply_jitter", "FastTwoView", "FastPretrainSample",
           "resampling_weights", "resampling_matrix", "resample_crops", "resample", "DeviceTwoView",
           "INPUT_PATHS", "resolve_input_path", "decode_jpeg_available", "EncodedBatch", "DevicePretrainSample"]

# ITU-R 601-2 luma: PIL's convert("L"), the grey of ImageEnhance.Color and Contrast.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION = (JITTER_OPERATIONS.index(name) for name in ("brightness", "contrast", "saturation"))
# JPEG decoders scale by 1/2, 1/4 or 1/8 in the DCT domain.
_DRAFT_REDUCTIONS = (8, 4, 2)
_MEAN_SUBSAMPLE = 16


def jitter_stages(jitters: Sequence[Sequence[tuple[int, float]]]) -> tuple[torch.Tensor, ...]:
    """Each sample's jitter (``TwoViewTransform.draw``'s first part) as stages for ``apply_jitter``:
    colour matrices ``[stages, B, 3, 3]``; the contrast stages' ``1 - factor`` ``[stages, B]`` (0
    elsewhere) and the product of the brightness factors drawn before them, which scale the image's
    grey mean. A sample with fewer operations gets identity stages."""
    batch = len(jitters)
    stages = max((len(j) for j in jitters), default=0)
    # Built as Python lists on the host, one tensor each at the end: per-element tensor updates would
    # cost microseconds per sample.
    matrices = [[[[float(r == c) for c in range(3)] for r in range(3)]] * batch for _ in range(stages)]
    contrast = [[0.0] * batch for _ in range(stages)]
    brightness_before = [[1.0] * batch for _ in range(stages)]
    for i, jitter in enumerate(jitters):
        brightness = 1.0
        for stage, (op, factor) in enumerate(jitter):
            desaturation = (1 - factor) if op == SATURATION else 0.0
            matrices[stage][i] = [[factor * (r == c) + desaturation * GREY_WEIGHTS[c] for c in range(3)]
                                  for r in range(3)]
            if op == BRIGHTNESS:
                brightness *= factor
            elif op == CONTRAST:
                contrast[stage][i], brightness_before[stage][i] = 1 - factor, brightness
    shapes = ((stages, batch, 3, 3), (stages, batch), (stages, batch))
    return tuple(torch.tensor(values, dtype=torch.float64).reshape(shape).float()
                 for values, shape in zip((matrices, contrast, brightness_before), shapes))


def apply_jitter(views: torch.Tensor, stages: tuple[torch.Tensor, ...], grey_means: torch.Tensor) -> torch.Tensor:
    """``views`` ``[B, 3, H, W]``, float pixel values in ``[0, 255]``, through the ``stages`` of
    ``jitter_stages``; ``grey_means`` ``[B]`` is the grey mean of each whole image in ``[0, 255]``.
    Each stage ends as PIL's 8-bit blend does: truncated to an integer, clipped to ``[0, 255]``.
    No host synchronisation."""
    matrices, contrast, brightness_before = (_on(t, views.device) for t in stages)
    # PIL blends with a grey image of the mean rounded to 8 bits.
    means = (grey_means.to(views.device)[None, :] * brightness_before).clamp_(max=255).round_()
    offsets = (contrast * means)[..., None, None].expand(-1, -1, 3, 1)
    flat = views.reshape(views.shape[0], 3, -1)
    for matrix, offset in zip(matrices, offsets):
        flat = torch.baddbmm(offset, matrix, flat).floor_().clamp_(0, 255)
    return flat.view(views.shape)


def _normalized(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit ``[B, 3, H, W]`` pixels as contiguous float32 normalised with the ImageNet mean and std, in
    one pass."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    return torch.addcmul(-mean / std, pixels, 1 / (255 * std), out=out)


def _banded_product(weights: torch.Tensor, x: torch.Tensor, dim: int, blocks: int = 8) -> torch.Tensor:
    """``x`` resampled along ``dim`` (-1 or -2) by ``weights`` ``[out, in]``, a band matrix: one product per
    block of output lines over the input lines that block reaches (a fraction of the dense work)."""
    parts = []
    for rows in weights.split(-(-weights.shape[0] // blocks)):
        used = rows.any(0).nonzero()
        lines = slice(int(used[0]), int(used[-1]) + 1)
        if dim == -1:
            parts.append(x[..., lines] @ rows[:, lines].T)
        else:
            parts.append(rows[:, lines] @ x[..., lines, :])
    return torch.cat(parts, dim=dim)


def _normalize_(views: torch.Tensor) -> torch.Tensor:
    """Pixel values in ``[0, 255]`` normalised with the ImageNet mean and std of ``[0, 1]`` values."""
    mean = torch.tensor(IMAGENET_MEAN, device=views.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=views.device).view(1, 3, 1, 1) * 255
    return views.sub_(mean).div_(std)


def _grey_mean(pixels: torch.Tensor) -> float:
    """The grey mean (0-255) of contiguous ``[H, W, 3]`` pixels, from every 16th pixel in raster order."""
    return float(pixels.view(-1, 3)[::_MEAN_SUBSAMPLE].float().mean(0) @ torch.tensor(GREY_WEIGHTS))


def _pixels(image: Image.Image) -> torch.Tensor:
    """``[H, W, 3]`` uint8 pixels of an RGB image."""
    with warnings.catch_warnings():  # the array is read-only (PIL's bytes); nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image))


def _unflipped_box(width: int, flipped: bool, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The crop ``(left, top, w, h)`` drawn in the flipped image, in the image as decoded."""
    left, top, w, h = box
    return (width - left - w if flipped else left), top, w, h


class FastTwoView:
    """The CPU fast path of ``transform`` (see the module docstring): ``view(image, rng)`` decodes an opened
    (not yet decoded) PIL image and returns its two views, jittered and flipped, as 8-bit ``[3, S, S]``
    tensors; ``finish(views)`` makes a batch of them ``TwoViewTransform``'s outputs
    ``([B, 3, S, S] normalised, [B, 3, s, s] in [0, 1])``. Raises ``DecodeError`` for a bad image."""

    def __init__(self, transform: TwoViewTransform, reducing_gap: float = 2.0):
        if reducing_gap < 1:
            raise ValueError(f"FastTwoView: reducing_gap must be >= 1, got {reducing_gap}")
        self.transform, self.reducing_gap = transform, float(reducing_gap)

    def _draft(self, image: Image.Image, crop_side: int) -> None:
        for reduction in _DRAFT_REDUCTIONS:
            if crop_side >= reduction * self.reducing_gap * self.transform.model_size:
                image.draft("RGB", (math.ceil(image.width / reduction), math.ceil(image.height / reduction)))
                return

    def view(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = image.size
        jitter, flipped, box = self.transform.draw(width, height, rng)
        left, top, w, h = _unflipped_box(width, flipped, box)
        self._draft(image, min(w, h))
        try:
            image = decode_rgb(image)
        except Exception as error:  # PIL raises many types for corrupt files
            raise DecodeError(f"cannot decode the image: {error}") from error
        sx, sy = image.width / width, image.height / height
        # A drafted image is smaller: the box, scaled, is rounded to its pixels.
        left, top, right, bottom = (round(left * sx), round(top * sy), round((left + w) * sx), round((top + h) * sy))
        size = self.transform.model_size
        # Jitter whichever has fewer pixels: the view, or (the official order) the whole image.
        if image.width * image.height <= size * size:
            image, jitter = apply_color_jitter(image, jitter), []
        pixels = _pixels(image)
        grey_mean = _grey_mean(pixels) if jitter else None
        # torch's antialiased bicubic on 8-bit channels-last pixels computes PIL's filter, vectorised; a
        # channels-last crop gives a channels-last view, which PIL takes without a copy.
        crop = pixels[top:bottom, left:right].permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
        model_view = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
        model_view = apply_color_jitter(Image.fromarray(model_view[0].permute(1, 2, 0).numpy()), jitter, grey_mean)
        views = [model_view]
        if not self._tokenizer_view_from_model_view:  # else made by ``finish``, for the whole batch
            size = self.transform.tokenizer_size
            views.append(apply_color_jitter(image.resize((size, size), Image.Resampling.LANCZOS,
                                                         box=(left, top, right, bottom)), jitter, grey_mean))
        if flipped:
            views = [view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for view in views]
        # Planar [3, S, S] (a per-channel copy in PIL): the batch then converts to float contiguously.
        return tuple(torch.from_numpy(np.stack([np.asarray(band) for band in view.split()])) for view in views)

    @property
    def _tokenizer_view_from_model_view(self) -> bool:
        # At half the model view's size or less, reducing the model view adds little blur (BEiT: 224 -> 112).
        return 2 * self.transform.tokenizer_size <= self.transform.model_size

    def finish(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        model_views, *tokenizer_views = (torch.stack(views) for views in zip(*samples))
        model_views = _normalized(model_views)
        if tokenizer_views:
            return model_views, tokenizer_views[0].float().div_(255)
        # The Lanczos reduction of the batch (PIL's filter, no 8-bit rounding) commutes with the
        # normalisation (each row of weights sums to 1): reduce the normalised views, then undo it.
        size, model_size = self.transform.tokenizer_size, self.transform.model_size
        weights = resampling_matrix(model_size, 0, model_size, size, "lanczos").float()
        # Vertical first: its blocks are contiguous slices, and the horizontal pass then has half the rows.
        reduced = _banded_product(weights, _banded_product(weights, model_views, -2), -1)
        mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
        return model_views, reduced.mul_(std).add_(mean).clamp_(0, 1)


class FastPretrainSample:
    """``PretrainSample`` through ``FastTwoView``: same batches up to the documented approximations."""

    decodes = True

    def __init__(self, transform: TwoViewTransform, masking: dict, reducing_gap: float = 2.0):
        self.fast, self.masking = FastTwoView(transform, reducing_gap), masking

    def __call__(self, image, label, rng, key):
        return self.fast.view(image, rng)

    def collate(self, samples, seed: int, step: int, positions: range) -> tuple[torch.Tensor, ...]:
        return (*self.fast.finish(samples), batch_masks(self.masking, seed, step, positions))


# -- tensor path (GPU) -----------------------------------------------------------------------------


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    a = -0.5  # PIL's (and Keys') cubic
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 3, torch.sinc(x) * torch.sinc(x / 3), torch.zeros_like(x))


_FILTERS = {"bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


def _filter_extent(start: float, end: float, out_size: int, kind: str) -> tuple[float, float, float]:
    """``(scale, filter scale, support)`` of resampling ``[start, end)`` to ``out_size`` pixels."""
    scale = (end - start) / out_size
    filter_scale = max(scale, 1.0)
    return scale, filter_scale, _FILTERS[kind][1] * filter_scale


def reached_lines(in_size: int, start: float, end: float, out_size: int, kind: str) -> range:
    """The input lines ``resampling_matrix`` gives weight to (computed on the host, no tensors)."""
    scale, _, support = _filter_extent(start, end, out_size, kind)
    first = max(math.floor(start + 0.5 * scale - support + 0.5), 0)
    last = min(math.floor(start + (out_size - 0.5) * scale + support + 0.5), in_size)
    return range(first, last)


def _on(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, copied without making the host wait for the GPU (a copy from
    pageable memory would wait for the stream: the step the input work is meant to overlap)."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def resampling_weights(in_sizes: Sequence[int], starts: Sequence[float], ends: Sequence[float], out_size: int,
                       kind: str, first_lines: Sequence[int], count: int, device: torch.device | str | None = None
                       ) -> torch.Tensor:
    """``[B, out_size, count]`` float64 weights: for each ``b``, resampling the span ``[starts[b],
    ends[b])`` of a line of ``in_sizes[b]`` pixels to ``out_size`` pixels as PIL's ``resize(box=...)``
    does (its filters, widened by the reduction factor when shrinking, so antialiased; each row
    normalised), for the input lines ``first_lines[b]`` to ``first_lines[b] + count - 1`` (lines past
    the image get no weight). The parameters come from the host in one copy, without synchronisation."""
    kernel, support = _FILTERS[kind]
    device = torch.device("cpu") if device is None else torch.device(device)
    parameters = _on(torch.tensor([in_sizes, starts, ends, first_lines], dtype=torch.float64), device)
    in_size, start, end, first_line = parameters[..., None, None]  # each [B, 1, 1]
    scale = (end - start) / out_size
    filter_scale = scale.clamp(min=1.0)
    centre = start + (torch.arange(out_size, dtype=torch.float64, device=device)[:, None] + 0.5) * scale
    first = (centre - support * filter_scale + 0.5).floor().clamp_min(0)
    last = torch.minimum((centre + support * filter_scale + 0.5).floor(), in_size)  # exclusive
    x = first_line + torch.arange(count, dtype=torch.float64, device=device)  # [B, 1, count]
    weights = kernel((x - centre + 0.5) / filter_scale) * ((x >= first) & (x < last))
    return weights / weights.sum(dim=-1, keepdim=True)


def resampling_matrix(in_size: int, start: float, end: float, out_size: int, kind: str,
                      device: torch.device | str | None = None, lines: range | None = None) -> torch.Tensor:
    """``resampling_weights`` of one line: ``[out_size, len(lines)]`` for the input ``lines``
    (default: all; ``reached_lines`` has every line with a weight)."""
    lines = range(in_size) if lines is None else lines
    return resampling_weights([in_size], [start], [end], out_size, kind, [lines.start], len(lines), device)[0]


def resample_crops(crops: torch.Tensor, sizes: Sequence[tuple[int, int]], boxes: Sequence[tuple[int, int, int, int]],
                   first_lines: Sequence[tuple[int, int]], flips: Sequence[bool], size: int, kind: str
                   ) -> torch.Tensor:
    """A batch of crops resized to ``[B, C, size, size]`` as PIL's ``resize(box=...)`` does: a
    horizontal then a vertical pass of ``resampling_weights`` (two batched matrix products), each
    rounded and clipped to 8 bits as PIL does. ``crops`` ``[B, C, Lr, Lc]`` (float, 0-255) holds, for
    each image of size ``sizes[b]`` = ``(H, W)``, its lines from ``first_lines[b]`` = ``(row, column)``
    on (zeros past them: they get no weight), ``boxes[b]`` = ``(left, top, w, h)`` in the image;
    ``flips[b]`` mirrors the columns."""
    heights, widths = zip(*sizes)
    lefts, tops, ws, hs = zip(*boxes)
    first_rows, first_cols = zip(*first_lines)
    device, dtype = crops.device, crops.dtype
    rows = resampling_weights(heights, tops, [t + h for t, h in zip(tops, hs)], size, kind, first_rows,
                              crops.shape[2], device).to(dtype)
    cols = resampling_weights(widths, lefts, [x + w for x, w in zip(lefts, ws)], size, kind, first_cols,
                              crops.shape[3], device).to(dtype)
    if any(flips):
        cols = torch.where(_on(torch.tensor(flips), device)[:, None, None], cols.flip(1), cols)
    horizontal = (crops @ cols.transpose(1, 2)[:, None]).round_().clamp_(0, 255)
    return (rows[:, None] @ horizontal).round_().clamp_(0, 255)


def resample(image: torch.Tensor, box: tuple[int, int, int, int], size: int, kind: str, flip: bool = False,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The crop ``box`` = ``(left, top, w, h)`` of an image ``[C, H, W]`` (0-255, any dtype, any device)
    resized to ``[C, size, size]`` by ``resample_crops``; ``flip`` mirrors the columns. Float ``dtype``
    values."""
    left, top, w, h = box
    rows = reached_lines(image.shape[1], top, top + h, size, kind)
    cols = reached_lines(image.shape[2], left, left + w, size, kind)
    crop = image[None, :, rows.start:rows.stop, cols.start:cols.stop].to(dtype)
    first_lines = [(rows.start, cols.start)]
    return resample_crops(crop, [tuple(image.shape[1:])], [box], first_lines, [flip], size, kind)[0]


class DeviceTwoView:
    """``TwoViewTransform`` as batched tensor code on ``device``: ``views(encoded, rngs)`` takes encoded
    images (JPEG bytes, decoded by ``torchvision.io.decode_jpeg`` on the device, nvJPEG on a GPU) and one
    ``random.Random`` per image, and returns ``([B, 3, S, S] normalised, [B, 3, s, s] in [0, 1])`` on
    ``device``, drawing exactly what ``TwoViewTransform`` draws. ``views_of(images, draws)`` does the
    same with the draws made already (``TwoViewTransform.draw``) and images that are JPEG bytes or
    decoded uint8 ``[3, H, W]`` tensors; ``decode`` and ``augment`` are its two halves.

    Resampling is two batched matrix products per view for the whole batch (``resample_crops``: PIL's
    filters and 8-bit passes); the flip is the model view's column order; the jitter is
    ``apply_jitter``, the contrast mean the exact grey mean of the decoded image.
    """

    def __init__(self, transform: TwoViewTransform, device: torch.device | str = "cpu"):
        self.transform, self.device = transform, torch.device(device)
        # float32 products: 8-bit pixels and the weights are exact enough; TF32 would not be.
        self.dtype = torch.float32

    def decode(self, images: Sequence[bytes | torch.Tensor]) -> list[torch.Tensor | None]:
        """Each image as uint8 ``[3, H, W]`` on the device: the JPEG bytes in one batched
        ``decode_jpeg`` call, decoded tensors moved. When the batched call fails, each JPEG is decoded
        alone; one the decoder refuses then is None."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def jpeg(data: torch.Tensor | list[torch.Tensor]):
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

        out: list[torch.Tensor | None] = [_on(image, self.device) if isinstance(image, torch.Tensor) else None
                                          for image in images]
        encoded = [k for k, image in enumerate(images) if not isinstance(image, torch.Tensor)]
        data = [torch.frombuffer(bytearray(images[k]), dtype=torch.uint8) for k in encoded]
        try:
            decoded = jpeg(data) if data else []
        except RuntimeError:  # one bad file fails the whole call: find it
            decoded = []
            for blob in data:
                try:
                    decoded.append(jpeg(blob))
                except RuntimeError:
                    decoded.append(None)
        for k, image in zip(encoded, decoded):
            out[k] = image
        return out

    def _lines(self, size: int, start: int, length: int) -> range:
        """The input lines either view's filter reaches."""
        model = reached_lines(size, start, start + length, self.transform.model_size, "bicubic")
        tokenizer = reached_lines(size, start, start + length, self.transform.tokenizer_size, "lanczos")
        return range(min(model.start, tokenizer.start), max(model.stop, tokenizer.stop))

    def augment(self, images: Sequence[torch.Tensor], draws) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of decoded uint8 ``[3, H, W]`` images on the device, with ``draws`` (one
        ``TwoViewTransform.draw`` per image). The crops are gathered into one padded batch, so the work
        is a fixed number of batched operations plus a copy and a grey mean per image."""
        sizes = [tuple(image.shape[1:]) for image in images]
        boxes = [_unflipped_box(width, flipped, box) for (_, width), (_, flipped, box) in zip(sizes, draws)]
        rows = [self._lines(height, top, h) for (height, _), (_, top, _, h) in zip(sizes, boxes)]
        cols = [self._lines(width, left, w) for (_, width), (left, _, w, _) in zip(sizes, boxes)]
        crops = torch.zeros(len(images), 3, max(map(len, rows)), max(map(len, cols)), dtype=torch.uint8,
                            device=self.device)
        sums = []  # of each channel, exact in int64
        for crop, image, r, c in zip(crops, images, rows, cols):
            crop[:, :len(r), :len(c)] = image[:, r.start:r.stop, c.start:c.stop]
            sums.append(image.sum(dim=(1, 2)))
        areas = torch.tensor([[height * width] for height, width in sizes], dtype=torch.float64)
        areas = _on(areas, self.device)
        grey = _on(torch.tensor(GREY_WEIGHTS, dtype=torch.float64), self.device)
        grey_means = ((torch.stack(sums) / areas) @ grey).to(self.dtype)
        crops = crops.to(self.dtype)
        first_lines = [(r.start, c.start) for r, c in zip(rows, cols)]
        flips = [flipped for _, flipped, _ in draws]
        geometry = (sizes, boxes, first_lines, flips)
        with _float32_products():
            model = resample_crops(crops, *geometry, self.transform.model_size, "bicubic")
            tokenizer = resample_crops(crops, *geometry, self.transform.tokenizer_size, "lanczos")
        stages = jitter_stages([jitter for jitter, _, _ in draws])
        model = apply_jitter(model, stages, grey_means)
        tokenizer = apply_jitter(tokenizer, stages, grey_means)
        return _normalize_(model), tokenizer.div_(255)

    def views_of(self, images: Sequence[bytes | torch.Tensor], draws) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) != len(draws):
            raise ValueError(f"DeviceTwoView.views_of: {len(images)} images but {len(draws)} draws")
        decoded = self.decode(images)
        refused = [k for k, image in enumerate(decoded) if image is None]
        if refused:
            raise DecodeError(f"DeviceTwoView: decode_jpeg refuses the image(s) at {refused} of the batch")
        return self.augment(decoded, draws)

    def views(self, encoded: Sequence[bytes], rngs: Sequence[random.Random]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(encoded) != len(rngs):
            raise ValueError(f"DeviceTwoView.views: {len(encoded)} images but {len(rngs)} random generators")
        sizes = [Image.open(io.BytesIO(blob)).size for blob in encoded]  # headers only
        return self.views_of(encoded, [self.transform.draw(width, height, rng)
                                       for (width, height), rng in zip(sizes, rngs)])


@contextlib.contextmanager
def _float32_products():
    """Full float32 matrix products whatever precision the user set for the model: with TF32 (10
    mantissa bits) the resampling sums would move 8-bit pixel values by a level."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# -- the device input path of training -------------------------------------------------------------


def decode_jpeg_available() -> bool:
    """Whether ``torchvision.io.decode_jpeg`` can be imported (the device path's decoder)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


INPUT_PATHS = ("auto", "cpu", "device")


def resolve_input_path(input_path: str, device: torch.device | str) -> str:
    """The pre-training input path for a run on ``device``: ``"cpu"`` (``FastPretrainSample`` in the
    DataLoader workers) or ``"device"`` (``DevicePretrainSample``: ``DeviceTwoView`` on the training
    device). ``"auto"`` is ``"device"`` on a CUDA device when ``decode_jpeg`` can be imported (nvJPEG),
    else ``"cpu"``."""
    check_choice("resolve_input_path", "input_path", input_path, INPUT_PATHS)
    if input_path == "auto":
        return "device" if torch.device(device).type == "cuda" and decode_jpeg_available() else "cpu"
    if input_path == "device" and not decode_jpeg_available():
        raise ValueError("input_path 'device' needs torchvision.io.decode_jpeg, which cannot be imported "
                         "here: install torchvision, or use input_path 'cpu'")
    return input_path


@dataclasses.dataclass
class EncodedBatch:
    """A batch of the device path as it leaves the DataLoader: per sample, ``images`` holds the JPEG
    bytes or, for other images, the decoded uint8 ``[3, H, W]`` pixels, and ``draws`` its
    ``TwoViewTransform.draw``; the batch's ``masks``; its ``step`` and ``positions`` in the global
    batch (to replace an image the device cannot decode)."""

    images: list[bytes | torch.Tensor]
    draws: list[tuple]
    masks: torch.Tensor
    step: int
    positions: range

    def pin_memory(self) -> "EncodedBatch":  # called by a DataLoader with pin_memory=True
        images = [image.pin_memory() if isinstance(image, torch.Tensor) else image for image in self.images]
        return dataclasses.replace(self, images=images, masks=self.masks.pin_memory())


class DevicePretrainSample:
    """The device input path of pre-training (``pretrain_stream(on_device=True)``). In the DataLoader
    workers, per sample: the stored image (``source.read``), its header's size, ``TwoViewTransform``'s
    draws with the sample's generator, and the pixels decoded by PIL for an image that is not a JPEG
    (PNG files, in-memory images); the batch adds its masks (``batch_masks``): an ``EncodedBatch``.
    In the training process, ``prepare`` (``BatchStream.prepare``) makes the views on the training
    device with ``DeviceTwoView``.

    A JPEG the device decoder refuses, even alone, is decoded by PIL on the host with the same draws;
    if PIL fails too, the image is rejected (``source.reject``: skipped, counted and named in a
    warning, as the CPU path does) and replaced by the next decodable image of the permutation
    (``BatchStream.sample``), so the batch keeps its size and stays a function of the step.
    ``jpeg_on_device=False`` decodes every image in the workers (that fallback's sample maker)."""

    encoded = True

    def __init__(self, transform: TwoViewTransform, masking: dict, jpeg_on_device: bool = True):
        self.transform, self.masking, self.jpeg_on_device = transform, masking, jpeg_on_device
        self._views: DeviceTwoView | None = None

    def __call__(self, stored, label, rng, key) -> tuple[bytes | torch.Tensor, tuple]:
        try:
            # Of an encoded file, only the header is read here.
            image = stored if isinstance(stored, Image.Image) else Image.open(io.BytesIO(stored))
            jpeg = self.jpeg_on_device and not isinstance(stored, Image.Image) and image.format == "JPEG"
            draws = self.transform.draw(image.width, image.height, rng)
            if jpeg:
                return stored, draws
            pixels = np.array(decode_rgb(image))  # a copy: writable, its own memory
        except Exception as error:  # PIL raises many types for corrupt files
            raise DecodeError(f"cannot decode the image: {error}") from error
        return torch.from_numpy(pixels).permute(2, 0, 1), draws

    def collate(self, samples, seed: int, step: int, positions: range) -> EncodedBatch:
        images, draws = (list(parts) for parts in zip(*samples))
        return EncodedBatch(images, draws, batch_masks(self.masking, seed, step, positions), step, positions)

    def prepare(self, batch: EncodedBatch, device: torch.device, stream) -> tuple[torch.Tensor, ...]:
        device = torch.device(device)
        if self._views is None or self._views.device != device:
            self._views = DeviceTwoView(self.transform, device)
        images, draws = self._views.decode(batch.images), list(batch.draws)
        for k, image in enumerate(images):
            if image is None:
                host = DevicePretrainSample(self.transform, self.masking, jpeg_on_device=False)
                pixels, draws[k] = stream.sample(batch.step, batch.positions[k], host)
                images[k] = _on(pixels, device)
        return (*self._views.augment(images, draws), _on(batch.masks, device))

    def __getstate__(self):  # DataLoader workers need no device state
        return {**self.__dict__, "_views": None}
