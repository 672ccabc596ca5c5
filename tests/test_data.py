"""Data: the two-view augmentation, image folders (bad files skipped), the embedded photographs and the
step-addressed batch streams."""

import random
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from beitfast.data import (IMAGENET_MEAN, IMAGENET_STD, ClassifyTransform, EvalTransform, ImageFolder, ImageList,
                           TwoViewTransform, classify_stream, derive_seed, embedded_photos, eval_batches,
                           masking_for, pretrain_stream, random_resized_crop_box, tokenizer_views)


def random_photo(seed: int, size=(53, 41)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_folder(root, good: int, bad: int):
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(good):
        folder = root / ("cats/deep" if i % 2 else "dogs")
        random_photo(i).save(folder / f"img{i}.{'png' if i % 3 else 'JPG'}")
    for i in range(bad):
        (root / "cats" / f"broken{i}.jpg").write_bytes(b"not an image at all" * (i + 1))
    (root / "dogs" / "notes.txt").write_text("ignored: not an image extension")


def test_two_view_shapes_and_ranges():
    transform = TwoViewTransform(model_size=40, tokenizer_size=20)
    model_view, tokenizer_view = transform(random_photo(0), random.Random(1))
    assert model_view.shape == (3, 40, 40) and model_view.dtype == torch.float32
    assert tokenizer_view.shape == (3, 20, 20)
    assert tokenizer_view.min() >= 0 and tokenizer_view.max() <= 1
    # The model view is normalised: undoing it gives values in [0, 1].
    pixels = model_view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert pixels.min() > -0.05 and pixels.max() < 1.05  # bicubic overshoot only


def test_two_views_show_the_same_region():
    """One crop feeds both views: without jitter, the downsampled model view matches the tokenizer view."""
    gradient = np.linspace(0, 255, 96, dtype=np.float64)
    image = Image.fromarray(np.stack([np.tile(gradient, (64, 1)), np.tile(gradient[::-1], (64, 1)),
                                      np.full((64, 96), 128.0)], -1).astype(np.uint8))
    transform = TwoViewTransform(model_size=32, tokenizer_size=16, jitter=0.0)
    for seed in range(5):
        model_view, tokenizer_view = transform(image, random.Random(seed))
        pixels = model_view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        pooled = torch.nn.functional.avg_pool2d(pixels[None], 2)[0]
        assert (pooled - tokenizer_view).abs().mean() < 0.02


def test_same_rng_same_views_and_randomness_matters():
    transform = TwoViewTransform(model_size=24, tokenizer_size=12)
    a = transform(random_photo(3), random.Random(7))
    b = transform(random_photo(3), random.Random(7))
    c = transform(random_photo(3), random.Random(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("width,height", [(53, 41), (400, 20), (20, 400), (1, 1)])
def test_crop_box_inside_image(width, height):
    rng = random.Random(0)
    for _ in range(50):
        left, top, w, h = random_resized_crop_box(width, height, rng)
        assert 0 <= left and 0 <= top and w >= 1 and h >= 1
        assert left + w <= width and top + h <= height


def test_transform_bad_arguments():
    with pytest.raises(ValueError, match="model_size=0"):
        TwoViewTransform(model_size=0)
    with pytest.raises(ValueError, match="scale"):
        TwoViewTransform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_pct"):
        EvalTransform(32, crop_pct=1.5)


def test_classify_and_eval_transforms():
    assert ClassifyTransform(28)(random_photo(1), random.Random(0)).shape == (3, 28, 28)
    assert EvalTransform(28)(random_photo(1)).shape == (3, 28, 28)
    assert EvalTransform(28, crop_pct=1.0)(random_photo(1, (28, 28))).shape == (3, 28, 28)


def test_folder_recursive_skips_bad_files(tmp_path):
    write_folder(tmp_path, good=5, bad=2)
    folder = ImageFolder(tmp_path)
    assert len(folder) == 7  # .txt ignored, upper-case extension found, sub-sub-folder found
    stream = pretrain_stream(folder, TwoViewTransform(16, 8), masking_for((2, 2)), batch_size=6)
    with pytest.warns(UserWarning, match="skipping"):
        for step in range(3):
            views, tokenizer_views, masks = stream.batch(step)
            assert views.shape == (6, 3, 16, 16) and tokenizer_views.shape == (6, 3, 8, 8)
            assert masks.shape == (6, 4) and masks.dtype == torch.bool
            assert torch.isfinite(views).all()
    assert folder.skipped == 2


def test_folder_labels(tmp_path):
    write_folder(tmp_path, good=6, bad=0)
    folder = ImageFolder(tmp_path, labelled=True)
    assert folder.classes == ["cats", "dogs"]
    assert sorted(set(folder.labels)) == [0, 1]
    images, labels = classify_stream(folder, ClassifyTransform(12), 4).batch(0)
    assert images.shape == (4, 3, 12, 12) and labels.dtype == torch.long
    seen = sum(len(y) for _, y in eval_batches(folder, EvalTransform(12), batch_size=4))
    assert seen == 6


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    (bad_only / "a.png").write_bytes(b"garbage")
    stream = pretrain_stream(ImageFolder(bad_only), TwoViewTransform(8, 8), masking_for((1, 1)), batch_size=1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 images"):
        stream.batch(0)


def test_embedded_photos_stream():
    photos = embedded_photos(max_side=96)
    assert len(photos) >= 12
    assert all(im.mode == "RGB" and max(im.size) <= 96 for im in photos.images)
    stream = pretrain_stream(photos, TwoViewTransform(32, 16), masking_for((4, 4)), batch_size=5, seed=3)
    batches = iter(stream)
    first, second = next(batches), next(batches)
    assert first[0].shape == (5, 3, 32, 32) and first[1].shape == (5, 3, 16, 16) and first[2].shape == (5, 16)
    assert not torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first, stream.batch(0)))  # a batch is a function of its step


def test_stream_ranks_split_the_global_batch():
    photos = ImageList([np.asarray(random_photo(i)) for i in range(5)], labels=[0, 1, 2, 0, 1])
    whole = pretrain_stream(photos, TwoViewTransform(16, 8), masking_for((4, 4)), batch_size=6, seed=1)
    parts = [pretrain_stream(photos, TwoViewTransform(16, 8), masking_for((4, 4)), batch_size=6, seed=1,
                             rank=r, world_size=2) for r in range(2)]
    for step in (0, 4):
        joined = [torch.cat(pair) for pair in zip(parts[0].batch(step), parts[1].batch(step))]
        assert all(torch.equal(a, b) for a, b in zip(joined, whole.batch(step)))
    with pytest.raises(ValueError, match="multiple of the world size"):
        pretrain_stream(photos, TwoViewTransform(16, 8), masking_for((4, 4)), batch_size=5, world_size=2)


def test_stream_limit_and_tokenizer_views_are_prefixes_of_whole_batches():
    photos = ImageList([random_photo(i) for i in range(5)])
    stream = pretrain_stream(photos, TwoViewTransform(16, 8), masking_for((2, 2)), batch_size=6, seed=4)
    whole, first = stream.batch(3), stream.batch(3, limit=4)
    assert first[0].shape[0] == 4 and all(torch.equal(a, b[:4]) for a, b in zip(first, whole))
    views = list(tokenizer_views(photos, count=7, size=8, seed=4, batch_size=3))
    assert [v.shape for v in views] == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    more = list(tokenizer_views(photos, count=9, size=8, seed=4, batch_size=3))
    assert torch.equal(torch.cat(views), torch.cat(more)[:7])


def test_stream_workers_keep_the_order():
    photos = ImageList([random_photo(i) for i in range(3)])
    stream = pretrain_stream(photos, TwoViewTransform(16, 8), masking_for((2, 2)), batch_size=2, start_step=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = [b for _, b in zip(range(4), loader)]
    for i, batch in enumerate(got):
        assert all(torch.equal(a, b) for a, b in zip(batch, stream.batch(2 + i)))


def test_epochs_visit_every_image():
    photos = ImageList([random_photo(i, (8, 8)) for i in range(7)], labels=list(range(7)))
    stream = classify_stream(photos, ClassifyTransform(8, scale=(1, 1)), batch_size=7)
    for step in range(3):
        assert sorted(stream.batch(step)[1].tolist()) == list(range(7))


def test_masking_for_grids():
    assert masking_for((14, 14)) == {"input_size": (14, 14), "num_masking_patches": 75, "min_num_patches": 16}
    small = masking_for((8, 8))
    assert small["num_masking_patches"] == 26 and 1 <= small["min_num_patches"] <= 26
    with pytest.raises(ValueError, match="mask_ratio"):
        masking_for((8, 8), mask_ratio=1.5)


def test_derive_seed_is_stable():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed("x") < 2**63


def test_image_list_errors():
    with pytest.raises(ValueError, match="empty"):
        ImageList([])
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        ImageList([random_photo(0), random_photo(1)], labels=[0])
    with pytest.raises(ValueError, match="no labels"):
        classify_stream(ImageList([random_photo(0)]), ClassifyTransform(8), 1)


# -- 16-bit images ---------------------------------------------------------------------------------

SIXTEEN_BIT = settings(derandomize=True, database=None, deadline=None, max_examples=20)


def sixteen_bit_image(mode: str, seed: int, size=(19, 13)) -> tuple[Image.Image, np.ndarray]:
    """A 16-bit grey image in PIL ``mode`` (values over the whole 0-65535 range) and its expected
    8-bit RGB pixels (value * 255 / 65535, rounded)."""
    wide = np.random.default_rng(seed).integers(0, 65536, (size[1], size[0]))
    wide[0, :3] = 0, 65535, 257 * 128
    dtype = {"I;16": np.uint16, "I;16B": ">u2", "I": np.int32}[mode]
    image = Image.fromarray(wide.astype(dtype))
    assert image.mode == mode
    expected = np.round(wide * 255 / 65535).astype(np.uint8)
    return image, np.repeat(expected[..., None], 3, axis=2)


def png_16bit_rgb(wide: np.ndarray) -> bytes:
    """A 16-bit colour PNG (PIL cannot write one)."""
    height, width, _ = wide.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in wide)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


@SIXTEEN_BIT
@given(mode=st.sampled_from(["I;16", "I;16B", "I"]), seed=st.integers(0, 2**32 - 1))
def test_16bit_grey_is_scaled_not_clipped_by_every_transform(mode, seed):
    image, expected = sixteen_bit_image(mode, seed)
    eight_bit = Image.fromarray(expected)
    for transform in (TwoViewTransform(16, 8), ClassifyTransform(12)):
        ours, theirs = transform(image, random.Random(seed)), transform(eight_bit, random.Random(seed))
        for view, expected_view in zip(ours, theirs):
            torch.testing.assert_close(view, expected_view, rtol=0, atol=0)
    torch.testing.assert_close(EvalTransform(12)(image), EvalTransform(12)(eight_bit), rtol=0, atol=0)


@SIXTEEN_BIT
@given(seed=st.integers(0, 2**32 - 1))
def test_16bit_png_files_decode_to_their_8bit_values(tmp_path_factory, seed):
    from beitfast.pipeline import DevicePretrainSample, FastTwoView

    root = tmp_path_factory.mktemp("png16")
    image, expected = sixteen_bit_image("I;16", seed)
    image.save(root / "grey.png")
    wide = np.random.default_rng(seed).integers(0, 65536, (7, 11, 3))
    (root / "colour.png").write_bytes(png_16bit_rgb(wide))
    folder = ImageFolder(root)
    assert Image.open(root / "grey.png").mode == "I;16"
    np.testing.assert_array_equal(np.asarray(folder.load(folder.paths.index(root / "grey.png"))), expected)
    colour = np.asarray(folder.load(folder.paths.index(root / "colour.png"))).astype(int)
    assert np.abs(colour - wide * 255 / 65535).max() <= 1  # PIL keeps the high byte of 16-bit colour
    # the fast input paths decode the same pixels
    transform = TwoViewTransform(16, 16, scale=(1, 1), ratio=(1, 1), jitter=0, flip=False)
    eight_bit = Image.fromarray(expected)
    fast = FastTwoView(transform)
    for ours, theirs in zip(fast.view(Image.open(root / "grey.png"), random.Random(0)),
                            fast.view(eight_bit, random.Random(0))):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    pixels, _ = DevicePretrainSample(transform, masking_for((2, 2)))(
        (root / "grey.png").read_bytes(), None, random.Random(0), 0)
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected)


# -- folder discovery ------------------------------------------------------------------------------

def linked_tree(root):
    """Class folders ``cats`` (its images in a folder elsewhere, linked) and ``dogs`` (a linked
    sub-folder, a link back to ``root``: a loop), a broken image link and a text file: 6 images."""
    elsewhere = root.parent / f"{root.name}-elsewhere"
    for folder in (root / "dogs" / "own", elsewhere / "cat-photos", elsewhere / "more-dogs"):
        folder.mkdir(parents=True)
    for i, folder in enumerate(["dogs/own", "dogs/own"]):
        random_photo(i).save(root / folder / f"{i}.png")
    for i in range(3):
        random_photo(10 + i).save(elsewhere / "cat-photos" / f"{i}.jpg")
    random_photo(20).save(elsewhere / "more-dogs" / "0.png")
    (root / "cats").symlink_to(elsewhere / "cat-photos", target_is_directory=True)
    (root / "dogs" / "more").symlink_to(elsewhere / "more-dogs", target_is_directory=True)
    (root / "dogs" / "own" / "up").symlink_to(root, target_is_directory=True)  # a loop
    (root / "dogs" / "gone.jpg").symlink_to(elsewhere / "missing.jpg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def test_folder_follows_linked_folders_and_counts_what_it_skips(tmp_path):
    folder = ImageFolder(linked_tree(tmp_path / "data"), labelled=True)
    names = [p.relative_to(folder.root).as_posix() for p in folder.paths]
    assert names == ["cats/0.jpg", "cats/1.jpg", "cats/2.jpg", "dogs/more/0.png", "dogs/own/0.png",
                     "dogs/own/1.png"]
    assert folder.classes == ["cats", "dogs"] and folder.labels == [0, 0, 0, 1, 1, 1]
    assert {reason: [p.name for p in paths] for reason, paths in folder.ignored.items() if paths} == {
        "suffix": ["notes.txt"], "unreadable": ["gone.jpg"], "loop": ["up"]}
    assert folder.found == (f"found 6 images under {str(folder.root)!r}; skipped 3: 1 without an image "
                            "suffix, 1 unreadable, 1 link to a folder already walked")
    assert all(folder.load(i) is not None for i in range(len(folder)))


def test_every_command_header_says_what_it_found_and_skipped(tmp_path, capsys):
    from beitfast.cli import main

    data = linked_tree(tmp_path / "data")
    header = f"data: found 6 images under {str(data)!r}; skipped 3: "
    tiny = ["--model", "tiny", "--depth", "1", "--batch-size", "2", "--device", "cpu", "--threads", "1",
            "--no-progress", "--img-size", "16", "--patch-size", "4"]
    tokenizer = ["--tokenizer-size", "16", "--tokenizer-patch-size", "4", "--vocab-size", "8",
                 "--tokenizer-images", "8", "--tokenizer-iters", "2"]
    commands = [
        ["tokenizer", "train", "--data", str(data), "--output", str(tmp_path / "tok.safetensors"),
         *tokenizer],
        ["data", "pack", str(data), str(tmp_path / "shards")],
        ["pretrain", "--data", str(data), "--steps", "1", "--output", str(tmp_path / "run"), *tiny,
         *tokenizer],
        ["finetune", "--pretrained", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(data),
         "--steps", "1", "--output", str(tmp_path / "tuned"), *tiny[4:-4]],
    ]
    for command in commands:
        assert main(command) == 0, command
        out = capsys.readouterr().out
        assert header in out, (command, out)
