"""The ``beitfast`` command: ``pretrain``, ``finetune``, ``tokenizer train`` and ``bench``.

Defaults follow the official recipe when a GPU is present (BEiT-B, 224 pixels, 16-pixel patches, a
112-pixel tokenizer view, 8192 tokens) and a small model on small images on CPU, so that every command
does something useful in minutes on a laptop. ``beitfast pretrain --demo`` is the main job: it fits a
k-means tokenizer on the embedded photographs and pre-trains a small BEiT on them, no download needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from ._files import remove_stale_temporaries
from .pipeline import INPUT_PATHS
from .train import NonFiniteLossError, resolve_device

# Per-device defaults of the options left unset; printed by --help.
GPU_DEFAULTS = {
    "model": "base", "depth": None, "img_size": 224, "patch_size": 16, "tokenizer_size": 112,
    "tokenizer_patch_size": 8, "vocab_size": 8192, "batch_size": 2048, "steps": 500_000, "warmup_steps": 6250,
    "lr": 1.5e-3, "tokenizer_images": 50_000,
}
CPU_DEFAULTS = {
    "model": "tiny", "depth": 4, "img_size": 64, "patch_size": 8, "tokenizer_size": 32,
    "tokenizer_patch_size": 4, "vocab_size": 256, "batch_size": 32, "steps": 400, "warmup_steps": 40,
    "lr": 2e-3, "tokenizer_images": 3000,
}
FINETUNE_GPU_DEFAULTS = {"batch_size": 1024, "steps": 125_000, "warmup_steps": 25_000, "lr": 4e-3}
FINETUNE_CPU_DEFAULTS = {"batch_size": 32, "steps": 300, "warmup_steps": 30, "lr": 1e-3}
# bench times a few steps: a batch that fits one GPU rather than the pre-training batch.
BENCH_GPU_DEFAULTS = {**GPU_DEFAULTS, "batch_size": 128}
BENCH_CPU_DEFAULTS = {**CPU_DEFAULTS, "batch_size": 32}
DEMO_OUTPUT = "demo-output"
TOKENIZER_NAME = "tokenizer.safetensors"
EVAL_NAME = "eval.json"  # finetune --val-data: the validation numbers


class CommandError(Exception):
    """An expected failure the user can fix (not a bug): one line on stderr, exit code 2."""


def _device(name: str) -> str:
    """``--device`` with "auto" made concrete: "cuda" when a GPU is present, else "cpu"."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _defaults(table_gpu: dict, table_cpu: dict, device: str) -> dict:
    return table_gpu if _device(device).startswith("cuda") else table_cpu


def _fill(args: argparse.Namespace, defaults: dict) -> set[str]:
    """Give the options left unset their defaults; returns the names of those the user set."""
    given = {key for key in defaults if getattr(args, key, None) is not None}
    for key, value in defaults.items():
        if key not in given:
            setattr(args, key, value)
    if "warmup_steps" in defaults and "warmup_steps" not in given:
        # The default warmup is the recipe's fraction of the run: a short run still reaches its peak lr.
        args.warmup_steps = args.steps * defaults["warmup_steps"] // defaults["steps"]
    return given


def _both(key: str, gpu: dict = GPU_DEFAULTS, cpu: dict = CPU_DEFAULTS) -> str:
    return f"(default: {gpu[key]} with a GPU, {cpu[key]} on CPU)"


# -- shared pieces ---------------------------------------------------------------------------------


def _image_source(data: str):
    from .data import ImageFolder, embedded_photos

    if data == "embedded":
        try:
            return embedded_photos()
        except ImportError as error:  # scikit-image and scikit-learn are the optional data extra
            raise CommandError(f"--data embedded: {error}; or give an image folder") from error
    if _is_shards(data):
        from .shards import ShardedImages

        return ShardedImages(data)  # shards written by `beitfast data pack`
    return ImageFolder(data)


def _log_found(source, log=None) -> None:
    """The header's data line: the images found, and the files skipped and why (an image folder)."""
    (log or _log)(f"data: {getattr(source, 'found', f'{len(source)} images')}")


def _is_shards(data: str) -> bool:
    """Whether ``data`` names shards of `beitfast data pack`: a .tar file or a folder of them."""
    return data.endswith(".tar") or (Path(data).is_dir() and any(Path(data).glob("*.tar")))


def _print_outputs(output: Path, names: tuple[tuple[str, str], ...]) -> None:
    """Where the run wrote each of its files (those that exist)."""
    for name, what in names:
        if (output / name).exists():
            print(f"{what:>10}: {(output / name).resolve()}")


def _save_validation(output: Path, numbers: dict) -> None:
    """The validation numbers (with the ``step`` they were measured at) written to eval.json, and the
    curves drawn again with them."""
    from .train import METRICS_NAME, PLOT_NAME, plot_metrics, write_bytes_atomically

    write_bytes_atomically(output / EVAL_NAME, (json.dumps(numbers, indent=1) + "\n").encode())
    try:
        plot_metrics(output / METRICS_NAME, output / PLOT_NAME, validation=numbers)
    except ImportError:  # matplotlib is optional: the trainer said so once, eval.json has the numbers
        pass


def _check_file(path: str, option: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option}: {path!r} does not exist or is not a file")


def _check_device(args) -> None:
    """The device exists, and the options that need CUDA have it: checked before any work."""
    device = resolve_device(args.device)
    for flag, wanted in (("--cuda-graphs", args.cuda_graphs), ("--fp8", args.fp8)):
        if wanted and device.type != "cuda":
            raise CommandError(f"{flag} needs a CUDA device, this run is on {device}")


