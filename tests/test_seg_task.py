"""Segmentation fine-tuning on the shared Trainer: the official poly schedule and parameter groups, a run
resumed from its checkpoint equal to one never stopped, two gloo processes equal to one (BatchNorm over
the global batch), and `beitfast segment train|eval|predict` end to end on a tiny synthetic folder."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from beitfast import BEiT, BEiTConfig, BEiTForSegmentation
from beitfast.cli import main
from beitfast.segmentation import SegmentationConfig
from beitfast.segmentation.data import SegmentationFolder, SegmentationTrainTransform, segmentation_stream
from beitfast.segmentation.global_batchnorm import GlobalBatchNorm2d
from beitfast.segmentation.task import (
    poly_schedule, segmentation_param_groups, segmentation_recipe, segmentation_trainer,
)
from beitfast.testing import StopRun, free_port, leaving_the_group, stop_after
from beitfast.train import CHECKPOINT_NAME

CLASSES = 3


def backbone_config(**overrides):
    values = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, vocab_size=0,
                  use_shared_rel_pos_bias=False, use_rel_pos_bias=True, kernels="eager", drop_path_rate=0.1)
    return BEiTConfig(**{**values, **overrides})


def tiny_model(**overrides):
    segmentation = SegmentationConfig(num_classes=CLASSES, out_indices=(0, 1, 2, 3), channels=16,
                                      auxiliary_channels=8)
    return BEiTForSegmentation(backbone_config(**overrides), segmentation)


def synthetic_folder(root, count=6, size=(40, 48)):
    """Images of three flat colours in regions, masks the regions' labels (plus a little noise)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for i in range(count):
        h, w = size
        labels = np.zeros((h, w), np.uint8)
        labels[:, int(rng.integers(8, w - 8)):] = 1
        labels[int(rng.integers(8, h - 8)):, :int(rng.integers(8, w - 8))] = 2
        pixels = np.clip(colours[labels] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(labels).save(root / "masks" / f"{i:03d}.png")
    return root


def test_poly_schedule_as_mmcv():
    total, warmup, base = 100, 10, 7e-4
    assert poly_schedule(0, base, 0.0, total, warmup) == pytest.approx(base * (1 - 0) * 1e-6)
    for step in (3, 10, 57, 99):
        regular = base * (1 - step / total)
        k = (1 - step / warmup) * (1 - 1e-6) if step < warmup else 0.0
        assert poly_schedule(step, base, 0.0, total, warmup) == pytest.approx(regular * (1 - k), rel=1e-12)
    assert poly_schedule(100, base, 0.0, total, warmup) == 0.0
    assert poly_schedule(50, base, 1e-5, total) == pytest.approx((base - 1e-5) * 0.5 + 1e-5)


def test_param_groups_follow_the_official_layer_ids():
    model = tiny_model(use_abs_pos_emb=True)
    groups = segmentation_param_groups(model, 0.05, 0.65)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    by_name = {n: g for g in groups for n in g["names"]}
    depth = model.config.depth
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    assert by_name["backbone.pos_embed"]["lr_scale"] == pytest.approx(0.65 ** (depth + 1))
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.65 ** depth)
    assert by_name[f"backbone.blocks.{depth - 1}.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.65)
    for name in ("decode_head.conv_seg.weight", "neck.fpn1.0.weight", "auxiliary_head.conv_seg.weight"):
        if name in by_name:
            assert by_name[name]["lr_scale"] == 1.0
    assert any(n.startswith("neck.") and by_name[n]["lr_scale"] == 1.0 for n in names)
    for name in ("backbone.cls_token", "backbone.pos_embed", "decode_head.conv_seg.bias"):
        assert by_name[name]["weight_decay"] == 0.0 and not by_name[name]["decay"]
    assert by_name["backbone.blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    recipe = segmentation_recipe()
    assert (recipe.lr, recipe.layer_decay, recipe.weight_decay, recipe.warmup_steps, recipe.steps) == (
        7e-4, 0.65, 0.05, 1500, 160_000)
    assert (recipe.batch_size, recipe.min_lr, recipe.clip_grad) == (16, 0, None)
    intermediate = segmentation_recipe(intermediate=True)
    assert (intermediate.lr, intermediate.layer_decay) == (3e-5, 0.9)


def _run(tmp_path, folder, steps, checkpoint_every, name, on_step=None, workers=0):
    source = SegmentationFolder(folder / "images", folder / "masks", CLASSES)
    transform = SegmentationTrainTransform(crop=32, scale=(64, 32))
    stream = segmentation_stream(source, transform, batch_size=2, seed=3)
    config = segmentation_recipe(steps=steps, warmup_steps=2, batch_size=2, output_dir=str(tmp_path / name),
                                 checkpoint_every=checkpoint_every, device="cpu", progress=False, seed=3,
                                 num_workers=workers)
    torch.manual_seed(0)
    model = tiny_model()
    trainer = segmentation_trainer(model, stream, config, on_step=on_step)
    return model, trainer, trainer.fit()


def test_training_resumes_bit_for_bit(tmp_path, one_thread):
    folder = synthetic_folder(tmp_path / "data")
    model, trainer, records = _run(tmp_path, folder, 4, 2, "straight")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in records)
    assert records[0]["lr"] == pytest.approx(poly_schedule(0, 7e-4, 0.0, 4, 2))
    assert trainer.optimizer.param_groups[0]["lr"] != trainer.optimizer.param_groups[-1]["lr"]  # layer decay
    with pytest.raises(StopRun):  # a run stopped after step 3 (its last checkpoint: step 2), then resumed
        _run(tmp_path, folder, 4, 2, "stopped", on_step=stop_after(3))
    resumed, trainer, rest = _run(tmp_path, folder, 4, 2, "stopped", workers=2)  # batches from 2 workers
    assert trainer.resumed_from is not None and [r["step"] for r in rest] == [3, 4]
    assert [r["loss"] for r in rest] == [r["loss"] for r in records[2:]]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_segment_train_and_eval_commands(tmp_path, capsys, one_thread, monkeypatch):
    import beitfast.train

    plotted = []
    plot = beitfast.train.plot_metrics
    monkeypatch.setattr(beitfast.train, "plot_metrics",
                        lambda *a, **k: (plotted.append(k.get("validation")), plot(*a, **k)))
    folder = synthetic_folder(tmp_path / "data")
    pretrained = tmp_path / "pretrained.safetensors"
    torch.manual_seed(0)
    # A pre-training model: a shared bias table (copied into every layer) and an LM head (dropped).
    pre = BEiT(backbone_config(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, vocab_size=16))
    pre.save(pretrained)
    out = tmp_path / "run"
    common = ["--num-classes", str(CLASSES), "--scale", "64", "32", "--device", "cpu"]
    assert main(["segment", "train", "--pretrained", str(pretrained), "--data", str(folder), "--val-data",
                 str(folder), "--steps", "3", "--batch-size", "2", "--crop", "32", "--output", str(out),
                 "--no-progress", *common]) == 0
    printed = capsys.readouterr().out
    assert "done: loss" in printed and "validation on 6 images (slide): mIoU" in printed
    for name in ("checkpoint.pt", "model.safetensors", "metrics.jsonl", "eval.json"):
        assert (out / name).is_file() and str((out / name).resolve()) in printed
    numbers = json.loads((out / "eval.json").read_text())
    assert numbers["step"] == 3 and numbers["images"] == 6 and len(numbers["IoU"]) == CLASSES
    # curves.png drawn again with the validation point (pixel accuracy, mIoU in its label)
    assert plotted and plotted[-1]["mIoU"] == numbers["mIoU"] and plotted[-1]["step"] == 3

    report = tmp_path / "eval.json"
    assert main(["segment", "eval", "--model", str(out / "model.safetensors"), "--data", str(folder),
                 "--output", str(report), *common]) == 0
    printed = capsys.readouterr().out
    assert "evaluation on 6 images (slide): mIoU" in printed and "class    IoU    Acc" in printed
    again = json.loads(report.read_text())
    assert again["mIoU"] == pytest.approx(numbers["mIoU"]) and again["pixels"] == 6 * 40 * 48

    predictions = tmp_path / "predictions"
    assert main(["segment", "predict", "--model", str(out / "model.safetensors"), "--images",
                 str(folder / "images"), "--output", str(predictions), "--device", "cpu"]) == 0
    assert "6 image(s)" in capsys.readouterr().out
    with Image.open(predictions / "003.png") as mask:
        assert mask.mode == "P" and mask.size == (48, 40) and np.asarray(mask).max() < CLASSES
    with Image.open(predictions / "003-overlay.png") as picture:
        assert picture.mode == "RGB" and picture.size == (48, 40)

    # Bad input: one line, exit 2.
    assert main(["segment", "eval", "--model", str(out / "model.safetensors"), "--data", str(tmp_path),
                 "--output", str(report)]) == 2
    assert "is neither an ADE20K root" in capsys.readouterr().err
    (folder / "masks" / "002.png").unlink()
    assert main(["segment", "train", "--pretrained", str(pretrained), "--data", str(folder), "--steps", "1",
                 "--batch-size", "2", "--crop", "32", "--output", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 image(s) have no mask" in err and "002.png" in err


def test_mask_pictures_keep_the_labels():
    from beitfast.segmentation.visualize import mask_image, overlay, palette

    labels = torch.randint(0, 7, (9, 11))
    colours = palette(7)
    assert len({tuple(c) for c in colours}) == 7  # a colour per class
    mask = mask_image(labels, colours)
    assert mask.mode == "P" and torch.equal(torch.from_numpy(np.array(mask)).long(), labels)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(overlay(image, labels, colours, 0.0)), np.asarray(image))
    assert np.array_equal(np.asarray(overlay(image, labels, colours, 1.0)), colours[labels.numpy()])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 256\)"):
        mask_image(torch.full((2, 2), 300), colours)


def _batchnorm_worker(rank, world_size, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    with leaving_the_group():
        torch.manual_seed(0)
        x = torch.randn(4, 3, 5, 7, dtype=torch.float64, requires_grad=True)
        bn = GlobalBatchNorm2d(3).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        part = x[2 * rank:2 * rank + 2]
        y = bn(part)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        dist.all_reduce(bn.weight.grad)
        grads = torch.zeros_like(x)
        grads[2 * rank:2 * rank + 2] = x.grad[2 * rank:2 * rank + 2]
        dist.all_reduce(grads)
        ys = [torch.empty_like(y) for _ in range(world_size)]
        dist.all_gather(ys, y.detach())
        if rank == 0:
            torch.save({"y": torch.cat(ys), "dx": grads, "dw": bn.weight.grad, "mean": bn.running_mean,
                        "var": bn.running_var}, out)


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path, monkeypatch):
    out = tmp_path / "bn.pt"
    # Spawned, not forked (a process that has run autograd cannot fork): the workers unpickle this
    # module by its import name (tests.test_seg_task), so the root is on sys.path for this test only.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    mp.spawn(_batchnorm_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    y = bn(x)
    weights = torch.cat([torch.arange(y[:2].numel(), dtype=y.dtype).view_as(y[:2]).cos()] * 2)
    (y * weights).sum().backward()
    for key, expected in (("y", y), ("dx", x.grad), ("dw", bn.weight.grad), ("mean", bn.running_mean),
                          ("var", bn.running_var)):
        torch.testing.assert_close(got[key], expected, rtol=1e-10, atol=1e-12, msg=key)


def _config():
    return BEiTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, vocab_size=0,
                      use_shared_rel_pos_bias=False, use_rel_pos_bias=True, kernels="eager",
                      drop_path_rate=0.0)


