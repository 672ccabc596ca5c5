"""The fast input paths (beitfast.pipeline) against today's PIL path (TwoViewTransform): per image with
the same random draws, and in distribution with independent ones (crop scale and aspect, flip rate,
jitter ranges, pixel statistics); broken variants must fail the same distribution checks."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from beitfast import _ext
from beitfast.data import (IMAGENET_MEAN, IMAGENET_STD, DecodeError, ImageFolder, ImageList, MaskingGenerator,
                           TwoViewTransform, apply_color_jitter, batch_masks, derive_seed, embedded_photos,
                           masking_for, pretrain_stream)
from beitfast.pipeline import DeviceTwoView, FastTwoView, apply_jitter, jitter_stages, resample, resampling_matrix

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def jpegs():
    """The embedded photographs as JPEG bytes (longer side 160: odd sizes, crops up- and downscaled)."""
    blobs = []
    for image in embedded_photos(max_side=160).images:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=92)
        blobs.append(buffer.getvalue())
    return blobs


def pil_views(transform, blob, seed):
    return transform(Image.open(io.BytesIO(blob)).convert("RGB"), random.Random(seed))


def fast_views(transform, blob, seed, fast=None):
    fast = fast or FastTwoView(transform)
    model, tokenizer = fast.finish([fast.view(Image.open(io.BytesIO(blob)), random.Random(seed))])
    return model[0], tokenizer[0]


def levels(model_view):
    """A normalised model view back to 0-255 pixel levels."""
    return (model_view * STD + MEAN) * 255


def check_against_pil_path(views, transform, jpegs, seeds):
    """Per-view mean errors in levels of 255 against the PIL path with the same draws: each below 8, the
    median over the photographs below 1.5. Measured here: 0.2-7.3 per view, medians 0.5-1.2; the most
    where strong jitter clips a high-contrast image (the astronaut at contrast 1.21, saturation 1.39,
    brightness 1.38: 4.9 levels from clipping after rather than before resampling alone). A wrong crop,
    flip or jitter factor moves views by tens of levels."""
    errors = []
    for i, (blob, seed, (model, tokenizer)) in enumerate(zip(jpegs, seeds, views)):
        reference = pil_views(transform, blob, seed)
        assert model.shape == reference[0].shape and tokenizer.shape == reference[1].shape
        errors.append(((levels(model) - levels(reference[0])).abs().mean(),
                       ((tokenizer - reference[1]).abs() * 255).mean()))
    errors = torch.tensor(errors)
    assert (errors < 8).all() and (errors.median(dim=0).values < 1.5).all(), errors


@pytest.mark.parametrize("sizes", [(224, 112), (48, 40), (33, 17)])
def test_fast_path_matches_the_pil_path_per_image(jpegs, sizes):
    """Same draws, so the same crop, flip and jitter: only the documented approximations differ."""
    transform = TwoViewTransform(*sizes)
    seeds = [derive_seed("per-image", i, *sizes) for i in range(len(jpegs))]
    check_against_pil_path([fast_views(transform, blob, seed) for blob, seed in zip(jpegs, seeds)], transform,
                           jpegs, seeds)


def test_device_path_matches_the_pil_path_per_image(jpegs, device):
    """On the GPU when there is one (nvJPEG, CUDA products), else on CPU."""
    transform = TwoViewTransform(40, 24)
    seeds = [derive_seed("device", i) for i in range(len(jpegs))]
    model, tokenizer = DeviceTwoView(transform, device).views(jpegs, [random.Random(s) for s in seeds])
    assert model.device.type == tokenizer.device.type == device.type
    assert model.shape == (len(jpegs), 3, 40, 40) and tokenizer.shape == (len(jpegs), 3, 24, 24)
    check_against_pil_path(list(zip(model.cpu(), tokenizer.cpu())), transform, jpegs, seeds)


@pytest.mark.gpu
def test_device_augment_does_not_synchronise(jpegs):
    """The views of decoded images are made without the host waiting for the GPU, so the trainer's input
    work for the next step overlaps the current one (copies from the host go through pinned memory)."""
    transform = TwoViewTransform()
    views = DeviceTwoView(transform, "cuda")
    sizes = [Image.open(io.BytesIO(blob)).size for blob in jpegs]
    draws = [transform.draw(width, height, random.Random(k)) for k, (width, height) in enumerate(sizes)]
    images = views.decode(jpegs)
    views.augment(images, draws)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model, tokenizer = views.augment(images, draws)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert model.is_cuda and torch.isfinite(model).all() and tokenizer.shape[-1] == transform.tokenizer_size


@pytest.mark.parametrize("kind,pil_filter", [("bicubic", Image.Resampling.BICUBIC),
                                             ("lanczos", Image.Resampling.LANCZOS)])
@pytest.mark.parametrize("box,size", [((3, 5, 47, 39), 19), ((0, 0, 61, 47), 61), ((7, 2, 13, 15), 45)])
def test_resample_is_pils_resize(kind, pil_filter, box, size):
    """Down, same size and up, on noise (the filters' negative lobes overshoot, PIL clips each pass)."""
    pixels = np.random.default_rng(3).integers(0, 256, (47, 61, 3), dtype=np.uint8)
    left, top, w, h = box
    expected = np.asarray(Image.fromarray(pixels).resize((size, size), pil_filter, box=(left, top, left + w, top + h)))
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    got = resample(image, box, size, kind, dtype=torch.float64).permute(1, 2, 0).numpy()
    assert np.abs(got - expected).max() <= 1  # rounding of float64 against PIL's fixed-point weights
    assert np.abs(got - expected).mean() < 0.05
    flipped = resample(image, box, size, kind, flip=True, dtype=torch.float64).permute(1, 2, 0).numpy()
    assert np.array_equal(flipped, got[:, ::-1])
    assert torch.allclose(resampling_matrix(47, top, top + h, size, kind).sum(1), torch.ones(size, dtype=torch.float64))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
def test_tensor_jitter_is_pils(order):
    """``apply_jitter`` (the device path's batched colour matrices) against PIL's ImageEnhance operations,
    for a batch whose samples have different orders and factors, values clipping included."""
    rng = np.random.default_rng(sum(order))
    images = [Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)) for _ in range(4)]
    factors = [(0.6, 1.4, 0.9), (1.38, 0.63, 1.2), (1.0, 1.0, 0.61), (0.75, 1.33, 1.39)]
    jitters = [[(op, f[op]) for op in (order if k % 2 == 0 else order[::-1])] for k, f in enumerate(factors)]
    grey_means = [float(np.dot(np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0), (0.299, 0.587, 0.114)))
                  for im in images]
    expected = torch.stack([torch.from_numpy(np.asarray(apply_color_jitter(im, j, m))).permute(2, 0, 1)
                            for im, j, m in zip(images, jitters, grey_means)]).float()
    views = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]).float().contiguous()
    got = apply_jitter(views, jitter_stages(jitters), torch.tensor(grey_means))
    # PIL blends with its grey rounded to 8 bits, and truncates each stage: off by at most a level a stage.
    assert (got - expected).abs().max() <= 2 and (got - expected).abs().mean() < 0.25


