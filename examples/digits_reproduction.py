"""A small, honest BEiT reproduction on CPU: does masked image modeling help when labels are scarce?

scikit-learn's 1797 handwritten digits (8x8) are upscaled to 32x32 RGB. For each seed:

1. a k-means tokenizer is fitted on augmented views of all 1797 images (no labels);
2. a small BEiT (dim 128, depth 4, 4-pixel patches: 8x8 tokens) is pre-trained by masked image
   modeling on all 1797 images, labels unused;
3. it is fine-tuned on ``--labels-per-class`` labelled training images per class (layer-wise lr
   decay 0.65, label smoothing 0.1, drop path 0.1), and so is the same architecture from random
   initialisation with the same recipe (no layer decay: it has nothing pre-trained to protect);
4. both are scored on a fixed held-out half of the digits (test images are among the unlabelled
   pre-training images, as in transductive semi-supervised learning; their labels are never used).

Prints a table of test accuracy per seed and mean +- std over seeds, and writes ``results.json`` (settings,
per-seed results, summary, commit, date, machine). Seeds are independent: the 5 seeds of
``examples/results/digits_seeds.json`` ran as two processes of one thread each, merged by ``seed_stats.py``:

    python examples/digits_reproduction.py --seeds 0 2 4 --threads 1 --output digits-a &
    python examples/digits_reproduction.py --seeds 1 3 --threads 1 --output digits-b
    python examples/seed_stats.py digits-a/results.json digits-b/results.json --output digits_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from beitfast import BEiT, BEiTConfig
from beitfast.data import (ClassifyTransform, EvalTransform, ImageList, TwoViewTransform, classify_stream,
                           masking_for, pretrain_stream, tokenizer_views)
from beitfast.tokenizers import KMeansTokenizer
from beitfast.train import (Classification, MaskedImageModeling, TrainConfig, Trainer, classifier_from_pretrained,
                            evaluate)
from seed_stats import provenance, summarize  # examples/, beside this script

SIZE, PATCH = 32, 4


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    digits = load_digits()
    images = []
    for pixels in digits.images:  # values 0..16, ink bright on black
        grey = Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        images.append(grey.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB"))
    return images, digits.target


def few_labels(labels: np.ndarray, candidates: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(candidates[labels[candidates] == c], per_class, replace=False)
                           for c in range(10)])


def model_config(vocab_size: int, args) -> BEiTConfig:
    return BEiTConfig.tiny(img_size=SIZE, patch_size=PATCH, embed_dim=args.dim, num_heads=args.dim // 32,
                           depth=args.depth, vocab_size=vocab_size, drop_path_rate=0.1)


def fine_tune(model: BEiT, train: ImageList, test: ImageList, folder: Path, seed: int, layer_decay, args) -> float:
    config = TrainConfig(output_dir=str(folder), steps=args.finetune_steps, batch_size=args.finetune_batch_size,
                         lr=args.finetune_lr, min_lr=1e-6, warmup_steps=args.finetune_steps // 10,
                         layer_decay=layer_decay, label_smoothing=0.1, checkpoint_every=args.finetune_steps,
                         seed=seed, progress=False, resume=None, device="cpu")
    # Digits are not mirror-symmetric and are centred: mild crops, no flips.
    stream = classify_stream(train, ClassifyTransform(SIZE, scale=(0.7, 1.0), flip=False), args.finetune_batch_size,
                             seed=seed)
    Trainer(model, Classification(0.1), stream, config).fit()
    return evaluate(model, test, EvalTransform(SIZE, crop_pct=1.0), device="cpu")


def run_seed(seed: int, images, labels, train_idx, test_idx, args) -> dict:
    out = Path(args.output) / f"seed{seed}"
    started = time.perf_counter()
    everything = ImageList(images)
    views = tokenizer_views(everything, args.tokenizer_images, SIZE, seed=seed)
    tokenizer = KMeansTokenizer.fit(views, vocab_size=args.vocab_size, patch_size=PATCH, input_size=SIZE, seed=seed)

    torch.manual_seed(seed)
    pre_model = BEiT(model_config(tokenizer.vocab_size, args))
    transform = TwoViewTransform(SIZE, SIZE, scale=(0.5, 1.0), flip=False)
    stream = pretrain_stream(everything, transform, masking_for(pre_model.config.grid), args.batch_size, seed=seed)
    pre_config = TrainConfig(output_dir=str(out / "pretrain"), steps=args.pretrain_steps, batch_size=args.batch_size,
                             lr=args.pretrain_lr, warmup_steps=args.pretrain_steps // 10,
                             checkpoint_every=args.pretrain_steps, seed=seed, progress=False, resume=None,
                             device="cpu")
    records = Trainer(pre_model, MaskedImageModeling(tokenizer), stream, pre_config).fit()
    pre_seconds = time.perf_counter() - started

    labelled = few_labels(labels, train_idx, args.labels_per_class, seed)
    train = ImageList([images[i] for i in labelled], labels[labelled].tolist())
    test = ImageList([images[i] for i in test_idx], labels[test_idx].tolist())

    torch.manual_seed(seed)
    pretrained = fine_tune(classifier_from_pretrained(pre_model, 10), train, test, out / "finetune", seed, 0.65, args)
    torch.manual_seed(seed)
    scratch_model = BEiT(model_config(0, args).replace(num_classes=10))
    scratch = fine_tune(scratch_model, train, test, out / "scratch", seed, None, args)
    result = {"seed": seed, "pretrained": pretrained, "scratch": scratch,
              "mim_loss_first": statistics.mean(r["loss"] for r in records[:10]),
              "mim_loss_last": statistics.mean(r["loss"] for r in records[-10:]),
              "mim_acc_first": statistics.mean(r["accuracy"] for r in records[:10]),
              "mim_acc_last": statistics.mean(r["accuracy"] for r in records[-10:]),
              "pretrain_s": pre_seconds, "total_s": time.perf_counter() - started}
    print(f"seed {seed}: pre-trained {pretrained:.4f}, from scratch {scratch:.4f} "
          f"(MIM loss {result['mim_loss_first']:.2f} -> {result['mim_loss_last']:.2f}, "
          f"accuracy {result['mim_acc_first']:.3f} -> {result['mim_acc_last']:.3f}; {result['total_s']:.0f} s)",
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--labels-per-class", type=int, default=10, help="labelled images per class (default: 10)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width, 32 per head (default: 128)")
    parser.add_argument("--depth", type=int, default=4, help="blocks (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=128, help="k-means tokens (default: 128)")
    parser.add_argument("--tokenizer-images", type=int, default=4000, help="views to fit k-means on (default: 4000)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="MIM steps (default: 300)")
    parser.add_argument("--pretrain-lr", type=float, default=1.5e-3, help="MIM peak lr (default: 1.5e-3)")
    parser.add_argument("--finetune-steps", type=int, default=150, help="fine-tuning steps (default: 150)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="fine-tuning peak lr (default: 1e-3)")
    parser.add_argument("--batch-size", type=int, default=64, help="pre-training batch size (default: 64)")
    parser.add_argument("--finetune-batch-size", type=int, default=32, help="fine-tuning batch size (default: 32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--output", default="digits-output", help="output folder (default: ./digits-output)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    origin = provenance()  # the code that runs is the code at the start

    images, labels = digit_images()
    # A fixed held-out half for testing, the same for every seed; labels are drawn from the other half.
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=0)
    print(f"digits: {len(images)} images upscaled to {SIZE}x{SIZE}; pre-training on all of them without labels; "
          f"fine-tuning on {args.labels_per_class} labels per class; testing on {len(test_idx)} held-out images",
          flush=True)
    results = [run_seed(seed, images, labels, train_idx, test_idx, args) for seed in args.seeds]
    keys = ("pretrained", "scratch")
    summary = summarize(results, keys)
    print(f"\n| seed | pre-trained (MIM) + fine-tuned | from scratch |\n|---|---|---|")
    for r in results:
        print(f"| {r['seed']} | {100 * r['pretrained']:.1f} % | {100 * r['scratch']:.1f} % |")
    print(f"| mean ± std ({len(results)} seeds) | {100 * summary['pretrained']['mean']:.1f} ± "
          f"{100 * summary['pretrained']['std']:.1f} % | {100 * summary['scratch']['mean']:.1f} ± "
          f"{100 * summary['scratch']['std']:.1f} % |")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    record = {"settings": vars(args), "results": results, "summary": summary, "summary_keys": list(keys),
              "provenance": origin,
              "finished": provenance()["date"]}
    (Path(args.output) / "results.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