def _train(folder, output, parallel="ddp", compile=False, precision="auto"):
    source = SegmentationFolder(folder / "images", folder / "masks", 3)
    ctx_rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    stream = segmentation_stream(source, SegmentationTrainTransform(crop=32, scale=(64, 32)), batch_size=4,
                                 seed=1, rank=ctx_rank, world_size=world)
    config = segmentation_recipe(steps=3, warmup_steps=1, batch_size=4, output_dir=str(output), device="cpu",
                                 progress=False, checkpoint_every=3, parallel=parallel, compile=compile,
                                 precision=precision)
    torch.manual_seed(0)
    # No dropout, no drop path: their random masks would differ between one process and two.
    model = BEiTForSegmentation(_config(), SegmentationConfig(num_classes=3, out_indices=(0, 1, 2, 3),
                                                              channels=16, auxiliary_channels=8, dropout=0.0))
    return segmentation_trainer(model, stream, config).fit()


def _parallel_worker(rank, world_size, port, folder, output, parallel):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with leaving_the_group():
        _train(folder, output, parallel)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, one_thread, monkeypatch, parallel):
    # DDP, and FSDP (the backbone's blocks sharded as units, the rest as one): the updates of one process
    # with the whole batch.
    folder = synthetic_folder(tmp_path / "data")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # spawned workers import this module
    mp.spawn(_parallel_worker, args=(2, free_port(), folder, tmp_path / "two", parallel), nprocs=2, join=True)
    single = _train(folder, tmp_path / "one")
    one = torch.load(tmp_path / "one" / CHECKPOINT_NAME, weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / CHECKPOINT_NAME, weights_only=True)
    assert two["world_size"] == 2 and len(single) == 3
    # The biases just before a BatchNorm have a gradient of 0 up to rounding, which AdamW scales up to
    # lr-sized steps either way; the running means after them follow. Those agree to 1e-4 only.
    noise = ("neck.fpn1.0.bias", "neck.fpn1.3.bias", "neck.fpn2.0.bias", "running_mean")
    for key, value in one.items():
        atol = 1e-4 if key.endswith(noise) else 1e-6
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=atol, msg=key)


