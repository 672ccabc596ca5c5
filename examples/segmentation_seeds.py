"""The paper's segmentation claim in miniature, on CPU: does masked image modeling help a BEiT segment?

The embedded segmentation task (:func:`beitfast.segmentation.embedded.embedded_scenes`): 64-pixel scenes of
2 to 5 blob-shaped regions, each a crop of one of 6 photographs (brick, grass, gravel, coins, coffee, the
cat), with exact label masks; validation scenes copy from parts of the photographs that training scenes
never show.

1. Once, for every seed (pre-training is the expensive part): a k-means tokenizer is fitted on views of the
   ``--scenes`` training scenes, and a small BEiT (dim 128, depth 4, 8-pixel patches: 8x8 tokens) is
   pre-trained by masked image modeling on those images, labels unused.
2. Per seed: ``--labelled`` of the training scenes are drawn (the seed's draw); the same UPerNet model
   (backbone with a bias table per layer, neck, UPerNet and auxiliary FCN heads 64 channels wide) is
   fine-tuned on them for ``--steps`` steps (the official recipe: AdamW, poly schedule, drop path 0.1,
   the official augmentation at 64 px), once from the pre-trained backbone (layer decay 0.65) and once
   from random initialisation (no layer decay: nothing pre-trained to protect); both see the same
   batches (the same stream seed).
3. Both are scored by mIoU on the ``--val-scenes`` validation scenes (whole-image inference).

The fine-tuning seed sets the labelled draw, the new weights (heads; the whole model from scratch), the
batches and augmentations, and dropout; the pre-trained checkpoint is the same for every seed, so the
spread over seeds does not include the spread of pre-training itself.

Prints a table of validation mIoU per seed and mean +- std, and writes ``results.json`` (settings, per
seed results, summary, commit, date, machine). Seeds may run in several processes, reusing one
pre-training (``--pretrained``), merged by ``seed_stats.py``:

    python examples/segmentation_seeds.py --seeds 0 2 4 --threads 1 --output seg-a
    python examples/segmentation_seeds.py --seeds 1 3 --threads 1 --output seg-b \\
        --pretrained seg-a/pretrain/beit.safetensors   # once seg-a wrote it; the same settings
    python examples/seed_stats.py seg-a/results.json seg-b/results.json --output segmentation_seeds.json

``--layer-decay 1 --skip-scratch --pretrained ...`` fine-tunes the pre-trained model alone with the
scratch model's recipe (no layer decay): it separates the recipe from the initialisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from beitfast import BEiT, BEiTConfig
from beitfast.data import ImageList, tokenizer_views
from beitfast.segmentation import BEiTForSegmentation, SegmentationConfig
from beitfast.segmentation.data import (SegmentationTestTransform, SegmentationTrainTransform,
                                        segmentation_stream)
from beitfast.segmentation.embedded import EmbeddedScenes, embedded_scenes
from beitfast.segmentation.task import evaluate_segmentation, segmentation_recipe, segmentation_trainer
from beitfast.tokenizers import KMeansTokenizer
from beitfast.train import TrainConfig, pretraining_trainer
from seed_stats import provenance, summarize  # examples/, beside this script

SIZE, PATCH, TOKENIZER_SIZE, TOKENIZER_PATCH = 64, 8, 32, 4
SCALE = (256, 64)  # the training resize (ratio 0.5-2.0 of it) and the test resize, as segment train on CPU


def backbone_config(args, vocab_size: int) -> BEiTConfig:
    """The pre-training model (one shared bias table, as BEiT pre-trains)."""
    return BEiTConfig.tiny(img_size=SIZE, patch_size=PATCH, embed_dim=args.dim, num_heads=args.dim // 32,
                           depth=args.depth, vocab_size=vocab_size, drop_path_rate=0.1)


def segmentation_model(args, pretrained: BEiT | None) -> BEiTForSegmentation:
    """The same architecture either way: the official fine-tuning backbone (a bias table per layer, no
    mean pooling) with blocks 0-3 feeding the neck; from ``pretrained``'s weights or from scratch."""
    config = backbone_config(args, 0).replace(use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                                              use_mean_pooling=False)
    # the four quarters' last blocks, as segment train for depths without official indices (0-3 for 4)
    out_indices = tuple(max(args.depth * k // 4 - 1, 0) for k in range(1, 5))
    head = SegmentationConfig(num_classes=args.num_classes, out_indices=out_indices,
                              channels=args.head_channels, auxiliary_channels=args.head_channels)
    if pretrained is None:
        return BEiTForSegmentation(config, head)
    return BEiTForSegmentation.from_backbone(pretrained, config, head)


def pretrain(train: EmbeddedScenes, args, folder: Path) -> tuple[BEiT, dict]:
    started = time.perf_counter()
    images = ImageList(train.images)  # the scenes without their masks
    views = tokenizer_views(images, args.tokenizer_images, TOKENIZER_SIZE, seed=args.pretrain_seed)
    tokenizer = KMeansTokenizer.fit(views, vocab_size=args.vocab_size, patch_size=TOKENIZER_PATCH,
                                    input_size=TOKENIZER_SIZE, seed=args.pretrain_seed)
    config = TrainConfig(output_dir=str(folder), steps=args.pretrain_steps,
                         batch_size=args.pretrain_batch_size,
                         lr=args.pretrain_lr, warmup_steps=args.pretrain_steps // 10,
                         checkpoint_every=args.pretrain_steps, seed=args.pretrain_seed, progress=False,
                         resume=None, device="cpu")
    trainer = pretraining_trainer(backbone_config(args, tokenizer.vocab_size), tokenizer, images, config)
    records = trainer.fit()
    model = trainer.model
    model.save(folder / "beit.safetensors")
    info = {"mim_loss_first": statistics.mean(r["loss"] for r in records[:10]),
            "mim_loss_last": statistics.mean(r["loss"] for r in records[-10:]),
            "mim_acc_first": statistics.mean(r["accuracy"] for r in records[:10]),
            "mim_acc_last": statistics.mean(r["accuracy"] for r in records[-10:]),
            "pretrain_s": time.perf_counter() - started}
    print(f"pre-trained once: MIM loss {info['mim_loss_first']:.2f} -> {info['mim_loss_last']:.2f}, accuracy "
          f"{info['mim_acc_first']:.3f} -> {info['mim_acc_last']:.3f} in {info['pretrain_s']:.0f} s",
          flush=True)
    return model, info


def fine_tune(model: BEiTForSegmentation, labelled: EmbeddedScenes, val: EmbeddedScenes, folder: Path,
              seed: int, layer_decay, args) -> dict:
    config = segmentation_recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 warmup_steps=args.steps // 10, layer_decay=layer_decay,
                                 checkpoint_every=args.steps, output_dir=str(folder), seed=seed,
                                 progress=False, resume=None, device="cpu")
    transform = SegmentationTrainTransform(SIZE, SCALE)
    stream = segmentation_stream(labelled, transform, args.batch_size, seed=seed)
    records = segmentation_trainer(model, stream, config).fit()
    numbers = evaluate_segmentation(model, val, SegmentationTestTransform(SCALE), "whole", device="cpu")
    return {"mIoU": numbers["mIoU"], "aAcc": numbers["aAcc"], "mAcc": numbers["mAcc"],
            "train_loss_last": statistics.mean(r["loss"] for r in records[-10:])}


def subset(scenes: EmbeddedScenes, indices) -> EmbeddedScenes:
    return EmbeddedScenes([scenes.images[i] for i in indices], [scenes.labels[i] for i in indices],
                          tuple(scenes.classes), scenes.split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="fine-tuning seeds (default: 0 1 2 3 4)")
    parser.add_argument("--scenes", type=int, default=400,
                        help="training scenes, unlabelled for pre-training (default: 400)")
    parser.add_argument("--labelled", type=int, default=100, help="labelled training scenes per seed "
                        "(default: 100)")
    parser.add_argument("--val-scenes", type=int, default=100, help="validation scenes (default: 100)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width, 32 per head (default: 128)")
    parser.add_argument("--depth", type=int, default=4, help="blocks (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=256, help="k-means tokens (default: 256)")
    parser.add_argument("--tokenizer-images", type=int, default=3000, help="views to fit k-means on "
                        "(default: 3000)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="MIM steps (default: 300)")
    parser.add_argument("--pretrain-batch-size", type=int, default=32, help="MIM batch size (default: 32)")
    parser.add_argument("--pretrain-lr", type=float, default=2e-3, help="MIM peak lr (default: 2e-3)")
    parser.add_argument("--pretrain-seed", type=int, default=0,
                        help="the one pre-training's seed (default: 0)")
    parser.add_argument("--pretrained", help="reuse this pre-trained BEiT (beit.safetensors of an earlier "
                        "run with the same settings) instead of pre-training")
    parser.add_argument("--head-channels", type=int, default=64,
                        help="width of the UPerNet and FCN heads (default: 64)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps (default: 100)")
    parser.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size (default: 8)")
    parser.add_argument("--lr", type=float, default=7e-4, help="fine-tuning peak lr (default: 7e-4)")
    parser.add_argument("--layer-decay", type=float, default=0.65,
                        help="layer-wise lr decay of the pre-trained model (default: 0.65, the official; "
                             "1: none, as from scratch)")
    parser.add_argument("--skip-scratch", action="store_true",
                        help="fine-tune the pre-trained model only (e.g. to compare --layer-decay values)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--output", default="segmentation-output", help="output folder "
                        "(default: ./segmentation-output)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    origin = provenance()  # the code that runs is the code at the start
    if args.labelled > args.scenes:
        parser.error(f"--labelled {args.labelled} is more than --scenes {args.scenes}")
    output = Path(args.output)
    train = embedded_scenes("training", args.scenes, SIZE)
    val = embedded_scenes("validation", args.val_scenes, SIZE)
    args.num_classes = train.num_classes
    print(f"embedded scenes: {len(train)} training ({args.labelled} labelled per seed), {len(val)} "
          f"validation, {SIZE} px, {train.num_classes} classes", flush=True)
    if args.pretrained:
        pre_model, pre_info = BEiT.from_file(args.pretrained), {"pretrained_from": args.pretrained}
    else:
        pre_model, pre_info = pretrain(train, args, output / "pretrain")

    results = []
    for seed in args.seeds:
        started = time.perf_counter()
        labelled = subset(train, np.random.default_rng(seed).choice(len(train), args.labelled, replace=False))
        folder = output / f"seed{seed}"
        torch.manual_seed(seed)
        model = segmentation_model(args, pre_model)
        numbers = {"pretrained": fine_tune(model, labelled, val, folder / "pretrained", seed,
                                           args.layer_decay, args)}
        if not args.skip_scratch:
            torch.manual_seed(seed)
            numbers["scratch"] = fine_tune(segmentation_model(args, None), labelled, val, folder / "scratch",
                                           seed, None, args)
        result = {"seed": seed, **{key: n["mIoU"] for key, n in numbers.items()},
                  **{f"{key}_numbers": n for key, n in numbers.items()},
                  "seconds": time.perf_counter() - started}
        results.append(result)
        print(f"seed {seed}: mIoU " + ", ".join(f"{key} {100 * n['mIoU']:.1f}" for key, n in numbers.items())
              + f" ({result['seconds']:.0f} s)", flush=True)

    keys = ("pretrained",) if args.skip_scratch else ("pretrained", "scratch")
    summary = summarize(results, keys)
    print("\n| seed | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for r in results:
        print(f"| {r['seed']} | " + " | ".join(f"{100 * r[key]:.1f}" for key in keys) + " |")
    print(f"| mean ± std ({len(results)} seeds) | "
          + " | ".join(f"{100 * summary[key]['mean']:.1f} ± {100 * summary[key]['std']:.1f}" for key in keys)
          + " |")
    output.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "pretrained"}
    record = {"settings": settings, "pretraining": pre_info, "results": results, "summary": summary,
              "summary_keys": list(keys), "provenance": origin,
              "finished": provenance()["date"]}
    (output / "results.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