def test_contrast_uses_the_whole_image_mean():
    """A view of the dark half of an image keeps contrast around the whole image's mean, as the
    official jitter (on the whole image) does."""
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, 8:] = 200
    half = Image.fromarray(pixels[:, :8].copy())
    whole = apply_color_jitter(Image.fromarray(pixels), [(1, 0.5)])
    view = apply_color_jitter(half, [(1, 0.5)], grey_mean=100.0)
    assert np.array_equal(np.asarray(view), np.asarray(whole)[:, :8])
    assert not np.array_equal(np.asarray(apply_color_jitter(half, [(1, 0.5)])), np.asarray(view))


# -- distributions ---------------------------------------------------------------------------------

SAMPLES = 300


def coordinate_image(size=256):
    """Red = column, green = row: a view's corner pixels reveal its crop box and flip."""
    x = np.arange(size, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)),
                                     np.full((size, size), 128, np.uint8)], -1))


def crop_statistics(transform_for_fast, seeds):
    """(scale, log aspect, flipped) of each fast-path view of the coordinate image, read from its pixels."""
    image = coordinate_image()
    fast = FastTwoView(transform_for_fast)
    out = []
    for seed in seeds:
        model, _ = fast.finish([fast.view(image, random.Random(seed))])
        red, green = levels(model[0])[0], levels(model[0])[1]
        # Pixel centres of the first and last columns/rows: 1/S of the crop from each other edge.
        size = red.shape[-1]
        w = abs(float(red[:, -1].mean() - red[:, 0].mean())) * size / (size - 1)
        h = float(green[-1].mean() - green[0].mean()) * size / (size - 1)
        out.append((w * h / 256**2, math.log(w / h), bool(red[:, -1].mean() < red[:, 0].mean())))
    return np.array(out)