def test_curves_show_the_segmentation_validation_point(tmp_path, monkeypatch):
    import matplotlib.axes

    from beitfast.training.progress import plot_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "accuracy": 0.1 * s, "lr": 1e-3}) + "\n"
                               for s in (1, 2, 3)))
    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: (drawn.append((self.get_title(), a, k.get("label"))), plot(self, *a, **k))[1])
    plot_metrics(metrics, tmp_path / "curves.png", validation={"step": 3, "aAcc": 0.61, "mIoU": 0.42})
    points = [(a[0], a[1], label) for _, a, label in drawn if label and label.startswith("validation")]
    assert points == [([3], [0.61], "validation (mIoU 0.420)")]
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path, one_thread):
    # TrainConfig(compile=True) with the segmentation model (Inductor on CPU, about a minute): the same
    # losses as eager.
    folder = synthetic_folder(tmp_path / "data")
    eager = [r["loss"] for r in _train(folder, tmp_path / "eager")]
    compiled = [r["loss"] for r in _train(folder, tmp_path / "compiled", compile=True)]
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)


def test_bf16_autocast_training_follows_fp32(tmp_path, one_thread):
    # precision="bf16" (what a GPU run uses; CPU autocast here): every layer of the backbone, neck and
    # heads runs under bf16 autocast, the losses stay finite and close to fp32's.
    folder = synthetic_folder(tmp_path / "data")
    fp32 = [r["loss"] for r in _train(folder, tmp_path / "fp32", precision="fp32")]
    bf16 = [r["loss"] for r in _train(folder, tmp_path / "bf16", precision="bf16")]
    assert np.isfinite(bf16).all() and bf16 != fp32
    np.testing.assert_allclose(bf16, fp32, rtol=3e-2)