def _check_run_paths(args, output: Path, replaced: tuple[str, ...] = ()) -> None:
    """What a run writes and reads, checked before any data or model work: a fresh run (``--resume
    none``) does not replace the files of an earlier run (``replaced`` names more of them) unless
    ``--overwrite`` says so."""
    from .train import CHECKPOINT_NAME, METRICS_NAME, PREVIOUS_CHECKPOINT_NAME, ensure_writable

    if args.resume == "none" and not args.overwrite:
        names = (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, METRICS_NAME, *replaced)
        found = [name for name in names if (output / name).exists()]
        if found:
            raise CommandError(f"--output {str(output)!r} holds the run {', '.join(found)}, which --resume "
                               f"none would replace: give --overwrite to replace them, --resume auto to "
                               f"continue that run, or another --output")
    if _main_process():
        ensure_writable(output)
    if args.resume not in ("auto", "none"):
        _check_file(args.resume, "--resume")
        with open(args.resume, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive ("PK"), or a pickle (protocol byte 0x80) in its legacy format;
        # an empty or damaged checkpoint is left to the integrity checks, which say what is wrong with it.
        if head and not (head == b"PK" or head[:1] == b"\x80"):
            raise CommandError(f"--resume: {args.resume!r} is not a checkpoint (not a file torch.save "
                               f"wrote); give a run's checkpoint.pt, 'auto' or 'none'")


def _load_tokenizer(path, what: str):
    import pickle

    from .tokenizers import load_tokenizer

    try:
        return load_tokenizer(path)
    except pickle.UnpicklingError as error:  # a pickle that would run code on load, or not a pickle at all
        raise CommandError(f"{what} {str(path)!r}: {error}") from None


def _check_batch_size(batch_size: int, source, data: str, given: bool = True) -> None:
    """A batch larger than the data set repeats images in every batch: refused when asked for with
    --batch-size (--batch-size 100000 of 60 images would only fill memory), said when it is the default
    (the demo's 32 of the 16 embedded photographs: each copy is augmented anew)."""
    if batch_size <= len(source):
        return
    if given:
        raise CommandError(f"--batch-size {batch_size} is larger than the data set ({len(source)} images "
                           f"in {data}): every batch would repeat images; use --batch-size {len(source)} or "
                           f"less")
    _log(f"note: the default batch of {batch_size} repeats the {len(source)} images of {data} "
         f"(each copy augmented anew); --batch-size sets another")


def _fit_kmeans(source, args, log):
    from .data import tokenizer_views
    from .tokenizers import KMeansTokenizer

    started = time.perf_counter()
    # Bars on a terminal only: in a log or a pipe they would be noise among the one-line messages.
    progress = not getattr(args, "no_progress", False) and _main_process() and sys.stderr.isatty()
    views = tokenizer_views(source, args.tokenizer_images, args.tokenizer_size, args.seed, progress=progress)
    tokenizer = KMeansTokenizer.fit(views, vocab_size=args.vocab_size, patch_size=args.tokenizer_patch_size,
                                    input_size=args.tokenizer_size, seed=args.seed, iters=args.tokenizer_iters,
                                    progress=progress)
    log(f"k-means tokenizer: {tokenizer.vocab_size} tokens of {args.tokenizer_patch_size}-pixel patches fitted on "
        f"{args.tokenizer_images} random {args.tokenizer_size}-pixel views in {time.perf_counter() - started:.1f} s")
    return tokenizer


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log(message: str) -> None:
    if _main_process():
        print(message, flush=True)


# The least value of each count option, checked as soon as the command line is read (a 0 would otherwise
# mean "the default" or "never" somewhere). A vocabulary of one token makes every target the same.
LEAST = {"depth": 1, "img_size": 1, "patch_size": 1, "vocab_size": 2, "tokenizer_size": 1,
         "tokenizer_patch_size": 1, "tokenizer_images": 1, "tokenizer_iters": 1, "steps": 1, "batch_size": 1,
         "warmup_steps": 0, "checkpoint_every": 1, "workers": 0, "threads": 1, "log_every": 1,
         "images_per_shard": 1, "data_workers": 0, "warmup": 0, "head_channels": 1, "num_classes": 1}


def _check_counts(args: argparse.Namespace) -> None:
    for name, least in LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def _train_config(args, output: str, **extra):
    from .train import TrainConfig

    if args.min_lr > args.lr:
        raise CommandError(f"--min-lr ({args.min_lr:g}) must not exceed --lr ({args.lr:g}): the "
                           f"schedule would rise from the peak towards it")
    resume = None if args.resume == "none" else args.resume
    # Without the bar, a line at least once per checkpoint interval, about twenty in a run.
    log_every = args.log_every if args.log_every is not None else min(args.checkpoint_every, max(1, args.steps // 20))
    return TrainConfig(
        output_dir=output, steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip_grad=args.clip_grad or None,
        checkpoint_every=args.checkpoint_every, seed=args.seed, num_workers=args.workers, device=args.device,
        precision=args.precision, parallel=args.parallel, progress=not args.no_progress, log_every=log_every,
        resume=resume, compile=args.compile, cuda_graphs=args.cuda_graphs, fp8=args.fp8,
        fused_optimizer=not args.no_fused_optimizer, **extra,
    )


def _fast_step(args) -> dict:
    """The model's fast-step fields (``BEiTConfig``) the command line sets."""
    return dict(fuse_blocks=args.fuse_blocks, residual_dtype=args.residual_dtype,
                checkpoint_blocks=args.checkpoint_blocks)


def _summary(trainer, records: list[dict], window: int = 10) -> str:
    """The final line: the run's progress, and where it resumed from if it did."""
    resumed = ""
    if trainer.resumed_from is not None:
        path, step = trainer.resumed_from
        if not records:
            return f"nothing to do: {path} is at step {step}, --steps is {trainer.config.steps}"
        resumed = f"resumed from {path} at step {step}; steps {step + 1}-{records[-1]['step']}: "
    head, tail = records[:window], records[-window:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return (f"{resumed}loss {mean(head, 'loss'):.3f} -> {mean(tail, 'loss'):.3f}, accuracy "
            f"{mean(head, 'accuracy'):.3f} -> {mean(tail, 'accuracy'):.3f} (means of the first and last "
            f"{len(tail)} steps)")


# -- commands --------------------------------------------------------------------------------------


def _demo_settings(args: argparse.Namespace, folder: str) -> None:
    """A demo writes to its own folder, afresh, on the CPU unless a device is named. An earlier demo run
    there, made again in minutes, is replaced (said), unless --output or --resume was given."""
    from .train import CHECKPOINT_NAME

    if args.output is None and args.resume is None and (Path(folder) / CHECKPOINT_NAME).exists():
        _log(f"replacing the earlier demo run in {folder}/")
        args.overwrite = True
    args.output = args.output or folder
    args.resume = args.resume or "none"
    args.device = "cpu" if args.device == "auto" else args.device


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import BEiTConfig
    from .data import masking_for
    from .tokenizers.base import check_patch_size
    from .train import CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, pretraining_trainer

    if args.demo:
        _demo_settings(args, DEMO_OUTPUT)
    _check_device(args)  # a GPU that is not there fails now, not after the tokenizer fit
    given = _fill(args, _defaults(GPU_DEFAULTS, CPU_DEFAULTS, args.device))
    args.data = args.data or "embedded"
    args.tokenizer = args.tokenizer or "kmeans"
    args.output = args.output or "beitfast-pretrain"
    args.resume = args.resume or "auto"
    output = Path(args.output)
    tokenizer_path = output / TOKENIZER_NAME
    tokenizer, tokenizer_file = None, None
    if args.tokenizer != "kmeans":
        _check_file(args.tokenizer, "--tokenizer")
        tokenizer, tokenizer_file = _load_tokenizer(args.tokenizer, "--tokenizer"), args.tokenizer
    elif args.resume != "none" and tokenizer_path.exists() and (output / CHECKPOINT_NAME).exists():
        # Resuming: the same targets.
        tokenizer, tokenizer_file = _load_tokenizer(tokenizer_path, "the run's tokenizer"), tokenizer_path
        _log(f"tokenizer: {tokenizer_path} (from the run being resumed)")
    # One token per patch: the model's patch grid follows a given tokenizer, a k-means tokenizer to be
    # fitted follows the model, and a contradiction set explicitly is refused before any work.
    if tokenizer is not None and "img_size" not in given:
        args.img_size = tokenizer.grid_size * args.patch_size
    preset = getattr(BEiTConfig, args.model)
    overrides = {"depth": args.depth} if args.depth is not None else {}
    config = preset(img_size=args.img_size, patch_size=args.patch_size,
                    vocab_size=tokenizer.vocab_size if tokenizer is not None else args.vocab_size,
                    drop_path_rate=args.drop_path, kernels=args.kernels, **_fast_step(args), **overrides)
    if tokenizer is not None:
        grid, source_of_grid = tokenizer.grid_size, f"the tokenizer {tokenizer_file}"
    else:
        source_of_grid = "--tokenizer-size/--tokenizer-patch-size"
        if "tokenizer_size" not in given:
            args.tokenizer_size = config.grid[0] * args.tokenizer_patch_size
        check_patch_size(args.tokenizer_size, args.tokenizer_patch_size, source_of_grid)
        grid = args.tokenizer_size // args.tokenizer_patch_size
    if config.grid != (grid, grid):
        raise CommandError(
            f"{source_of_grid} gives a {grid}x{grid} token grid but the model's patch grid is "
            f"{config.grid[0]}x{config.grid[1]} (--img-size {args.img_size} / --patch-size {args.patch_size}); "
            f"every patch needs one token: use --img-size {grid * args.patch_size} or leave the sizes unset"
        )
    masking_for(config.grid, args.mask_ratio)  # checks --mask-ratio now
    train_config = _train_config(args, str(output), input_path=args.input_path,
                                 allow_tokenizer_change=args.allow_tokenizer_change)
    source = _image_source(args.data)
    _log_found(source)
    _check_batch_size(args.batch_size, source, args.data, "batch_size" in given)
    _check_run_paths(args, output, (TOKENIZER_NAME,) if args.tokenizer == "kmeans" else ())
    if tokenizer is None:
        tokenizer = _fit_kmeans(source, args, _log)
        if _main_process():
            remove_stale_temporaries(output, [TOKENIZER_NAME])  # of a save that a kill interrupted
            tokenizer.save(tokenizer_path)
    _log(f"pre-training BEiT-{args.model} (dim {config.embed_dim}, depth {config.depth}, {config.image_hw[0]} px, "
         f"patch {config.patch_size}, vocab {config.vocab_size}) on {args.data} for {args.steps} steps of "
         f"{args.batch_size} images")
    trainer = pretraining_trainer(config, tokenizer, source, train_config, mask_ratio=args.mask_ratio)
    records = trainer.fit()
    if _main_process():
        print(f"done: {_summary(trainer, records)}")
        _print_outputs(output, ((CHECKPOINT_NAME, "checkpoint"), (METRICS_NAME, "metrics"),
                                (PLOT_NAME, "plot"), (TOKENIZER_NAME, "tokenizer")))
    return 0


def _labelled_source(data: str, option: str):
    """The labelled images of ``option``: a folder of class sub-folders (images beside them are named), or
    shards that `beitfast data pack --labelled` wrote."""
    from .data import ImageFolder

    if _is_shards(data):
        from .shards import ShardedImages

        source = ShardedImages(data)
        if source.labels is None:
            raise CommandError(f"{option} {data!r}: these shards have no class labels; pack them with "
                               f"`beitfast data pack --labelled`")
        _log_found(source)
        return source
    source = ImageFolder(data, labelled=True)
    _log_found(source)
    outside = source.ignored.get("outside a class folder", [])
    if outside:
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        names = ", ".join(path.name for path in outside[:5]) + more
        _log(f"{option}: ignored {len(outside)} image(s) beside the class folders, in no class: {names}")
    return source


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import ClassifyTransform, EvalTransform, classify_stream
    from .train import (
        CHECKPOINT_NAME,
        METRICS_NAME,
        PLOT_NAME,
        Classification,
        Trainer,
        classifier_from_pretrained,
        evaluation,
        setup_distributed,
    )

    _check_device(args)
    given = _fill(args, _defaults(FINETUNE_GPU_DEFAULTS, FINETUNE_CPU_DEFAULTS, args.device))
    args.resume = args.resume or "auto"
    layer_decay = None if args.linear_probe else args.layer_decay
    train_config = _train_config(args, args.output, layer_decay=layer_decay, label_smoothing=args.label_smoothing,
                                 linear_probe=args.linear_probe)
    if not Path(args.pretrained).exists():
        raise FileNotFoundError(f"--pretrained: {args.pretrained!r} does not exist (a weights file or a "
                                f"Hugging Face model folder)")
    train_set = _labelled_source(args.data, "--data")
    val_set = _labelled_source(args.val_data, "--val-data") if args.val_data else None
    if len(train_set.classes) < 2:
        raise CommandError(f"--data {args.data!r} has {len(train_set.classes)} class {train_set.classes}: "
                           f"classification needs at least two (one sub-folder per class)")
    _check_batch_size(args.batch_size, train_set, args.data, "batch_size" in given)
    _check_run_paths(args, Path(args.output))
    if val_set is not None and val_set.classes != train_set.classes:
        raise CommandError(f"--val-data classes {val_set.classes} differ from --data classes {train_set.classes}")
    model = classifier_from_pretrained(args.pretrained, len(train_set.classes), drop_path_rate=args.drop_path,
                                       log=_log, **_fast_step(args))
    size = model.config.image_hw[0]
    ctx = setup_distributed()
    stream = classify_stream(train_set, ClassifyTransform(size), args.batch_size, seed=args.seed, rank=ctx.rank,
                             world_size=ctx.world_size)
    _log(f"{'linear probing' if args.linear_probe else 'fine-tuning'} on {len(train_set)} images of "
         f"{len(train_set.classes)} classes for {args.steps} steps")
    trainer = Trainer(model, Classification(args.label_smoothing), stream, train_config)
    records = trainer.fit()
    _log(f"done: {_summary(trainer, records)}")
    output = Path(args.output)
    if val_set is not None:
        numbers = evaluation(model, val_set, EvalTransform(size), device=train_config.device)
        _log(f"validation on {numbers['images']} images: top-1 accuracy {numbers['top1']:.4f}, top-5 "
             f"{numbers['top5']:.4f}, loss {numbers['loss']:.4f}")
        if _main_process():
            _save_validation(output, {"step": trainer.step, **numbers})
    if _main_process():
        _print_outputs(output, ((CHECKPOINT_NAME, "checkpoint"), (METRICS_NAME, "metrics"),
                                (PLOT_NAME, "plot"), (EVAL_NAME, "validation")))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizers.base import check_patch_size
    from .train import ensure_writable

    output = Path(args.output)
    if output.is_dir():
        raise CommandError(f"--output {args.output!r} is a folder; give the file to write")
    ensure_writable(output.parent)
    check_patch_size(args.tokenizer_size, args.tokenizer_patch_size, "--tokenizer-size/--tokenizer-patch-size")
    source = _image_source(args.data)
    _log_found(source, print)
    tokenizer = _fit_kmeans(source, args, print)
    tokenizer.save(args.output)
    print(f"saved: {args.output}")
    return 0


def _bench_data(args: argparse.Namespace) -> int:
    """``bench --data``: the input paths and the tokenizers alone, one JSON line each."""
    from .input_bench import bench_paths, bench_tokenizers

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    for row in bench_paths(batch_size=args.batch_size or 32, batches=args.steps, workers=args.data_workers,
                           device=str(device)):
        print(json.dumps(row), flush=True)
    for row in bench_tokenizers(batch_size=args.batch_size or (128 if on_gpu else 2), batches=args.steps if on_gpu
                                else 1, device=str(device)):
        print(json.dumps(row), flush=True)
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from .data import ImageFolder
    from .shards import pack_shards

    if args.masks is not None and args.num_classes is None:
        raise CommandError("--masks needs --num-classes (the masks' class count)")
    if args.masks is None and (args.num_classes is not None or args.reduce_zero_label):
        raise CommandError("--num-classes and --reduce-zero-label describe --masks, which is not given")
    _log_found(ImageFolder(args.folder, labelled=args.labelled), print)
    shards = pack_shards(args.folder, args.output, images_per_shard=args.images_per_shard,
                         labelled=args.labelled, masks=args.masks, num_classes=args.num_classes,
                         reduce_zero_label=args.reduce_zero_label)
    print(f"wrote {len(shards)} shard(s) to {args.output}")
    return 0


def _benchmarks_folder() -> Path | None:
    """The benchmark suite: ./benchmarks, or that of the source checkout this package is installed from
    (an editable install); None for an installed package (the suite is not part of it)."""
    for folder in (Path.cwd() / "benchmarks", Path(__file__).resolve().parents[1] / "benchmarks"):
        if (folder / "conftest.py").is_file():
            return folder
    return None


def _run_benchmark_suite(pytest_args: list[str]) -> int:
    import importlib.util

    folder = _benchmarks_folder()
    if folder is None:
        raise CommandError("bench --pytest runs the benchmark suite of a source checkout (benchmarks/ is not "
                           "installed with the package): git clone the beitfast repository, pip install -e "
                           "'.[dev]' in it and run this there; `beitfast bench` without --pytest times "
                           "pre-training steps here")
    missing = [package for module, package in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise CommandError(f"bench --pytest needs {' and '.join(missing)}: pip install 'beitfast[dev]' (or "
                           f"pip install {' '.join(missing)})")
    # Run from inside the suite's folder: the checkout's root on sys.path would let its top-level kernels/
    # shadow the Hugging Face package of that name.
    return subprocess.call([sys.executable, "-m", "pytest", str(folder), *pytest_args], cwd=folder)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.pytest:
        return _run_benchmark_suite(args.pytest_args)
    if args.calibrate:
        from .calibrate import calibrate

        table = calibrate(_device(args.device), output=args.output, warmup=args.warmup, repeats=args.steps)
        print(json.dumps({key: table[key] for key in ("gpu", "preference", "timings_ms", "skipped", "path")}))
        return 0
    if args.data:
        return _bench_data(args)
    from .config import BEiTConfig
    from .data import masking_for
    from .masking import MaskingGenerator
    from .model import BEiT

    device = resolve_device(args.device)
    _fill(args, _defaults(BENCH_GPU_DEFAULTS, BENCH_CPU_DEFAULTS, args.device))
    overrides = {"depth": args.depth} if args.depth is not None else {}
    config = getattr(BEiTConfig, args.model)(img_size=args.img_size, patch_size=args.patch_size, kernels=args.kernels,
                                             **overrides)
    model = BEiT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    masks = MaskingGenerator(**masking_for(config.grid), seed=0).batch(args.batch_size).to(device)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, config.num_patches), device=device)
    use_bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(images, bool_masked_pos=masks, labels=tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - started) / args.steps
    result = {"model": args.model, "depth": config.depth, "img_size": args.img_size, "batch_size": args.batch_size,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "precision": "bf16 autocast" if use_bf16 else "fp32", "step_ms": seconds * 1e3,
              "images_per_s": args.batch_size / seconds, "torch": torch.__version__}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))
    return 0


# -- argument parsing ------------------------------------------------------------------------------


SEGMENT_GPU_DEFAULTS = {"batch_size": 16, "steps": 160_000, "warmup_steps": 1500, "lr": 7e-4, "crop": 512,
                        "scale": [2048, 512]}
SEGMENT_CPU_DEFAULTS = {"batch_size": 4, "steps": 200, "warmup_steps": 20, "lr": 7e-4, "crop": 64,
                        "scale": [256, 64]}
SEGMENT_MODEL_NAME = "model.safetensors"
# segment train --demo: a short pre-training of the embedded photographs (kept in OUTPUT/pretrain and
# reused by the next demo), then a fine-tuning on the embedded scenes with narrow heads (the official
# width, the backbone's, would cost most of a CPU step at 64 px).
SEGMENT_DEMO_OUTPUT = "segment-demo-output"
SEGMENT_DEMO_DEFAULTS = {**SEGMENT_CPU_DEFAULTS, "steps": 150, "batch_size": 8}
SEGMENT_DEMO_PRETRAIN = ["--steps", "100", "--batch-size", "16", "--seed", "0"]
SEGMENT_DEMO_HEAD_CHANNELS = 64
SEGMENT_DEMO_OVERLAYS = 4


def _segmentation_source(data: str, option: str, split: str, num_classes: int | None,
                         reduce_zero_label: bool):
    """``data``: 'embedded' (the scenes of :func:`beitfast.segmentation.embedded.embedded_scenes`), an
    ADE20K root (images/<split>, annotations/<split>; reduce_zero_label, 150 classes by default) or a
    folder with ``images/`` and ``masks/`` of the same file stems."""
    from .segmentation.data import SegmentationFolder, ade20k

    if data == "embedded":
        from .segmentation.embedded import EMBEDDED_CLASSES, embedded_scenes

        if num_classes not in (None, len(EMBEDDED_CLASSES)):
            raise CommandError(f"{option} embedded has {len(EMBEDDED_CLASSES)} classes, --num-classes says "
                               f"{num_classes}")
        try:
            source = embedded_scenes(split)
        except ImportError as error:  # scikit-image and scikit-learn are the optional data extra
            raise CommandError(f"{option} embedded: {error}") from error
        _log_found(source)
        return source
    if _is_shards(data):
        from .shards import ShardedSegmentation

        source = ShardedSegmentation(data)
        if num_classes not in (None, source.num_classes):
            raise CommandError(f"{option} {data!r} has {source.num_classes} classes, --num-classes says "
                               f"{num_classes}")
        _log_found(source)
        return source
    root = Path(data)
    if (root / "images" / split).is_dir() and (root / "annotations" / split).is_dir():
        return ade20k(root, split, num_classes or 150)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        if num_classes is None:
            raise CommandError(f"{option} {data!r}: --num-classes is needed for an images/ + masks/ folder")
        return SegmentationFolder(root / "images", root / "masks", num_classes, reduce_zero_label)
    raise CommandError(f"{option} {data!r} is neither an ADE20K root (images/{split} and "
                       f"annotations/{split}) nor a folder with images/ and masks/ sub-folders")


def _segment_report(model, source, args, what: str) -> dict:
    from .segmentation.data import SegmentationTestTransform
    from .segmentation.metrics import format_table
    from .segmentation.task import evaluate_segmentation

    numbers = evaluate_segmentation(model, source, SegmentationTestTransform(tuple(args.scale)), args.mode,
                                    args.crop_eval, args.stride, device=args.device)
    _log(format_table(numbers, numbers["classes"]))
    _log(f"{what} on {numbers['images']} images ({args.mode}): mIoU {100 * numbers['mIoU']:.2f}, mAcc "
         f"{100 * numbers['mAcc']:.2f}, aAcc {100 * numbers['aAcc']:.2f}")
    # JSON has no NaN: an undefined per-class number is null.
    return json.loads(json.dumps(numbers).replace("NaN", "null"))


def _segment_demo_pretrained(args, output: Path) -> str:
    """The demo's pre-trained BEiT: OUTPUT/pretrain/checkpoint.pt, pre-trained now on the embedded
    photographs, or continued or reused as an earlier demo left it (``--resume auto``)."""
    from .train import CHECKPOINT_NAME

    folder = output / "pretrain"
    _log(f"demo: pre-training a small BEiT on the embedded photographs in {folder}/ (reused when done)")
    pretrain_args = build_parser().parse_args([
        "pretrain", "--output", str(folder), "--device", args.device, "--resume", "auto",
        *SEGMENT_DEMO_PRETRAIN, *(["--no-progress"] if args.no_progress else []),
    ])
    cmd_pretrain(pretrain_args)
    return str(folder / CHECKPOINT_NAME)


def _segment_demo_overlays(model, source, args, output: Path) -> list[Path]:
    """Pictures of the first validation scenes: the scene, its true labels and the predicted ones
    (colours blended on the scene), side by side, enlarged four times."""
    import io

    import numpy as np
    from PIL import Image

    from .segmentation.data import SegmentationTestTransform, image_tensor
    from .segmentation.task import predict_labels
    from .segmentation.visualize import overlay, palette
    from .train import write_bytes_atomically

    colours = palette(source.num_classes)
    transform = SegmentationTestTransform(tuple(args.scale))
    model.eval()
    written = []
    for i in range(min(SEGMENT_DEMO_OVERLAYS, len(source))):
        image, truth = source.load(i), source.mask(i)
        predicted = predict_labels(model, transform(image_tensor(image)), truth.shape, args.mode).cpu()
        parts = [np.asarray(image), np.asarray(overlay(image, truth, colours, 0.6)),
                 np.asarray(overlay(image, predicted, colours, 0.6))]
        strip = Image.fromarray(np.concatenate(parts, axis=1))
        strip = strip.resize((strip.width * 4, strip.height * 4), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        strip.save(buffer, format="PNG")
        written.append(output / f"overlay-{i:03d}.png")
        write_bytes_atomically(written[-1], buffer.getvalue())
    return written


def _check_resume_classes(args, num_classes: int) -> None:
    """A run resumed with another class count would fail deep in the state-dict load: refused here, in a
    line naming the checkpoint."""
    from .train import CHECKPOINT_NAME

    path = Path(args.output) / CHECKPOINT_NAME if args.resume == "auto" else Path(args.resume)
    if args.resume == "none" or not path.is_file():
        return
    weight = torch.load(path, map_location="cpu", weights_only=True).get("model", {}).get(
        "decode_head.conv_seg.weight")
    if weight is not None and weight.shape[0] != num_classes:
        raise CommandError(f"the checkpoint {str(path)!r} to resume was trained for {weight.shape[0]} "
                           f"classes, --data has {num_classes}: give another --output, or --resume none "
                           f"--overwrite to start afresh")


def cmd_segment_train(args: argparse.Namespace) -> int:
    from .model import BEiT
    from .segmentation import BEiTForSegmentation
    from .segmentation.data import SegmentationTrainTransform, segmentation_stream
    from .segmentation.task import segmentation_trainer
    from .train import CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, setup_distributed

    started = time.perf_counter()
    if args.demo:
        _demo_settings(args, SEGMENT_DEMO_OUTPUT)  # its pre-trained model is reused
        args.data = args.data or "embedded"
        args.val_data = args.val_data or ("embedded" if args.data == "embedded" else None)
        args.head_channels = args.head_channels or SEGMENT_DEMO_HEAD_CHANNELS
    for option, value in (("--pretrained", args.pretrained), ("--data", args.data)):
        if value is None and not (args.demo and option == "--pretrained"):
            raise CommandError(f"{option} is required (or --demo)")
    args.output = args.output or "beitfast-segment"
    _check_device(args)
    given = _fill(args, SEGMENT_DEMO_DEFAULTS if args.demo else
                  _defaults(SEGMENT_GPU_DEFAULTS, SEGMENT_CPU_DEFAULTS, args.device))
    args.resume = args.resume or "auto"
    train_config = _train_config(args, args.output, layer_decay=args.layer_decay)
    if args.pretrained is None:
        _check_run_paths(args, Path(args.output), replaced=(SEGMENT_MODEL_NAME, EVAL_NAME))  # before minutes
        args.pretrained = _segment_demo_pretrained(args, Path(args.output))
    if not Path(args.pretrained).exists():
        raise FileNotFoundError(f"--pretrained: {args.pretrained!r} does not exist (BEiT weights of any "
                                f"task, or a checkpoint.pt of `beitfast pretrain`)")
    train_set = _segmentation_source(args.data, "--data", "training", args.num_classes,
                                     args.reduce_zero_label)
    val_set = (_segmentation_source(args.val_data, "--val-data", "validation", train_set.num_classes,
                                    args.reduce_zero_label) if args.val_data else None)
    _check_batch_size(args.batch_size, train_set, args.data, "batch_size" in given)
    _check_run_paths(args, Path(args.output), replaced=(SEGMENT_MODEL_NAME, EVAL_NAME))
    _check_resume_classes(args, train_set.num_classes)
    backbone = BEiT.from_file(args.pretrained).config
    # The official fine-tuning backbone: a relative position bias table per layer, at the crop size.
    config = backbone.replace(img_size=args.crop, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                              drop_path_rate=args.drop_path, use_mean_pooling=False, **_fast_step(args))
    out_indices = _segment_out_indices(config.depth)
    torch.manual_seed(args.seed)  # the same new neck and heads on every rank
    heads = {"channels": args.head_channels, "auxiliary_channels": args.head_channels} if args.head_channels \
        else {}
    model = BEiTForSegmentation.from_backbone(args.pretrained, config, num_classes=train_set.num_classes,
                                              out_indices=out_indices, **heads)
    ctx = setup_distributed()
    transform = SegmentationTrainTransform(args.crop, tuple(args.scale))
    stream = segmentation_stream(train_set, transform, args.batch_size, seed=args.seed, rank=ctx.rank,
                                 world_size=ctx.world_size)
    _log(f"segmentation fine-tuning on {len(train_set)} images of {train_set.num_classes} classes, crops of "
         f"{args.crop} px, for {args.steps} steps")
    output = Path(args.output)

    def save_model(step, record):  # beside each checkpoint: the weights and both configs, for eval/predict
        if _main_process() and (step % train_config.checkpoint_every == 0 or step == train_config.steps):
            model.save(output / SEGMENT_MODEL_NAME)

    trainer = segmentation_trainer(model, stream, train_config, on_step=save_model)
    records = trainer.fit()
    _log(f"done: {_summary(trainer, records)}")
    if val_set is not None:
        args.crop_eval = None
        numbers = _segment_report(model, val_set, args, "validation")
        if _main_process():
            _save_validation(output, {"step": trainer.step, **numbers})
    if _main_process():
        _print_outputs(output, ((CHECKPOINT_NAME, "checkpoint"), (SEGMENT_MODEL_NAME, "model"),
                                (METRICS_NAME, "metrics"), (PLOT_NAME, "plot"), (EVAL_NAME, "validation")))
        if args.demo and val_set is not None:
            pictures = _segment_demo_overlays(model, val_set, args, output)
            print(f"{'overlays':>10}: {pictures[0].resolve()} ... (scene, truth, prediction)")
            print(f"demo done in {time.perf_counter() - started:.0f} s: validation mIoU "
                  f"{100 * numbers['mIoU']:.2f} on {numbers['images']} held-out scenes")
    return 0


def _segment_out_indices(depth: int) -> tuple[int, ...]:
    """The blocks feeding the neck: the official ones for 12 and 24 blocks, else the ends of each quarter."""
    from .segmentation.config import default_out_indices

    return (default_out_indices(depth) if depth in (12, 24)
            else tuple(max(depth * k // 4 - 1, 0) for k in (1, 2, 3, 4)))


def _segment_model(path: str):
    """``--model``: a segmentation model file, or the checkpoint.pt of `segment train` (verified; its
    backbone config is stored, the neck's blocks are those segment train picks for the depth and the
    heads' widths and classes follow from the shapes)."""
    from .checkpoint import read_training_checkpoint
    from .config import BEiTConfig
    from .segmentation import BEiTForSegmentation

    if not Path(path).exists():
        raise FileNotFoundError(f"--model: {path!r} does not exist (a segmentation model file, e.g. "
                                f"{SEGMENT_MODEL_NAME} of `beitfast segment train`, or its checkpoint.pt)")
    if Path(path).suffix == ".pt":
        try:
            payload = read_training_checkpoint(path)
        except ValueError:  # not a trainer's checkpoint: a model file of another code
            payload = None
        if payload is not None:
            if payload.get("task") != "segment":
                raise CommandError(f"--model: {path!r} is a checkpoint of {payload.get('task')!r} training, "
                                   f"not of `segment train`")
            config = BEiTConfig.from_dict(payload["model_config"])
            return BEiTForSegmentation.from_file(path, config, out_indices=_segment_out_indices(config.depth))
    return BEiTForSegmentation.from_file(path)


def cmd_segment_eval(args: argparse.Namespace) -> int:
    from .train import write_bytes_atomically

    resolve_device(args.device)
    model = _segment_model(args.model)
    source = _segmentation_source(args.data, "--data", "validation", model.segmentation_config.num_classes,
                                  args.reduce_zero_label)
    if source.num_classes != model.segmentation_config.num_classes:
        raise CommandError(f"--data has {source.num_classes} classes, --model {args.model!r} "
                           f"{model.segmentation_config.num_classes}")
    args.scale = args.scale or [2048, 512]
    args.crop_eval = args.crop
    numbers = _segment_report(model, source, args, "evaluation")
    if _main_process():
        write_bytes_atomically(Path(args.output), (json.dumps(numbers, indent=1) + "\n").encode())
        print(f"{'metrics':>10}: {Path(args.output).resolve()}")
    return 0


def cmd_segment_predict(args: argparse.Namespace) -> int:
    import io

    from PIL import Image

    from .data import IMAGE_EXTENSIONS, decode_rgb, find_images
    from .segmentation.data import SegmentationTestTransform, image_tensor
    from .segmentation.task import predict_labels
    from .segmentation.visualize import mask_image, overlay, palette
    from .train import ensure_writable, write_bytes_atomically

    device = resolve_device(args.device)
    if args.images == "embedded":
        from .segmentation.embedded import embedded_scenes

        scenes = embedded_scenes("validation").images
        named = [(f"scene-{i:03d}", lambda image=image: image) for i, image in enumerate(scenes)]
    else:
        source = Path(args.images)
        paths = [source] if source.is_file() else find_images(source, IMAGE_EXTENSIONS)[0] \
            if source.is_dir() else []
        if not paths:
            raise CommandError(f"--images {args.images!r}: no image file or folder of images there")

        def read(path):
            with Image.open(path) as opened:
                return decode_rgb(opened)

        named = [(path.stem, lambda path=path: read(path)) for path in paths]
    if not 0 <= args.opacity <= 1:
        raise CommandError(f"--opacity must be in [0, 1], got {args.opacity}")
    model = _segment_model(args.model).eval().to(device)
    colours = palette(model.segmentation_config.num_classes)
    transform = SegmentationTestTransform(tuple(args.scale or (2048, 512)))
    output = Path(args.output)
    ensure_writable(output)
    for stem, load in named:
        image = load()
        labels = predict_labels(model, transform(image_tensor(image)), (image.height, image.width),
                                args.mode, args.crop, args.stride).cpu()
        for name, picture in ((f"{stem}.png", mask_image(labels, colours)),
                              (f"{stem}-overlay.png", overlay(image, labels, colours, args.opacity))):
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            write_bytes_atomically(output / name, buffer.getvalue())
    print(f"{len(named)} image(s): label masks (palette PNGs, values = classes) and overlays in "
          f"{output.resolve()}")
    return 0


def _add_training_options(parser: argparse.ArgumentParser, gpu: dict, cpu: dict,
                          schedule: str = "per-step cosine schedule with linear warmup", min_lr: float = 1e-5,
                          clip_grad: float = 3.0) -> None:
    group = parser.add_argument_group(f"optimisation (AdamW 0.9/0.999, {schedule})")
    group.add_argument("--steps", type=int, help=f"optimizer steps {_both('steps', gpu, cpu)}")
    group.add_argument("--batch-size", type=int,
                       help=f"global batch size, split over torchrun processes {_both('batch_size', gpu, cpu)}")
    group.add_argument("--lr", type=float, help=f"peak learning rate {_both('lr', gpu, cpu)}")
    group.add_argument("--min-lr", type=float, default=min_lr,
                       help=f"final learning rate of the schedule (default: {min_lr:g})")
    group.add_argument("--warmup-steps", type=int, help=f"linear warmup steps {_both('warmup_steps', gpu, cpu)}")
    group.add_argument("--weight-decay", type=float, default=0.05,
                       help="AdamW weight decay, not applied to biases, norms, layer scales and tokens (default: 0.05)")
    group.add_argument("--clip-grad", type=float, default=clip_grad,
                       help=f"gradient norm clip, 0 disables (default: {clip_grad:g})")
    group.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate (default: 0.1)")
    run = parser.add_argument_group("run")
    run.add_argument("--overwrite", action="store_true",
                     help="with --resume none, replace the checkpoints and metrics of an earlier run in "
                          "--output (refused without it)")
    run.add_argument("--checkpoint-every", type=int, default=500,
                     help="write the resumable checkpoint every N steps, and at the end (default: 500)")
    run.add_argument("--resume", help="'auto': continue from OUTPUT/checkpoint.pt if present; a checkpoint path; "
                                      "'none': start afresh (default: auto; none with --demo)")
    run.add_argument("--seed", type=int, default=0, help="seed of the data, masks, initial weights, drop path (default: 0)")
    run.add_argument("--workers", type=int, default=0,
                     help="DataLoader worker processes preparing batches (default: 0 = in the training process)")
    run.add_argument("--device", default="auto", help="'auto' (the GPU if any, else CPU), 'cpu', 'cuda', 'cuda:1'...")
    run.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                     help="'auto': bf16 autocast on GPU, fp32 on CPU")
    run.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                     help="under torchrun: DistributedDataParallel or FSDP (for large models) (default: ddp)")
    run.add_argument("--kernels", default="auto",
                     help="backend of every fused op: 'auto' (fastest available) or a name such as eager, triton, "
                          "cuda, sdpa (default: auto)")
    run.add_argument("--threads", type=int,
                     help="CPU threads of each process for tensor math (default: PyTorch's choice; 1 helps on a "
                          "machine shared with other jobs)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar: one line of progress every --log-every steps instead")
    run.add_argument("--log-every", type=int,
                     help="with --no-progress, steps between progress lines (default: a twentieth of the run, at "
                          "least one line per checkpoint)")
    speed = parser.add_argument_group("speed (see README, \"Fast step\")")
    speed.add_argument("--fuse-blocks", default="auto", choices=("auto", "compile", "off"),
                       help="each Transformer block through Inductor: 'auto' on CUDA only (default: auto)")
    speed.add_argument("--residual-dtype", default="float32", choices=("float32", "autocast"),
                       help="dtype of the residual stream: float32 (official) or the autocast dtype (default: float32)")
    speed.add_argument("--checkpoint-blocks", type=int, default=0,
                       help="recompute the activations of the first N blocks in backward, -1: all (default: 0)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the whole model (and the DALL-E tokenizer's encoder)")
    speed.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (fixed shapes; CUDA only)")
    speed.add_argument("--fp8", action="store_true",
                       help="float8 linear layers in the blocks (torchao, rowwise scaling; CUDA, compute capability "
                            ">= 8.9)")
    speed.add_argument("--no-fused-optimizer", action="store_true", help="AdamW without its fused kernel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beitfast",
        description="Pre-train and fine-tune BEiT models (masked image modeling over visual tokens). "
                    "Multi-GPU: torchrun --nproc-per-node N $(which beitfast) pretrain ...",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="pretrain | finetune | tokenizer | bench | data | segment "
                                          "(each has --help)")

    pre = commands.add_parser(
        "pretrain", help="masked image modeling pre-training",
        description="Pre-train BEiT: blockwise-masked patches, visual tokens of a tokenizer as targets. Writes "
                    "checkpoint.pt (resumable), metrics.jsonl, curves.png and the tokenizer to --output.",
    )
    pre.add_argument("--demo", action="store_true",
                     help="the main job: on CPU, fit a k-means tokenizer on the embedded photographs and pre-train a "
                          "small BEiT on them in a few minutes, writing to ./demo-output (other options still apply)")
    data = pre.add_argument_group("data and tokenizer")
    data.add_argument("--data", help="'embedded' (photographs shipped with scikit-image and scikit-learn), an image "
                                     "folder, searched recursively, or shards from `beitfast data pack` (a .tar "
                                     "file or a folder of them) (default: embedded)")
    data.add_argument("--tokenizer", help="'kmeans' (fit on the data, saved to OUTPUT/tokenizer.safetensors) or a file "
                                          "load_tokenizer reads: a saved tokenizer or the DALL-E encoder.pkl "
                                          "(default: kmeans)")
    data.add_argument("--vocab-size", type=int, help=f"k-means vocabulary {_both('vocab_size')}")
    data.add_argument("--allow-tokenizer-change", action="store_true",
                      help="resume with a tokenizer other than the one the checkpoint was trained with "
                           "(refused without it: the targets would change mid-run)")
    data.add_argument("--tokenizer-size", type=int, help=f"tokenizer view size in pixels {_both('tokenizer_size')}")
    data.add_argument("--tokenizer-patch-size", type=int,
                      help=f"pixels per token side in the tokenizer view {_both('tokenizer_patch_size')}")
    data.add_argument("--tokenizer-images", type=int,
                      help=f"random views the k-means tokenizer is fitted on {_both('tokenizer_images')}")
    data.add_argument("--tokenizer-iters", type=int, default=100, help="mini-batch k-means iterations (default: 100)")
    data.add_argument("--mask-ratio", type=float, default=0.4,
                      help="fraction of patches masked, blockwise (default: 0.4, i.e. 75 of 196)")
    data.add_argument("--input-path", default="auto", choices=INPUT_PATHS,
                      help="where the two views are made: 'cpu' (decoded and augmented in the --workers "
                           "processes), 'device' (the workers read the JPEGs and draw the augmentation; "
                           "decode (nvJPEG) and views on the training device); 'auto': device on CUDA, else "
                           "cpu (default: auto)")
    model = pre.add_argument_group("model")
    model.add_argument("--model", choices=("tiny", "small", "base", "large"),
                       help=f"size preset: dim 192/384/768/1024 {_both('model')}")
    model.add_argument("--depth", type=int, help="number of blocks (default: the preset's, 4 on CPU)")
    model.add_argument("--img-size", type=int, help=f"model view size in pixels {_both('img_size')}")
    model.add_argument("--patch-size", type=int, help=f"patch size in pixels {_both('patch_size')}")
    pre.add_argument("--output", help=f"output folder (default: ./beitfast-pretrain; ./{DEMO_OUTPUT} with --demo)")
    _add_training_options(pre, GPU_DEFAULTS, CPU_DEFAULTS)
    pre.set_defaults(func=cmd_pretrain)

    fine = commands.add_parser(
        "finetune", help="fine-tune or linearly probe a pre-trained model on labelled images",
        description="Classification on an image folder with one sub-folder per class: mean pooling, layer-wise lr "
                    "decay, label smoothing; or a linear probe (only the classifier trains).",
    )
    fine.add_argument("--pretrained", required=True,
                      help="a checkpoint.pt of `beitfast pretrain`, or any BEiT weights file or Hugging Face "
                           "model folder BEiT.from_file reads (a classifier's head of another class count is "
                           "dropped)")
    fine.add_argument("--data", required=True, help="training images: a folder with one sub-folder per class")
    fine.add_argument("--val-data", help="validation images (same classes); top-1 accuracy reported at the end")
    fine.add_argument("--output", default="beitfast-finetune", help="output folder (default: ./beitfast-finetune)")
    fine.add_argument("--linear-probe", action="store_true", help="freeze the backbone, train the classifier only")
    fine.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (default: 0.65)")
    fine.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    _add_training_options(fine, FINETUNE_GPU_DEFAULTS, FINETUNE_CPU_DEFAULTS)
    fine.set_defaults(func=cmd_finetune)

    tok = commands.add_parser("tokenizer", help="visual tokenizers")
    tok_commands = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION",
                                      help="train: fit a k-means tokenizer")
    train = tok_commands.add_parser("train", help="fit a k-means patch tokenizer on images",
                                    description="Fit a k-means tokenizer on random views of the images and save it "
                                                "(safetensors) for `beitfast pretrain --tokenizer FILE`.")
    train.add_argument("--data", default="embedded", help="'embedded' or an image folder (default: embedded)")
    train.add_argument("--output", default=TOKENIZER_NAME, help=f"file to write (default: ./{TOKENIZER_NAME})")
    train.add_argument("--vocab-size", type=int, default=8192, help="number of tokens (default: 8192)")
    train.add_argument("--tokenizer-size", type=int, default=112, help="tokenizer view size in pixels (default: 112)")
    train.add_argument("--tokenizer-patch-size", type=int, default=8, help="pixels per token side (default: 8)")
    # The defaults fit in minutes on a 2-core CPU (see the README); more views and iterations fit a little better.
    train.add_argument("--tokenizer-images", type=int, default=4000,
                       help="random augmented views to fit on (default: 4000)")
    train.add_argument("--tokenizer-iters", type=int, default=30, help="mini-batch k-means iterations (default: 30)")
    train.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    train.set_defaults(func=cmd_tokenizer_train)

    bench = commands.add_parser(
        "bench", help="time pre-training steps, or run the benchmark suite",
        description="Times forward+backward+AdamW steps of BEiT pre-training on random data (tokenizer and data "
                    "loading excluded) and prints one JSON line; --pytest runs `pytest benchmarks/` instead; "
                    "--calibrate measures the fused ops' backends and writes the auto-dispatch table.",
    )
    bench.add_argument("--model", choices=("tiny", "small", "base", "large"), help=f"size preset {_both('model')}")
    bench.add_argument("--depth", type=int, help="number of blocks (default: the preset's, 4 on CPU)")
    bench.add_argument("--img-size", type=int, help=f"image size {_both('img_size')}")
    bench.add_argument("--patch-size", type=int, help=f"patch size {_both('patch_size')}")
    bench.add_argument("--batch-size", type=int,
                       help=f"batch size {_both('batch_size', BENCH_GPU_DEFAULTS, BENCH_CPU_DEFAULTS)}")
    bench.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    bench.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    bench.add_argument("--kernels", default="auto", help="backend of every fused op (default: auto)")
    bench.add_argument("--threads", type=int, help="CPU threads for tensor math (default: PyTorch's choice)")
    bench.add_argument("--pytest", action="store_true",
                       help="run `pytest benchmarks/` (GPU suites) of a source checkout: ./benchmarks or "
                            "the checkout of an editable install; needs pytest and pytest-benchmark (the dev "
                            "extra)")
    bench.add_argument("--calibrate", action="store_true",
                       help="time every backend of every fused op (fwd+bwd, BEiT-B sizes, --warmup and "
                            "--steps calls) and write the dispatcher's auto order for this GPU (GPU only)")
    bench.add_argument("--output", help="with --calibrate: the table to write (default: the package's file "
                                        "for this GPU, beitfast/ops/preferences/<GPU name>.json)")
    bench.add_argument("--data", action="store_true",
                       help="time the input pipeline alone (today's PIL path, the fast CPU path and, on a GPU, the "
                            "device path, on JPEGs written from the embedded photographs; --steps batches of "
                            "--batch-size, default 32) and the tokenizers alone; one JSON line per path")
    bench.add_argument("--data-workers", type=int,
                       help="with --data: DataLoader processes for the total rate (default: one per CPU core)")
    bench.add_argument("pytest_args", nargs="*", help="extra pytest arguments with --pytest")
    bench.set_defaults(func=cmd_bench)

    data = commands.add_parser("data", help="data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION",
                                        help="pack: write an image folder as tar shards")
    pack = data_commands.add_parser(
        "pack", help="write an image folder as WebDataset-layout tar shards",
        description="Copy every image of FOLDER (recursive) into tar shards OUTPUT/shard-000000.tar, ... "
                    "(<key>.<ext>, and <key>.cls with --labelled), read by beitfast.shards.ShardedImages.")
    pack.add_argument("folder", help="the image folder")
    pack.add_argument("output", help="the folder to write the shards to")
    pack.add_argument("--images-per-shard", type=int, default=1000, help="images per shard (default: 1000)")
    pack.add_argument("--labelled", action="store_true",
                      help="the first-level sub-folders are classes: write each image's class index")
    pack.add_argument("--masks",
                      help="segmentation pairs: the folder of masks with the images' file stems (and "
                           "sub-folders); each mask is checked and written beside its image as "
                           "<key>.seg.png, for `segment train --data OUTPUT`")
    pack.add_argument("--num-classes", type=int, help="with --masks: the class count of the masks")
    pack.add_argument("--reduce-zero-label", action="store_true",
                      help="with --masks: label 0 is 'other' (ignored), the others go down by one (ADE20K)")
    pack.set_defaults(func=cmd_data_pack)

    seg = commands.add_parser("segment", help="semantic segmentation: fine-tune (UPerNet), evaluate (mIoU)")
    seg_commands = seg.add_subparsers(dest="segment_command", required=True, metavar="ACTION",
                                      help="train: fine-tune a pre-trained BEiT; eval: mIoU of a model; "
                                           "predict: masks and overlays")
    seg_train = seg_commands.add_parser(
        "train", help="fine-tune a pre-trained BEiT for semantic segmentation",
        description="The official ADE20K recipe: UPerNet + auxiliary FCN head, layer-wise lr decay 0.65, "
                    "poly schedule with linear warmup, random resize/crop (cat_max_ratio 0.75)/flip/"
                    "photometric distortion. Writes checkpoint.pt (resumable), metrics.jsonl, curves.png, "
                    f"{SEGMENT_MODEL_NAME} (the model for segment eval and predict, with each checkpoint) "
                    f"and, with --val-data, {EVAL_NAME}.")
    seg_train.add_argument("--demo", action="store_true",
                           help="on CPU: pre-train a small BEiT on the embedded photographs (or reuse "
                                "--pretrained, or the one an earlier demo left in OUTPUT/pretrain), "
                                "fine-tune it on the embedded scenes, evaluate on the held-out ones and "
                                f"write overlays, in minutes, to ./{SEGMENT_DEMO_OUTPUT} (other options still "
                                f"apply)")
    seg_train.add_argument("--pretrained",
                           help="BEiT weights of any task (a checkpoint.pt of `beitfast pretrain`, official, "
                                "timm or Hugging Face); neck and heads are new (required without --demo)")
    seg_train.add_argument("--data",
                           help="'embedded' (scenes composed from the embedded photographs, 6 classes), an "
                                "ADE20K root (images/training, annotations/training), a folder with images/ "
                                "and masks/ (same file stems) or shards of `data pack --masks` (required "
                                "without --demo)")
    seg_train.add_argument("--val-data", help="validation data, same forms (embedded, ADE20K: the "
                                              "validation split); evaluated at the end")
    seg_train.add_argument("--output", help=f"output folder (default: ./beitfast-segment; "
                                            f"./{SEGMENT_DEMO_OUTPUT} with --demo)")
    seg_train.add_argument("--head-channels", type=int,
                           help=f"width of the UPerNet and auxiliary FCN heads (default: the official, the "
                                f"backbone's width and 256; {SEGMENT_DEMO_HEAD_CHANNELS} with --demo)")
    seg_train.add_argument("--layer-decay", type=float, default=0.65,
                           help="layer-wise lr decay (default: 0.65; 0.9 with lr 3e-5 for intermediate "
                                "fine-tuned checkpoints)")
    seg_train.add_argument("--crop", type=int, help="training crop and model input size in pixels "
                           + _both("crop", SEGMENT_GPU_DEFAULTS, SEGMENT_CPU_DEFAULTS))
    seg_eval = seg_commands.add_parser(
        "eval", help="mIoU, per-class IoU and accuracy of a segmentation model",
        description="Each image resized to fit --scale, segmented by sliding windows (or whole), the logits "
                    "resized back to the mask; prints the per-class table and writes the numbers as JSON.")
    seg_eval.add_argument("--model", required=True,
                          help=f"a segmentation model file ({SEGMENT_MODEL_NAME} or checkpoint.pt of "
                               f"`segment train`, official/mmseg or Hugging Face)")
    seg_eval.add_argument("--data", required=True,
                          help="'embedded' (its validation scenes), an ADE20K root (its validation split) or "
                               "a folder with images/ and masks/")
    seg_eval.add_argument("--output", default="segment-eval.json",
                          help="JSON to write (default: ./segment-eval.json)")
    seg_eval.add_argument("--crop", type=int,
                          help="sliding window size (default and largest: the model's input)")
    seg_eval.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1'...")
    seg_eval.add_argument("--threads", type=int,
                          help="CPU threads for tensor math (default: PyTorch's choice)")
    seg_predict = seg_commands.add_parser(
        "predict", help="label masks and overlays of images",
        description="Writes OUTPUT/<stem>.png (the labels as a palette PNG: values are classes, colours by "
                    "class) and OUTPUT/<stem>-overlay.png (the colours blended on the image) for each image.")
    seg_predict.add_argument("--model", required=True, help="a segmentation model file (as segment eval)")
    seg_predict.add_argument("--images", required=True,
                             help="an image file, a folder (searched recursively) or 'embedded' (the "
                                  "validation scenes of the embedded task)")
    seg_predict.add_argument("--output", default="segment-predictions",
                             help="folder to write to (default: ./segment-predictions)")
    seg_predict.add_argument("--opacity", type=float, default=0.5,
                             help="of the colours in overlays (default: 0.5)")
    seg_predict.add_argument("--crop", type=int,
                             help="sliding window size (default and largest: the model's input)")
    seg_predict.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1'...")
    for parser_ in (seg_train, seg_eval):
        parser_.add_argument("--num-classes", type=int,
                             help="classes of an images/ + masks/ folder (ADE20K: 150; eval: the model's)")
        parser_.add_argument("--reduce-zero-label", action="store_true",
                             help="images/ + masks/ folder: label 0 is 'other' (ignored), the others go down "
                                  "by one (always on for ADE20K)")
    for parser_ in (seg_train, seg_eval, seg_predict):
        parser_.add_argument("--mode", default="slide", choices=("slide", "whole"),
                             help="evaluation: sliding windows (official) or the whole image (default: "
                                  "slide)")
        parser_.add_argument("--stride", type=int,
                             help="sliding window stride (default: 2/3 of the window: 341 for 512, 426 for "
                                  "640)")
        parser_.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                             help="images are resized keeping their aspect ratio to fit LONG x SHORT "
                                  + _both("scale", SEGMENT_GPU_DEFAULTS, SEGMENT_CPU_DEFAULTS)
                                  + " (eval and predict default: 2048 512)")
    # The official schedule: poly (power 1) down to 0 after a linear warmup; no gradient clipping.
    _add_training_options(seg_train, SEGMENT_GPU_DEFAULTS, SEGMENT_CPU_DEFAULTS,
                          schedule="per-step poly schedule, power 1, with linear warmup", min_lr=0.0,
                          clip_grad=0.0)
    seg_train.set_defaults(func=cmd_segment_train)
    seg_eval.set_defaults(func=cmd_segment_eval)
    seg_predict.set_defaults(func=cmd_segment_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    action = getattr(args, f"{args.command}_command", None)  # of "tokenizer train", "data pack"
    command = f"{args.command} {action}" if action else args.command

    def one_line(message, category, filename, lineno, file=None, line=None):  # a warning as the errors are
        print(f"beitfast {command}: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)

    try:
        _check_counts(args)
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return args.func(args)
    # Expected failures (bad values, files, folders, disk, missing optional packages): one line, no traceback.
    except (CommandError, ValueError, OSError) as error:
        print(f"beitfast {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"beitfast {command}: stopped: {error}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError as error:
        print(f"beitfast {command}: error: {' '.join(str(error).split())} (a smaller --batch-size needs less "
              f"memory)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("pretrain", "finetune") or (
            args.command == "segment" and getattr(args, "segment_command", None) == "train")
        print(f"beitfast {command}: interrupted; the same command resumes from the last checkpoint"
              if resumable else f"beitfast {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