def reference_crops(count, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop parameters, an implementation independent of ours."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(1)
    image = torch.zeros(3, 256, 256)
    boxes = [RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(count)]
    return np.array([(h * w / 256**2, math.log(w / h)) for _, _, h, w in boxes])


@pytest.mark.parametrize("broken", [False, True])
def test_crop_scale_aspect_and_flip_distributions(broken):
    """Histograms of the crop area fraction and aspect read from the fast path's outputs match
    torchvision's RandomResizedCrop; flips happen half the time. A fast path fed a wrong scale range
    (or never flipping) must fail the same checks."""
    transform = TwoViewTransform(32, 16, jitter=0.0, scale=(0.3, 1.0) if broken else (0.08, 1.0), flip=not broken)
    got = crop_statistics(transform, [derive_seed("crops", i) for i in range(SAMPLES)])
    expected = reference_crops(2000)
    scale_p = stats.ks_2samp(got[:, 0], expected[:, 0]).pvalue
    aspect_p = stats.ks_2samp(got[:, 1], expected[:, 1]).pvalue
    flip_p = stats.binomtest(int(got[:, 2].sum()), SAMPLES, 0.5).pvalue
    passes = scale_p > 1e-3 and aspect_p > 1e-3 and flip_p > 1e-3
    assert passes != broken, (scale_p, aspect_p, flip_p)


def flat_colour_statistics(transform, path, seeds):
    """Brightness and colourfulness of views of a flat reddish image: the mean level of the views (the
    brightness factor), and (R - G) over the grey level (saturation x contrast factors)."""
    image = Image.fromarray(np.full((40, 50, 3), (150, 90, 80), np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    blob = buffer.getvalue()
    out = []
    for seed in seeds:
        model, _ = (pil_views if path == "pil" else fast_views)(transform, blob, seed)
        pixels = levels(model).mean(dim=(1, 2))
        grey = float(pixels @ torch.tensor([0.299, 0.587, 0.114]))
        out.append((grey, float(pixels[0] - pixels[1]) / max(grey, 1.0)))
    return np.array(out)


@pytest.mark.parametrize("broken", [False, True])
def test_jitter_ranges_match_the_pil_path(broken):
    """Independent draws: the fast path's brightness and colourfulness distributions equal the PIL path's,
    and the brightness factor spans [0.6, 1.4]. A fast path with jitter 0.2 must fail."""
    reference = flat_colour_statistics(TwoViewTransform(24, 12), "pil", [derive_seed("pil", i) for i in range(SAMPLES)])
    fast_transform = TwoViewTransform(24, 12, jitter=0.2 if broken else 0.4)
    got = flat_colour_statistics(fast_transform, "fast", [derive_seed("fast", i) for i in range(SAMPLES)])
    p_values = [stats.ks_2samp(got[:, k], reference[:, k]).pvalue for k in range(2)]
    base_grey = 150 * 0.299 + 90 * 0.587 + 80 * 0.114
    spans = got[:, 0].min() / base_grey < 0.65 and got[:, 0].max() / base_grey > 1.35
    assert (min(p_values) > 1e-3 and spans) != broken, (p_values, got[:, 0].min() / base_grey, got[:, 0].max() / base_grey)


def pixel_statistics(path, jpegs, seeds):
    """Per view: the mean and standard deviation of each channel's levels, model and tokenizer views,
    of the ``"pil"``, ``"fast"`` or ``"device"`` path (the last in one batch)."""
    transform = TwoViewTransform(32, 16)
    blobs = [jpegs[k % len(jpegs)] for k in range(len(seeds))]
    if path == "device":
        views = list(zip(*DeviceTwoView(transform).views(blobs, [random.Random(seed) for seed in seeds])))
    else:
        view = pil_views if path == "pil" else fast_views
        views = [view(transform, blob, seed) for blob, seed in zip(blobs, seeds)]
    rows = []
    for model, tokenizer in views:
        model, tokenizer = levels(model), tokenizer * 255
        rows.append([*model.mean(dim=(1, 2)), *model.std(dim=(1, 2)), *tokenizer.mean(dim=(1, 2))])
    return np.array(rows, dtype=np.float64)


@pytest.mark.parametrize("path", ["fast", "device"])
def test_pixel_statistics_match_the_pil_path(jpegs, path):
    """Over the photographs with independent draws, the distribution of every per-view statistic
    matches; with the same draws, each view's statistics agree closely."""
    count = 2 * SAMPLES
    reference = pixel_statistics("pil", jpegs, [derive_seed("stats-pil", i) for i in range(count)])
    got = pixel_statistics(path, jpegs, [derive_seed("stats-fast", i) for i in range(count)])
    for k in range(reference.shape[1]):
        assert stats.ks_2samp(got[:, k], reference[:, k]).pvalue > 1e-3, k
    same_draws = pixel_statistics(path, jpegs, [derive_seed("stats-pil", i) for i in range(count)])
    assert np.abs(same_draws - reference).mean() < 1.0


# -- streams, masks, bad input ---------------------------------------------------------------------


def test_batch_masks_depend_on_the_position_only():
    masking = masking_for((14, 14))
    whole = batch_masks(masking, 3, 7, range(0, 8))
    assert whole.shape == (8, 196) and whole.dtype == torch.bool
    assert (whole.sum(1) <= 75).all() and (whole.sum(1) >= 16).all()
    assert torch.equal(torch.cat([batch_masks(masking, 3, 7, range(0, 3)), batch_masks(masking, 3, 7, range(3, 8))]),
                       whole)
    assert not torch.equal(batch_masks(masking, 3, 8, range(0, 8)), whole)


@pytest.mark.skipif(_ext.missing("blockwise_masks.out", "cpu") is not None, reason="beitfast._C is not built")
def test_batch_masks_come_from_the_native_generator():
    masking = masking_for((14, 14))
    native = MaskingGenerator(**masking, seed=derive_seed("mask", 3, 7)).batch(8, backend="cpp")
    assert torch.equal(batch_masks(masking, 3, 7, range(2, 8)), native[2:])


def test_fast_stream_skips_truncated_jpegs(tmp_path, jpegs):
    for i, blob in enumerate(jpegs[:3]):
        (tmp_path / f"a{i}.jpg").write_bytes(blob)
    (tmp_path / "b_truncated.jpg").write_bytes(jpegs[3][:200])
    folder = ImageFolder(tmp_path)
    stream = pretrain_stream(folder, TwoViewTransform(32, 16), masking_for((4, 4)), batch_size=8)
    with pytest.warns(UserWarning, match="skipping .*b_truncated.jpg"):
        views, tokenizer_views, masks = stream.batch(0)
    assert folder.skipped == 1
    assert views.shape == (8, 3, 32, 32) and tokenizer_views.shape == (8, 3, 16, 16) and masks.shape == (8, 16)
    assert torch.isfinite(views).all() and tokenizer_views.min() >= 0 and tokenizer_views.max() <= 1


def test_fast_stream_is_a_function_of_the_step():
    photos = ImageList([np.random.default_rng(i).integers(0, 256, (30 + i, 41, 3), dtype=np.uint8) for i in range(5)])
    stream = pretrain_stream(photos, TwoViewTransform(16, 8), masking_for((2, 2)), batch_size=4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(stream.batch(3), stream.batch(3)))
    assert not torch.equal(stream.batch(3)[0], stream.batch(4)[0])


# -- the device input path of training (DevicePretrainSample) -------------------------------------


def jpeg_folder(folder, jpegs, count=5, png=True):
    """``count`` of the photographs as JPEG files and, with ``png``, one as a PNG file (decoded in the
    workers, not on the device)."""
    folder.mkdir(exist_ok=True)
    for i, blob in enumerate(jpegs[:count]):
        (folder / f"a{i}.jpg").write_bytes(blob)
    if png:
        Image.open(io.BytesIO(jpegs[count])).save(folder / "p.png")
    return ImageFolder(folder)


def expected_device_batch(folder, transform, masking, seed, step, batch_size):
    """Batch ``step`` computed without the stream: the images of the epoch's permutation, each with
    its own generator's draws, through ``DeviceTwoView.views_of`` (JPEG bytes; the PNG decoded)."""
    images, draws = [], []
    for j in range(batch_size):
        epoch, offset = divmod(step * batch_size + j, len(folder))
        order = list(range(len(folder)))
        random.Random(derive_seed(seed, "epoch", epoch)).shuffle(order)
        path = folder.paths[order[offset]]
        header = Image.open(path)
        draws.append(transform.draw(header.width, header.height, random.Random(derive_seed(seed, step, j))))
        images.append(path.read_bytes() if path.suffix == ".jpg"
                      else torch.from_numpy(np.array(header.convert("RGB"))).permute(2, 0, 1))
    masks = batch_masks(masking, seed, step, range(batch_size))
    return (*DeviceTwoView(transform).views_of(images, draws), masks)


def test_device_stream_makes_the_views_of_device_two_view(tmp_path, jpegs):
    """The worker part (bytes, draws, masks) and ``prepare`` (decode and views on the device) give
    exactly DeviceTwoView's views of the same images with the same draws."""
    from beitfast.pipeline import EncodedBatch

    folder = jpeg_folder(tmp_path, jpegs)
    transform, masking = TwoViewTransform(24, 12), masking_for((3, 3))
    stream = pretrain_stream(folder, transform, masking, batch_size=4, seed=5, on_device=True)
    batch = stream.batch(1)
    assert isinstance(batch, EncodedBatch) and (batch.step, batch.positions) == (1, range(4))
    assert {type(image) for image in batch.images} == {bytes, torch.Tensor}  # the PNG is decoded
    views = stream.prepare(batch, torch.device("cpu"))
    expected = expected_device_batch(folder, transform, masking, 5, 1, 4)
    assert views[0].shape == (4, 3, 24, 24) and views[1].shape == (4, 3, 12, 12)
    assert views[2].dtype == torch.bool
    assert all(torch.equal(a, b) for a, b in zip(views, expected))


def test_device_resampling_ignores_a_global_tf32_setting(jpegs, monkeypatch):
    """A user's ``set_float32_matmul_precision("high")`` (TF32 on a GPU) does not reach the resampling
    products, and is restored afterwards."""
    from beitfast import pipeline

    seen = []
    real = pipeline.resample_crops

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "resample_crops", spy)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        DeviceTwoView(TwoViewTransform(16, 8)).views(jpegs[:2], [random.Random(0), random.Random(1)])
        assert seen == ["highest", "highest"] and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_device_stream_falls_back_to_pil_for_a_jpeg_the_device_refuses(tmp_path, jpegs, monkeypatch):
    """A JPEG that decode_jpeg refuses (stood in for here) and PIL decodes keeps its place and draws."""
    import torchvision.io

    folder = jpeg_folder(tmp_path, jpegs, png=False)
    refused = (tmp_path / "a2.jpg").read_bytes()
    decode_jpeg = torchvision.io.decode_jpeg

    def picky(data, **kwargs):
        blobs = data if isinstance(data, list) else [data]
        if any(bytes(blob.numpy()) == refused for blob in blobs):
            raise RuntimeError("stand-in refusal")
        return decode_jpeg(data, **kwargs)

    transform, masking = TwoViewTransform(20, 10), masking_for((2, 2))
    stream = pretrain_stream(folder, transform, masking, batch_size=5, seed=1, on_device=True)
    expected = expected_device_batch(folder, transform, masking, 1, 0, 5)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    batch = stream.batch(0)
    assert refused in batch.images
    views = stream.prepare(batch, torch.device("cpu"))
    assert folder.skipped == 0
    # PIL's and libjpeg-turbo's IDCTs may differ by a level here and there; a wrong image or draw by tens.
    for got, want in zip(views[:2], expected[:2]):
        assert (got - want).abs().max() < 0.1 and (got - want).abs().mean() < 1e-3
    assert torch.equal(views[2], expected[2])


def test_device_stream_skips_and_counts_undecodable_jpegs(tmp_path, jpegs):
    """A truncated JPEG (its header whole: it reaches the device decoder, which refuses it, then PIL)
    and a garbage one (refused by its header, in the worker) are skipped, counted and replaced by the
    next decodable image of the permutation, as the CPU path does: the batch keeps its size and is the
    batch the stream makes once it knows them."""
    folder = jpeg_folder(tmp_path, jpegs, count=4)
    (tmp_path / "b_truncated.jpg").write_bytes(jpegs[4][:len(jpegs[4]) // 2])
    (tmp_path / "c_garbage.jpg").write_bytes(b"not a JPEG at all" * 20)
    folder = ImageFolder(tmp_path)
    transform, masking = TwoViewTransform(20, 10), masking_for((2, 2))
    stream = pretrain_stream(folder, transform, masking, batch_size=7, on_device=True)
    with pytest.warns(UserWarning, match="skipping .*c_garbage.jpg"):
        batch = stream.batch(0)
    assert folder.skipped == 1
    with pytest.warns(UserWarning, match="skipping .*b_truncated.jpg"):
        views = stream.prepare(batch, torch.device("cpu"))
    assert folder.skipped == 2
    assert views[0].shape == (7, 3, 20, 20) and views[1].shape == (7, 3, 10, 10) and views[2].shape == (7, 4)
    assert torch.isfinite(views[0]).all() and views[1].min() >= 0 and views[1].max() <= 1
    again = stream.prepare(stream.batch(0), torch.device("cpu"))  # both known bad now: replaced in the worker
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_input_path_resolution(monkeypatch):
    import beitfast.pipeline as pipeline
    from beitfast.pipeline import resolve_input_path

    assert resolve_input_path("auto", torch.device("cpu")) == "cpu"
    assert resolve_input_path("auto", torch.device("cuda", 1)) == "device"  # no GPU needed to decide
    assert resolve_input_path("device", "cpu") == "device" and resolve_input_path("cpu", "cuda") == "cpu"
    with pytest.raises(ValueError, match=r"input_path must be one of \['auto', 'cpu', 'device'\], got 'gpu'"):
        resolve_input_path("gpu", "cpu")
    monkeypatch.setattr(pipeline, "decode_jpeg_available", lambda: False)
    assert resolve_input_path("auto", "cuda") == "cpu"
    with pytest.raises(ValueError, match="input_path 'device' needs torchvision.io.decode_jpeg"):
        resolve_input_path("device", "cpu")


def test_bad_arguments(jpegs):
    with pytest.raises(ValueError, match="reducing_gap must be >= 1, got 0.5"):
        FastTwoView(TwoViewTransform(), reducing_gap=0.5)
    with pytest.raises(ValueError, match="2 images but 1 random generators"):
        DeviceTwoView(TwoViewTransform(16, 8)).views(jpegs[:2], [random.Random(0)])
    with pytest.raises(ValueError, match="2 images but 0 draws"):
        DeviceTwoView(TwoViewTransform(16, 8)).views_of(jpegs[:2], [])
    with pytest.raises(DecodeError, match=r"refuses the image\(s\) at \[1\]"):
        truncated = jpegs[1][:len(jpegs[1]) // 2]  # the header is whole
        DeviceTwoView(TwoViewTransform(16, 8)).views([jpegs[0], truncated], [random.Random(0)] * 2)
    with pytest.raises(DecodeError):
        truncated = Image.open(io.BytesIO(jpegs[0][:len(jpegs[0]) // 2]))  # the header is whole
        FastTwoView(TwoViewTransform(16, 8)).view(truncated, random.Random(0))


# -- tokenizers on the device ----------------------------------------------------------------------


def test_dalle_bfloat16_tokens_agree_with_float32():
    """The encoder's body in bfloat16 (channels-last; the default on CUDA, asked for here on CPU) against
    float32, on augmented views of the photographs. With random weights the logits are nearly flat, so
    near-ties flip: every disagreement must be a near-tie of the float32 logits, and the tokens whose
    float32 margin exceeds 2% of the logits' spread must agree at >= 99.5%."""
    from beitfast.data import tokenizer_views
    from beitfast.tokenizers import DalleTokenizer
    from beitfast.tokenizers.dvae import map_pixels

    tokenizer = DalleTokenizer(n_hid=32, n_blk_per_group=1, vocab_size=256, input_size=32)
    views = torch.cat(list(tokenizer_views(embedded_photos(96), 24, 32, seed=1)))
    tokenizer.precision = "fp32"
    exact = tokenizer.tokenize(views)
    assert torch.equal(exact, tokenizer.encoder(map_pixels(views)).argmax(1))
    tokenizer.precision = "bf16"
    reduced = tokenizer.tokenize(views)
    assert reduced.shape == exact.shape == (24, 4, 4) and reduced.dtype == torch.long
    logits = tokenizer.encoder(map_pixels(views)).detach()
    top = logits.topk(2, dim=1).values
    margin = (top[:, 0] - top[:, 1]) / logits.std()
    disagree = reduced != exact
    assert disagree.float().mean() < 0.1
    assert (margin[disagree] < 0.05).all()
    clear = margin >= 0.02
    assert (~disagree[clear]).float().mean() >= 0.995
    tokenizer.precision = "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        tokenizer.tokenize(views)


def test_kmeans_tokens_are_the_nearest_centroids_in_float64():
    """The k-means tokenizer's single GEMM + argmax against a float64 brute-force argmin of distances."""
    from beitfast.tokenizers import KMeansTokenizer
    from beitfast.tokenizers.kmeans import normalized_patches

    generator = torch.Generator().manual_seed(4)
    tokenizer = KMeansTokenizer(torch.randn(300, 3 * 4 * 4, generator=generator), patch_size=4, input_size=20)
    images = torch.rand(7, 3, 20, 20, generator=generator)
    tokens = tokenizer.tokenize(images)
    patches = images.double().reshape(7, 3, 5, 4, 5, 4).permute(0, 2, 4, 1, 3, 5).reshape(7 * 25, 48)
    patches = (patches - patches.mean(1, keepdim=True)) / (patches.var(1, unbiased=False, keepdim=True)
                                                            + tokenizer.contrast_floor ** 2).sqrt()
    assert torch.allclose(patches, normalized_patches(images, 4, tokenizer.contrast_floor).flatten(0, 1).double(),
                          atol=1e-5)
    distances = torch.cdist(patches, tokenizer.centroids.double())
    best = distances.min(dim=1).values
    chosen = distances.gather(1, tokens.flatten()[:, None]).squeeze(1)
    assert tokens.shape == (7, 5, 5)
    assert torch.allclose(chosen, best, rtol=0, atol=1e-4)  # equal, or a tie within float32 rounding
    assert (tokens.flatten() == distances.argmin(dim=1)).float().mean() > 0.99


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
def test_table_jitter_is_imageenhance_exactly(order):
    """apply_color_jitter (tables for brightness and contrast) gives ImageEnhance's pixels exactly."""
    from PIL import ImageEnhance

    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    rng = np.random.default_rng(len(order) * 10 + order[0] * 3 + order[1])
    for trial in range(3):
        image = Image.fromarray(rng.integers(0, 256, (11 + trial, 17, 3), dtype=np.uint8))
        jitter = [(op, float(rng.uniform(0.6, 1.4))) for op in order]
        expected = image
        for op, factor in jitter:
            expected = enhancers[op](expected).enhance(factor)
        assert np.array_equal(np.asarray(apply_color_jitter(image, jitter)), np.asarray(expected))


@pytest.mark.parametrize("start,end,out_size", [(3, 50, 19), (0, 61, 61), (7, 20, 45), (0.5, 60.25, 7)])
@pytest.mark.parametrize("kind", ["bicubic", "lanczos"])
def test_reached_lines_hold_every_weight(start, end, out_size, kind):
    from beitfast.pipeline import reached_lines

    full = resampling_matrix(61, start, end, out_size, kind)
    lines = reached_lines(61, start, end, out_size, kind)
    assert full[:, :lines.start].abs().sum() == 0 and full[:, lines.stop:].abs().sum() == 0
    restricted = resampling_matrix(61, start, end, out_size, kind, lines=lines)
    assert torch.allclose(restricted, full[:, lines.start:lines.stop], rtol=0, atol=1e-12)


def test_cli_data_pack_and_bench_data(tmp_path, capsys):
    import json

    from beitfast.cli import main
    from beitfast.shards import ShardedImages

    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((6, 9, 3), i * 40, np.uint8)).save(folder / f"{i}.png")
    assert main(["data", "pack", str(tmp_path / "images"), str(tmp_path / "shards"), "--images-per-shard", "2",
                 "--labelled"]) == 0
    assert len(ShardedImages(tmp_path / "shards")) == 3
    capsys.readouterr()
    assert main(["bench", "--data", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--data-workers", "1"]) == 0
    rows = {row["path"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {"pil", "fast-cpu", "tokenizer-kmeans", "tokenizer-dalle"} <= set(rows)
    for path in ("pil", "fast-cpu"):
        assert rows[path]["images_per_s"] > 0 and rows[path]["images_per_s_per_core"] > 0


def test_bench_data_times_the_device_path_as_training_runs_it():
    from beitfast.input_bench import bench_paths

    rows = {row["path"]: row for row in bench_paths(batch_size=2, batches=1, workers=2, model_size=32,
                                                   tokenizer_size=16, patch_size=8, max_side=64, device_path=True)}
    assert set(rows) == {"pil", "fast-cpu", "device-cpu"}
    assert rows["device-cpu"]["images_per_s"] > 0 and rows["device-cpu"]["images_per_s_per_core"] > 0
