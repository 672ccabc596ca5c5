"""The embedded segmentation task: scenes from the embedded photographs with exact masks, the same for the
same arguments, splits that copy from disjoint parts of the photographs, read by the training stream and
the evaluation like a folder of masks, and `beitfast segment ... --data embedded`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.cli import main
from beitfast.segmentation.data import (
    SegmentationTestTransform, SegmentationTrainTransform, evaluation_pairs, segmentation_stream,
)
from beitfast.segmentation.embedded import EMBEDDED_CLASSES, SPLITS, _texture, embedded_scenes
from beitfast.testing import save_tiny_backbone

pytest.importorskip("skimage")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def scenes():
    return embedded_scenes("training", count=24, size=48, seed=5)


def test_scenes_and_masks(scenes):
    assert len(scenes) == 24 and scenes.num_classes == len(EMBEDDED_CLASSES) == 6
    assert scenes.classes == list(EMBEDDED_CLASSES) and not scenes.reduce_zero_label
    for image, labels in zip(scenes.images, scenes.labels):
        assert image.mode == "RGB" and image.size == (48, 48)
        assert labels.dtype == torch.int64 and labels.shape == (48, 48)
        present = labels.unique()
        assert 2 <= len(present) <= 5 and present.min() >= 0 and present.max() < 6
    counts = torch.bincount(torch.stack(scenes.labels).flatten(), minlength=6)
    assert (counts > 0).all()  # every class shows up in a couple of dozen scenes
    again = embedded_scenes("training", count=24, size=48, seed=5)
    for a, b, m, n in zip(scenes.images, again.images, scenes.labels, again.labels):
        assert np.array_equal(np.asarray(a), np.asarray(b)) and torch.equal(m, n)
    other = embedded_scenes("training", count=3, size=48, seed=6)
    assert not torch.equal(other.labels[0], scenes.labels[0])
    validation = embedded_scenes("validation", count=3, size=48, seed=5)
    assert not np.array_equal(np.asarray(validation.images[0]), np.asarray(scenes.images[0]))


def test_splits_copy_from_disjoint_columns():
    # A photograph whose pixels say their column: a crop's values stay within the columns it came from.
    width, height = 256, 192
    columns = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (height, width, 3))
    photo = Image.fromarray(np.ascontiguousarray(columns))
    for split, (low, high) in SPLITS.items():
        rng = np.random.default_rng(0)
        for _ in range(30):
            crop = _texture(rng, photo, split, 32)
            assert crop.shape == (32, 32, 3)
            assert round(width * low) <= crop.min() and crop.max() <= round(width * high) - 1, split


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        embedded_scenes("test")
    with pytest.raises(ValueError, match="count must be a positive integer"):
        embedded_scenes("training", count=0)
    with pytest.raises(ValueError, match="size must be"):
        embedded_scenes("training", size=4)


def test_stream_and_evaluation_read_the_scenes(scenes):
    stream = segmentation_stream(scenes, SegmentationTrainTransform(crop=32, scale=(96, 32)), batch_size=4,
                                 seed=1)
    images, labels = stream.batch(0)
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 32, 32)
    assert set(labels.unique().tolist()) <= set(range(6)) | {255}
    assert torch.equal(stream.batch(3)[1], stream.batch(3)[1])  # a function of the step
    pairs = list(evaluation_pairs(scenes, SegmentationTestTransform((48, 48))))
    assert len(pairs) == 24 and all(torch.equal(labels, scenes.labels[i]) for i, _, labels in pairs)


@pytest.mark.slow
def test_segment_commands_on_embedded_scenes(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained.safetensors"
    save_tiny_backbone(pretrained, embed_dim=32)
    out = tmp_path / "run"
    common = ["--scale", "32", "32", "--device", "cpu"]
    assert main(["segment", "train", "--pretrained", str(pretrained), "--data", "embedded", "--val-data",
                 "embedded", "--steps", "2", "--batch-size", "2", "--crop", "32", "--output", str(out),
                 "--no-progress", *common]) == 0
    printed = capsys.readouterr().out
    assert "400 embedded training scenes" in printed and "validation on 100 images (slide)" in printed
    numbers = json.loads((out / "eval.json").read_text())
    assert numbers["images"] == 100 and numbers["classes"] == list(EMBEDDED_CLASSES)
    for model in ("model.safetensors", "checkpoint.pt"):  # the training checkpoint is a model file too
        assert main(["segment", "eval", "--model", str(out / model), "--data", "embedded",
                     "--output", str(tmp_path / "eval.json"), *common]) == 0
        assert json.loads((tmp_path / "eval.json").read_text())["mIoU"] == pytest.approx(numbers["mIoU"])
    assert main(["segment", "predict", "--model", str(out / "model.safetensors"), "--images", "embedded",
                 "--output", str(tmp_path / "predictions"), *common]) == 0
    assert (tmp_path / "predictions" / "scene-099-overlay.png").is_file()
    capsys.readouterr()
    assert main(["segment", "train", "--pretrained", str(pretrained), "--data", "embedded", "--num-classes",
                 "4", "--output", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data embedded has 6 classes, --num-classes says 4" in err


@pytest.mark.slow
def test_segment_train_demo_writes_its_pictures_and_replaces_itself(tmp_path, monkeypatch, capsys,
                                                                    one_thread):
    # The pre-training is skipped (--pretrained): its command has tests of its own.
    torch.manual_seed(0)
    save_tiny_backbone(tmp_path / "pretrained.safetensors")
    monkeypatch.chdir(tmp_path)
    args = ["segment", "train", "--demo", "--pretrained", "pretrained.safetensors", "--steps", "2",
            "--batch-size", "2", "--crop", "32", "--scale", "32", "32", "--head-channels", "8",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "segment-demo-output"
    for name in ("checkpoint.pt", "model.safetensors", "eval.json", "curves.png", "overlay-003.png"):
        assert (out / name).is_file(), name
    numbers = json.loads((out / "eval.json").read_text())
    assert f"validation mIoU {100 * numbers['mIoU']:.2f} on 100 held-out scenes" in printed
    with Image.open(out / "overlay-000.png") as picture:  # scene, truth, prediction, enlarged 4 times
        assert picture.size == (3 * 64 * 4, 64 * 4)
    assert main(args) == 0
    assert "replacing the earlier demo run in segment-demo-output/" in capsys.readouterr().out
    assert not (out / "pretrain").exists()


def test_resuming_with_another_class_count_is_refused(tmp_path, capsys, one_thread):
    torch.manual_seed(0)
    pretrained = tmp_path / "pretrained.safetensors"
    save_tiny_backbone(pretrained)
    out = tmp_path / "run"
    common = ["--pretrained", str(pretrained), "--crop", "32", "--scale", "32", "32", "--batch-size", "2",
              "--head-channels", "8", "--device", "cpu", "--output", str(out), "--no-progress"]
    assert main(["segment", "train", "--data", "embedded", "--steps", "1", *common]) == 0
    folder = tmp_path / "three"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(folder / "images" / f"{i}.png")
        Image.fromarray(np.full((32, 32), i, np.uint8)).save(folder / "masks" / f"{i}.png")
    capsys.readouterr()
    assert main(["segment", "train", "--data", str(folder), "--num-classes", "3", "--steps", "2", *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "checkpoint.pt") in err
    assert "trained for 6 classes, --data has 3" in err
    # segment eval and predict read the training checkpoint as its model file.
    from beitfast.cli import _segment_model
    from beitfast.segmentation import BEiTForSegmentation

    from_checkpoint, saved = _segment_model(str(out / "checkpoint.pt")), BEiTForSegmentation.from_file(
        out / "model.safetensors")
    assert from_checkpoint.config == saved.config
    assert from_checkpoint.segmentation_config == saved.segmentation_config
    for (name, a), b in zip(from_checkpoint.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name


def test_segment_train_needs_pretrained_and_data_without_demo(tmp_path, capsys):
    for args, missing in ((["--data", "embedded"], "--pretrained"), (["--pretrained", "x.pt"], "--data")):
        assert main(["segment", "train", *args, "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{missing} is required (or --demo)" in err
    assert not (tmp_path / "run").exists()
