"""The trainer: BEiT pre-training (masked image modeling), fine-tuning and linear probing.

The official recipe: AdamW (0.9, 0.999), weight decay 0.05 except on 1-D parameters, biases and
``model.no_weight_decay()``; per-step cosine learning-rate and weight-decay schedules with linear
warmup; gradient clipping at 3.0; drop path; bf16 autocast on GPU; layer-wise lr decay (0.65) and label
smoothing (0.1) for fine-tuning.

Runs are resumable exactly: a checkpoint holds the model, the optimizer, the step and the RNG states
of torch, Python and NumPy of every rank; the data stream and the masks are functions of the step
(:mod:`beitfast.data`), so a run killed and resumed reproduces the loss curve of one never stopped
(bit-identical on CPU). Pre-training's views are made in the DataLoader workers, or on the training
device a step ahead (``TrainConfig.input_path``; the default on CUDA). Under ``torchrun`` the
model is wrapped in DDP (gloo on CPU, nccl on GPU) or, when asked, FSDP; ``W`` processes with
``batch_size / W`` samples each make the updates of one process with the whole batch.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint
from ._files import (
    FileIntegrityError,
    add_digest,
    content_digest,
    keep_previous,
    remove_stale_temporaries,
    write_atomically,
)
from .config import BEiTConfig, check_bool, check_choice, check_int, check_real
from .data import (
    EvalTransform,
    ImageSource,
    TwoViewTransform,
    derive_seed,
    eval_batches,
    masking_for,
    pretrain_stream,
)
from .model import BEiT
from .ops.cross_entropy import invalid_label_count, reset_invalid_label_count
from .pipeline import INPUT_PATHS, resolve_input_path

__all__ = [
    "TrainConfig", "Trainer", "NonFiniteLossError", "cosine_schedule", "layer_id", "param_groups",
    "MaskedImageModeling", "Classification", "pretrain", "pretraining_trainer",
    "classifier_from_pretrained", "evaluate", "evaluation",
    "setup_distributed", "plot_metrics", "float8_training", "CHECKPOINT_NAME", "METRICS_NAME", "PLOT_NAME",
    "PREVIOUS_CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint-previous.pt"  # the one before: resume falls back to it
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "curves.png"
CHECKPOINT_FORMAT = checkpoint.TRAIN_CHECKPOINT_FORMAT


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; that step's update was skipped and nothing
    was saved after it."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one run. ``batch_size`` is the global batch (all processes)."""

    output_dir: str = "beitfast-output"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # None: constant weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = 3.0
    layer_decay: float | None = None  # fine-tuning: 0.65
    label_smoothing: float = 0.0  # fine-tuning: 0.1
    linear_probe: bool = False  # train the classifier only
    checkpoint_every: int = 500
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # "auto": the GPU of this rank when there is one, else CPU
    # Pre-training's input path (README "Input pipeline"): "cpu" (views made in the DataLoader workers),
    # "device" (workers read the JPEGs and draw; decode and views on the training device), "auto" (device
    # on CUDA, else cpu).
    input_path: str = "auto"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16" or "fp32"
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    progress: bool = True  # a progress bar; without it, a line every ``log_every`` steps (0: none)
    log_every: int = 0
    resume: str | None = "auto"  # "auto": the output folder's checkpoint if any; a path; None
    # Pre-training checkpoints record their tokenizer's checksum: resuming with another tokenizer (other
    # targets) is refused unless this is set.
    allow_tokenizer_change: bool = False
    # The fast step (README "Fast step"; the model's own options are in BEiTConfig):
    fused_optimizer: bool = True  # AdamW's fused kernel (one launch for every parameter; CPU and CUDA)
    compile: bool = False  # torch.compile the whole model (and a pre-training tokenizer's encoder)
    cuda_graphs: bool = False  # compile with CUDA graphs (mode "reduce-overhead"): fixed shapes, CUDA only
    fp8: bool = False  # float8 training of the blocks' linear layers (torchao, rowwise scaling), CUDA >= sm_89

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("checkpoint_every", 1),
                              ("seed", 0), ("num_workers", 0)):
            setattr(self, name, check_int(owner, name, getattr(self, name), minimum))
        real = functools.partial(check_real, owner)
        for name in ("lr", "min_lr", "weight_decay"):
            setattr(self, name, real(name, getattr(self, name), 0))
        self.eps = real("eps", self.eps, 0, low_open=True)
        self.label_smoothing = real("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        self.weight_decay_end = real("weight_decay_end", self.weight_decay_end, 0, optional=True)
        self.clip_grad = real("clip_grad", self.clip_grad, 0, low_open=True, optional=True)
        self.layer_decay = real("layer_decay", self.layer_decay, 0, 1, low_open=True, optional=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise TypeError(f"{owner}: betas must be a pair of numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(real("betas", beta, 0, 1, high_open=True) for beta in self.betas)
        for field in dataclasses.fields(self):
            if field.type == "bool":  # every switch, however many are added
                setattr(self, field.name, check_bool(owner, field.name, getattr(self, field.name)))
        check_choice(owner, "precision", self.precision, ("auto", "bf16", "fp32"))
        check_choice(owner, "parallel", self.parallel, ("ddp", "fsdp"))
        check_choice(owner, "input_path", self.input_path, INPUT_PATHS)
        self.log_every = check_int(owner, "log_every", self.log_every, 0)
        if 0 < self.warmup_steps >= self.steps:
            # The learning rate would reach its peak at the last step at best: surely not what was meant.
            raise ValueError(f"{owner}: warmup_steps ({self.warmup_steps}) must be smaller than steps "
                             f"({self.steps})")
        for name, optional in (("output_dir", False), ("resume", True)):
            value = getattr(self, name)
            if not (isinstance(value, (str, os.PathLike)) or (optional and value is None)):
                expected = "a path or None" if optional else "a path"
                raise TypeError(f"{owner}: {name} must be {expected}, got {value!r}")
        if not isinstance(self.device, (str, torch.device)):
            raise TypeError(f"{owner}: device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', "
                            f"got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"{owner}: device must be 'auto' or a torch device such as 'cpu' or "
                                 f"'cuda:0', got {self.device!r} ({error})") from None


# -- schedules and parameter groups ----------------------------------------------------------------


def cosine_schedule(step: int, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    start_warmup: float = 0.0) -> float:
    """The value at ``step`` of the official per-step schedule: ``warmup_steps`` values linearly from
    ``start_warmup`` to ``base`` (both included), then a half cosine from ``base`` towards ``final``
    over the remaining steps; ``final`` after ``total_steps``."""
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup
        return start_warmup + (base - start_warmup) * step / (warmup_steps - 1)
    decay_steps = total_steps - warmup_steps
    if step >= total_steps or decay_steps <= 0:
        return final
    progress = (step - warmup_steps) / decay_steps
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay (official rule): embeddings and tokens 0, block
    ``i`` ``i + 1``, everything else (shared bias, norms, heads) ``num_layers - 1``."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def param_groups(model: BEiT, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters, biases and ``model.no_weight_decay()``; with
    ``layer_decay``, lr scale ``layer_decay ** (depth + 1 - layer_id)``. Frozen parameters are left
    out. Each group carries ``lr_scale`` and ``decay`` (whether the wd schedule applies)."""
    skip = model.no_weight_decay()
    num_layers = model.config.depth + 2
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.dim() == 1 or name.endswith(".bias") or name in skip)
        depth = layer_id(name, num_layers) if layer_decay is not None else num_layers - 1
        scale = layer_decay ** (num_layers - 1 - depth) if layer_decay is not None else 1.0
        group = groups.setdefault((depth, decay), {
            "params": [], "names": [], "lr_scale": scale, "decay": decay,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


# -- tasks -----------------------------------------------------------------------------------------


class MaskedImageModeling:
    """Pre-training: the tokenizer (no grad) labels every patch of the tokenizer view; the model
    predicts the tokens of the masked patches. Batches: ``(views, tokenizer_views, masks)``."""

    name = "pretrain"

    def __init__(self, tokenizer, max_masked_per_image: int | None = None):
        self.tokenizer = tokenizer
        # The most patches a mask covers in an image (the masking's num_masking_patches): the loss
        # plans that many rows per image instead of every patch.
        self.max_masked_per_image = max_masked_per_image

    def check(self, config: BEiTConfig) -> None:
        tok = self.tokenizer
        if tok.vocab_size != config.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tok.vocab_size} != model vocab_size {config.vocab_size}: "
                f"build the model with vocab_size={tok.vocab_size} or use a tokenizer of {config.vocab_size} tokens"
            )
        tok_grid = (tok.input_size // tok.patch_size,) * 2
        if tok_grid != config.grid:
            raise ValueError(
                f"tokenizer grid {tok_grid[0]}x{tok_grid[1]} (input_size {tok.input_size} / patch_size "
                f"{tok.patch_size}) != model patch grid {config.grid[0]}x{config.grid[1]}"
            )

    def to(self, device: torch.device) -> None:
        self.tokenizer.to(device)

    def checksum(self) -> str:
        """SHA-256 of the tokenizer (its kind, weights and settings; of another module, its state):
        what a checkpoint records of its targets."""
        if getattr(self, "_checksum", None) is None:
            tok = self.tokenizer
            contents = tok._file_contents() if hasattr(tok, "_file_contents") else tok.state_dict()
            self._checksum = content_digest({"kind": type(tok).__name__, "contents": contents,
                                             "grid": (tok.vocab_size, tok.input_size, tok.patch_size)})
        return self._checksum

    def compile(self) -> None:
        """``torch.compile`` the tokenizer's network in place (the DALL-E encoder; the k-means tokenizer
        is one matrix product and an argmax, nothing to fuse). The trainer calls it with
        ``TrainConfig.compile``; ``beitfast bench --data`` on a GPU times the encoder both ways."""
        encoder = getattr(self.tokenizer, "encoder", None)
        if isinstance(encoder, torch.nn.Module):
            encoder.compile()

    def __call__(self, model, batch):
        views, tokenizer_views, masks = batch
        with torch.no_grad():
            tokens = self.tokenizer.tokenize(tokenizer_views).flatten(1)
        loss, accuracy = model(views, bool_masked_pos=masks, labels=tokens, return_accuracy=True,
                               max_masked_per_image=self.max_masked_per_image)
        return loss, accuracy, masks.sum()


class Classification:
    """Fine-tuning and linear probing: cross-entropy with label smoothing. Batches ``(images, labels)``."""

    name = "classify"

    def __init__(self, label_smoothing: float = 0.1):
        self.label_smoothing = label_smoothing

    def check(self, config: BEiTConfig) -> None:
        if config.num_classes <= 0:
            raise ValueError("classification needs a model with num_classes > 0")

    def to(self, device: torch.device) -> None:
        pass

    def __call__(self, model, batch):
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return loss, accuracy, torch.tensor(labels.shape[0], device=labels.device)


# -- distributed -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): nccl with GPUs, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device called ``name`` ("auto": this rank's GPU when there is one, else CPU); a CUDA device
    that is not there is a ``ValueError`` at once, not a failure after the data and tokenizer work."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA GPU is available here; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: there are {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


# -- files -----------------------------------------------------------------------------------------


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"output folder {str(folder)!r} is not writable: {error}") from error


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda temp: Path(temp).write_bytes(data))


def rng_states(device: torch.device) -> dict:
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike,
                 validation: dict | None = None) -> None:
    """Loss, accuracy and learning rate against the step, from a metrics JSONL file; a dashed line at
    every step a run resumed from (records with ``"resumed"``); ``validation`` (``evaluation``'s
    numbers, with the ``step`` they were measured at) as points on the loss and accuracy panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        return
    steps = [r["step"] for r in records]
    resumes = [r["step"] for r in records if r.get("resumed")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "accuracy", "lr"), ("loss", "accuracy", "learning rate")):
        ax.plot(steps, [r[key] for r in records], linewidth=1, label="training")
        for i, step in enumerate(resumes):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8, label="resumed" if i == 0 else None)
        if validation is not None and key in ("loss", "accuracy"):
            value = validation["loss" if key == "loss" else "top1"]
            ax.plot([validation["step"]], [value], "o", color="tab:red", label="validation")
            ax.annotate(f"{value:.3f}", (validation["step"], value), textcoords="offset points",
                        xytext=(-4, 6), ha="right", color="tab:red")
        if resumes or (validation is not None and key != "lr"):
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomically(Path(png_path), buffer.getvalue())


def float8_training(model: BEiT, device: torch.device) -> None:
    """Swap the linear layers of the blocks for torchao's float8 training layers (rowwise scaling:
    a scale per row of each operand), in place. Needs a CUDA GPU of compute capability 8.9 or more
    (Ada, Hopper) and torchao; the LM head (inside the fused loss) and the patch projection stay."""
    if device.type != "cuda":
        raise ValueError(f"fp8: float8 linear layers need a CUDA GPU of compute capability >= 8.9 (Ada, "
                         f"Hopper); this run is on {device}, where there are no float8 matrix units")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"fp8: float8 linear layers need compute capability >= 8.9, "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as error:
        raise ImportError(f"fp8: needs torchao (pip install torchao): {error}") from error

    def in_blocks(module, name):  # float8 GEMMs need both dimensions divisible by 16
        return name.startswith("blocks.") and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=in_blocks)


# -- the trainer -----------------------------------------------------------------------------------


def _architecture(config: BEiTConfig | dict) -> dict:
    values = config.to_dict() if isinstance(config, BEiTConfig) else dict(config)
    for how in ("kernels", "fuse_blocks", "residual_dtype", "checkpoint_blocks"):
        values.pop(how, None)  # how the model runs, not what it computes
    values["img_size"] = list(values["img_size"]) if isinstance(values["img_size"], (list, tuple)) else values["img_size"]
    return values


class Trainer:
    """Runs ``task`` on batches of ``stream`` (a :class:`beitfast.data.BatchStream` already made for
    this rank) with the recipe of ``config``; ``fit()`` returns the metric records of this run.

    ``on_step(step, record)`` (optional) is called after every step, after any checkpoint of that step.
    """

    def __init__(self, model: BEiT, task, stream, config: TrainConfig,
                 on_step: Callable[[int, dict], None] | None = None):
        self.config = config
        self.ctx = setup_distributed()
        self.output = Path(config.output_dir)
        if self.ctx.is_main:
            ensure_writable(self.output)
        task.check(model.config)
        if stream.world_size != self.ctx.world_size or stream.rank != self.ctx.rank:
            raise ValueError(
                f"Trainer: the stream was made for rank {stream.rank} of {stream.world_size}, this process is "
                f"rank {self.ctx.rank} of {self.ctx.world_size}"
            )
        if stream.batch_size != config.batch_size:
            raise ValueError(f"Trainer: stream batch_size {stream.batch_size} != config batch_size {config.batch_size}")
        self.device = resolve_device(config.device, self.ctx.local_rank)
        self.precision = config.precision if config.precision != "auto" else (
            "bf16" if self.device.type == "cuda" else "fp32")
        self.model = model.to(self.device)
        self.task, self.stream, self.on_step = task, stream, on_step
        self.task.to(self.device)
        if (config.compile or config.cuda_graphs) and hasattr(task, "compile"):
            self.task.compile()
        if config.linear_probe:
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith("head."))
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"TrainConfig: cuda_graphs needs a CUDA device, this run is on {self.device}")
        if config.fp8:
            float8_training(model, self.device)
        self.wrapped = self._wrap(model)
        # A task may group its parameters itself (segmentation: the official layer ids of its backbone).
        groups_of = getattr(task, "param_groups", param_groups)
        self.groups = groups_of(model, config.weight_decay, config.layer_decay)
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in self.groups],
            lr=config.lr, betas=config.betas, eps=config.eps, fused=config.fused_optimizer,
        )
        self.params = [p for g in self.groups for p in g["params"]]
        self.checkpoint_path = self.output / CHECKPOINT_NAME
        self.metrics_path = self.output / METRICS_NAME
        self.last_good: int | None = None
        self.step = 0
        self.resumed_from: tuple[Path, int] | None = None  # (checkpoint, step) when fit() resumed
        self.schedule_changes = ""  # on resume: the schedule settings that differ from the checkpoint's
        self.plotting = True  # until matplotlib turns out to be missing

    def _wrap(self, model: BEiT):
        """DDP or FSDP under torchrun, then torch.compile when asked (compile goes outside DDP)."""
        wrapped = model
        if self.ctx.enabled and self.config.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:  # each block's parameters gathered just before it runs
                fully_shard(block)
            wrapped = fully_shard(model)
        elif self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=device_ids)
        if self.config.cuda_graphs:
            return torch.compile(wrapped, mode="reduce-overhead")
        if self.config.compile:
            return torch.compile(wrapped)
        return wrapped

    # -- checkpoints -------------------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict]:
        if self.ctx.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(self.model, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict(), self.optimizer.state_dict()

    def _load_state(self, model_state: dict, optimizer_state: dict) -> None:
        if self.ctx.enabled and self.config.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                           optim_state_dict=optimizer_state,
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
            return
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.output / PREVIOUS_CHECKPOINT_NAME

    def save_checkpoint(self, step: int) -> None:
        """Every rank takes part (state gathering); rank 0 writes ``checkpoint.pt`` atomically, with the
        SHA-256 of its contents, after keeping the one it replaces as ``checkpoint-previous.pt``."""
        model_state, optimizer_state = self._state()
        states = rng_states(self.device)
        if self.ctx.enabled:
            gathered = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, states)
            states = gathered
        else:
            states = [states]
        if self.ctx.is_main:
            payload = {
                "format": CHECKPOINT_FORMAT, "step": step, "task": self.task.name,
                "model_config": self.model.config.to_dict(), "model": model_state, "optimizer": optimizer_state,
                "train_config": dataclasses.asdict(self.config), "rng": states,
                "world_size": self.ctx.world_size,
                # Data stream and masks are functions of (seed, step): their state is the step.
                "data": {"next_step": step, "seed": self.stream.seed},
            }
            if hasattr(self.task, "checksum"):
                payload["tokenizer_sha256"] = self.task.checksum()
            buffer = io.BytesIO()
            torch.save(add_digest(payload), buffer)
            keep_previous(self.checkpoint_path, self.previous_checkpoint_path)
            write_bytes_atomically(self.checkpoint_path, buffer.getvalue())
        self.last_good = step

    def _verified_checkpoints(self):
        """``(path, payload, problem)`` of the output folder's checkpoints, newest first: the payload if
        it passed the checks (:func:`beitfast.checkpoint.read_training_checkpoint`), else ``None`` and
        why not."""
        for path in (self.checkpoint_path, self.previous_checkpoint_path):
            if path.exists():
                try:
                    yield path, checkpoint.read_training_checkpoint(path), None
                except FileIntegrityError as error:
                    yield path, None, error.problem

    def _resume_checkpoint(self) -> tuple[Path | None, dict | None]:
        """The checkpoint to resume from and its verified payload: the ``resume`` path, or with ``"auto"``
        the output folder's newest good one (a damaged newest one is reported in one line, and the
        previous one used); ``(None, None)`` to start afresh."""
        if self.ctx.is_main:  # left by a run killed while writing
            remove_stale_temporaries(self.output, (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, METRICS_NAME,
                                                   PLOT_NAME))
        resume = self.config.resume
        if resume is None:
            return None, None
        if resume != "auto":
            path = Path(resume)
            if not path.exists():
                raise FileNotFoundError(f"resume: checkpoint {str(path)!r} does not exist")
            return path, checkpoint.read_training_checkpoint(path)
        problems = []
        for path, payload, problem in self._verified_checkpoints():
            if payload is None:
                problems.append(f"{path}: {problem}")
                continue
            if problems and self.ctx.is_main:
                print(f"resume: {problems[0]}; resuming from {path} (step {payload['step']}) instead",
                      file=sys.stderr, flush=True)
            return path, payload
        if problems:
            raise FileIntegrityError(self.output, "no usable checkpoint to resume from: " + "; ".join(problems) +
                                     ". Move them away to start afresh, or pass a checkpoint to resume")
        return None, None

    def load_checkpoint(self, path: Path, payload: dict | None = None) -> None:
        """Continue from the training checkpoint ``path`` (``payload``: its contents, already verified)."""
        if payload is None:
            payload = checkpoint.read_training_checkpoint(path)
        if payload["task"] != self.task.name:
            raise ValueError(f"resume: {str(path)!r} is a {payload['task']} checkpoint, this run is {self.task.name}")
        theirs, ours = _architecture(payload["model_config"]), _architecture(self.model.config)
        if theirs != ours:
            diff = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {ours.get(k)!r}"
                             for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))
            raise ValueError(f"resume: {str(path)!r} was made for another architecture ({diff})")
        saved = payload["train_config"]
        for key in ("batch_size", "seed"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"resume: {str(path)!r} was trained with {key}={saved[key]}, this run has "
                    f"{key}={getattr(self.config, key)}; exact resume needs the same value"
                )
        recorded = payload.get("tokenizer_sha256")  # None in checkpoints of older versions
        if recorded is not None and hasattr(self.task, "checksum") and recorded != self.task.checksum() \
                and not self.config.allow_tokenizer_change:
            raise ValueError(
                f"resume: {str(path)!r} was trained with another tokenizer (checksum {recorded[:12]}, this "
                f"run's is {self.task.checksum()[:12]}): its targets would change mid-run. Use that run's "
                f"tokenizer, or allow_tokenizer_change (--allow-tokenizer-change) to continue with this one"
            )
        # The schedules are planned from these: a change re-plans the rest of the run, which the resume
        # line says.
        self.schedule_changes = ", ".join(
            f"{key} {saved[key]} -> {getattr(self.config, key)}"
            for key in ("steps", "warmup_steps", "lr", "min_lr", "weight_decay", "weight_decay_end")
            if key in saved and saved[key] != getattr(self.config, key))
        self._load_state(payload["model"], payload["optimizer"])
        if payload["world_size"] == self.ctx.world_size:
            restore_rng_states(payload["rng"][self.ctx.rank], self.device)
        else:  # another process count: the drop-path randomness cannot continue the same sequence
            self._seed_rngs(payload["step"])
        self.step = self.last_good = payload["step"]

    def _last_good_checkpoint(self) -> str:
        """Where the non-finite-loss message sends the user: the newest checkpoint of the folder that
        passes the checks now (a file can be damaged after it was written)."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        for path, payload, _ in self._verified_checkpoints():
            if payload is not None:
                return f"the last good checkpoint is {str(path)!r} (step {payload['step']})"
        return f"no checkpoint in {str(self.output)!r} passes the integrity checks"

    def _seed_rngs(self, step: int) -> None:
        seed = derive_seed(self.config.seed, "train", self.ctx.rank, step)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    # -- metrics -----------------------------------------------------------------------------------

    def _start_metrics(self) -> None:
        """Keep the records up to the resumed step (a killed run may have logged steps past it); the
        record of that step gets ``"resumed": true`` (the plot marks it)."""
        kept = []
        if self.step > 0 and self.metrics_path.exists():
            kept = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            kept = [record for record in kept if record["step"] <= self.step]
            if kept and kept[-1]["step"] == self.step:
                kept[-1]["resumed"] = True
        write_bytes_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _set_schedules(self, step: int) -> tuple[float, float]:
        c = self.config
        schedule = getattr(self.task, "lr_schedule", cosine_schedule)  # segmentation: poly
        lr = schedule(step, c.lr, c.min_lr, c.steps, c.warmup_steps)
        wd_end = c.weight_decay if c.weight_decay_end is None else c.weight_decay_end
        wd = cosine_schedule(step, c.weight_decay, wd_end, c.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            group["weight_decay"] = wd if group["decay"] else 0.0
        return lr, wd

    # -- output ------------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message, file=sys.stdout)  # above a progress bar if there is one
            sys.stdout.flush()

    def _plot(self) -> None:
        if not self.plotting:
            return
        try:
            plot_metrics(self.metrics_path, self.output / PLOT_NAME)
        except ImportError as error:  # matplotlib is optional (the data extra); the numbers are in the metrics
            self.plotting = False
            self._log(f"{PLOT_NAME} is not drawn: matplotlib cannot be imported ({error}); {METRICS_NAME} has "
                      f"every number (pip install matplotlib for the plot)")

    # -- the loop ----------------------------------------------------------------------------------

    def _batches(self):
        return self.stream.iterate(self.step, self.config.num_workers, self.device)

    def _train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward of a batch that ``stream.prepare`` made."""
        if self.config.cuda_graphs:  # the previous step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with autocast:
            loss, accuracy, count = self.task(self.wrapped, batch)
        count = count.to(self.device, torch.float32)
        stats = torch.stack([loss.detach().float() * count, accuracy.detach().float() * count, count])
        if self.ctx.enabled:
            dist.all_reduce(stats)  # one collective gives the global metrics and the global row count
            # DDP averages gradients over ranks; weighting each rank's mean by its share of the counted
            # rows makes that average the mean over the whole global batch.
            objective = loss * (count * self.ctx.world_size / stats[2])
        else:
            objective = loss
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        return stats[0] / stats[2], stats[1] / stats[2], objective

    def _optimizer_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """``optimizer.step()``, skipped when the loss or the gradient norm is not finite. The fused AdamW
        kernel decides on the device (it reads ``found_inf`` as under a GradScaler and leaves parameters
        and state untouched), so the host queues the next step without waiting; the plain optimizer
        cannot skip on the device, so its step waits for the host to read the two values."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if not self.config.fused_optimizer:
            if bool(finite):  # a host synchronisation, only without the fused optimizer
                self.optimizer.step()
            return
        self.optimizer.found_inf = (~finite).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def fit(self) -> list[dict]:
        c = self.config
        resume, payload = self._resume_checkpoint()
        if resume is not None:
            self.load_checkpoint(resume, payload)
            self.resumed_from = (resume, self.step)
            self._log(f"{self.task.name}: resumed from {resume} at step {self.step} of {c.steps}" + (
                f" (schedule re-planned: {self.schedule_changes})" if self.schedule_changes else ""))
        else:
            self._seed_rngs(0)
        if self.ctx.is_main:
            self._start_metrics()
        if self.step >= c.steps:
            return []
        desc = self.task.name if resume is None else f"{self.task.name} (resumed at {self.step})"
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.ctx.is_main),
                   desc=desc, dynamic_ncols=True)
        records: list[dict] = []
        batches = self._batches()
        self.wrapped.train()
        started = time.perf_counter()
        try:
            batch = self.stream.prepare(next(batches), self.device)
            for step in range(self.step, c.steps):
                tick = time.perf_counter()
                lr, wd = self._set_schedules(step)
                loss, accuracy, _ = self._train_step(batch)
                if step + 1 < c.steps:
                    # The next batch's input work (the device input path decodes and augments here) is
                    # issued before this step's synchronisation, so the host does it while the device
                    # runs the step. Batches are functions of their step: nothing else changes.
                    batch = self.stream.prepare(next(batches), self.device)
                max_norm = c.clip_grad if c.clip_grad is not None else float("inf")
                # Clipping is decided on the device (a scale of min(1, max_norm / norm)), no host read.
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
                    grad_norm = grad_norm.full_tensor()
                grad_norm = grad_norm.to(loss.device, torch.float32)
                # loss is the global mean (all-reduced): every rank skips or steps alike.
                self._optimizer_step(loss, grad_norm)
                # One host synchronisation per step, after the optimizer step is queued, brings back
                # every number the record needs, the count of masked tokens whose label the fused loss
                # had to ignore included.
                numbers = [loss, accuracy, grad_norm, invalid_label_count(loss.device).to(torch.float32)]
                loss_value, accuracy_value, grad_norm_value, invalid_value = torch.stack(numbers).tolist()
                if invalid_value:
                    reset_invalid_label_count()
                    self._log(f"warning: step {step + 1}: {int(invalid_value)} masked token(s) had a label outside "
                              f"[0, vocab_size) and were ignored by the loss (set BEITFAST_CHECKS=1 to stop there)")
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
                    what = (f"the loss became {loss_value}" if not math.isfinite(loss_value)
                            else f"the gradient norm became {grad_norm_value} (loss {loss_value:.4g})")
                    where = self._last_good_checkpoint()
                    raise NonFiniteLossError(
                        f"{what} at step {step + 1}; its update was skipped, training stopped and nothing "
                        f"was saved after it: {where}. Lower the learning rate or check the data."
                    )
                self.step = step + 1
                elapsed = time.perf_counter() - tick
                record = {"step": self.step, "loss": loss_value, "accuracy": accuracy_value, "lr": lr,
                          "weight_decay": wd, "grad_norm": grad_norm_value, "invalid_labels": int(invalid_value),
                          "images_per_s": c.batch_size / elapsed, "elapsed_s": time.perf_counter() - started}
                records.append(record)
                if self.ctx.is_main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{record['accuracy']:.3f}", lr=f"{lr:.2e}",
                                img_s=f"{record['images_per_s']:.0f}")
                if not c.progress and c.log_every and (self.step % c.log_every == 0 or self.step == c.steps):
                    self._log(f"{self.task.name} step {self.step}/{c.steps}: loss {loss_value:.4f}, accuracy "
                              f"{accuracy_value:.3f}, lr {lr:.2e}, {record['images_per_s']:.0f} images/s, "
                              f"{record['elapsed_s']:.0f} s")
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save_checkpoint(self.step)
                    if self.ctx.is_main:
                        self._plot()
                if self.on_step is not None:
                    self.on_step(self.step, record)
        finally:
            bar.close()
        return records


# -- whole runs ------------------------------------------------------------------------------------


def pretrain(model_config: BEiTConfig, tokenizer, source: ImageSource, config: TrainConfig,
             mask_ratio: float = 0.4, crop_scale=(0.08, 1.0), on_step=None) -> tuple[BEiT, list[dict]]:
    """Masked image modeling on ``source`` with ``tokenizer``'s tokens; returns the model and the
    metric records. The model view has ``model_config.img_size`` pixels, the tokenizer view
    ``tokenizer.input_size``."""
    trainer = pretraining_trainer(model_config, tokenizer, source, config, mask_ratio, crop_scale, on_step)
    return trainer.model, trainer.fit()


def pretraining_trainer(model_config: BEiTConfig, tokenizer, source: ImageSource, config: TrainConfig,
                        mask_ratio: float = 0.4, crop_scale=(0.08, 1.0), on_step=None) -> Trainer:
    """The :class:`Trainer` :func:`pretrain` runs (a new model, its stream and task), for callers that
    want the trainer's state after ``fit()`` (``resumed_from``)."""
    ctx = setup_distributed()
    if model_config.image_hw[0] != model_config.image_hw[1]:
        raise ValueError(f"pretrain: square images only, got img_size {model_config.img_size}")
    device = resolve_device(config.device, ctx.local_rank)
    on_device = resolve_input_path(config.input_path, device) == "device"
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = BEiT(model_config)
    transform = TwoViewTransform(model_config.image_hw[0], tokenizer.input_size, scale=crop_scale)
    masking = masking_for(model_config.grid, mask_ratio)
    stream = pretrain_stream(source, transform, masking, config.batch_size,
                             on_device=on_device, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size)
    task = MaskedImageModeling(tokenizer, max_masked_per_image=masking["num_masking_patches"])
    return Trainer(model, task, stream, config, on_step=on_step)


def classifier_from_pretrained(pretrained: BEiT | str | os.PathLike, num_classes: int,
                               drop_path_rate: float = 0.1, log: Callable[[str], None] | None = None,
                               **overrides) -> BEiT:
    """A classifier (mean pooling, no LM head) from pre-trained weights: a :class:`BEiT`, a training
    checkpoint of this trainer, or any file or folder :meth:`BEiT.from_file` reads. The head of a
    classifier of another class count is dropped (re-initialised, as the official recipe does), which
    ``log`` (default: a warning) is told in one line."""
    if isinstance(pretrained, BEiT):
        state, config = pretrained.state_dict(), pretrained.config
    else:
        model = BEiT.from_file(pretrained)  # verified; a training checkpoint gives its model config
        state, config = model.state_dict(), model.config
    target = config.replace(vocab_size=0, num_classes=num_classes, use_mean_pooling=True,
                            drop_path_rate=drop_path_rate, **overrides)
    model = BEiT(target)
    state = checkpoint.adapt_state_dict(checkpoint.to_official_names(state)[0], target)
    # The LM head, the mask token and the final norm (replaced by fc_norm) are not used.
    state = {k: v for k, v in state.items() if not k.startswith(("lm_head.", "mask_token", "norm."))}
    head = state.get("head.weight")
    if head is not None and head.shape[0] != num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        notice = (f"the pre-trained classifier's head has {head.shape[0]} classes, this one {num_classes}: "
                  f"its head is dropped and a new one initialised")
        if log is None:
            warnings.warn(notice, stacklevel=2)
        else:
            log(notice)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_layers = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if new_layers or unexpected:
        raise ValueError(
            f"classifier_from_pretrained: weights do not fit (missing {new_layers}, unexpected {unexpected})"
        )
    return model


@torch.no_grad()
def evaluation(model: BEiT, source: ImageSource, transform: EvalTransform, batch_size: int = 256,
               device: str | torch.device = "auto") -> dict:
    """``model`` on every decodable image of ``source`` (all ranks together): ``images``, the mean
    cross-entropy ``loss`` (no label smoothing), ``top1``, ``top5`` (top-k with k = min(5, classes)) and
    ``per_class``, the top-1 accuracy of each class (by name, ``source.classes``, when it has them; None
    for a class without images)."""
    ctx = setup_distributed()
    device = resolve_device(device, ctx.local_rank) if isinstance(device, str) else device
    was_training = model.training
    model.eval().to(device)
    num_classes = model.config.num_classes
    # loss sum, top-1 hits, top-k hits, images; then per class: hits, images
    sums = torch.zeros(4 + 2 * num_classes, dtype=torch.float64, device=device)
    for images, labels in eval_batches(source, transform, batch_size, ctx.rank, ctx.world_size):
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images.to(device))
        logits = logits.float()
        hits = logits.argmax(-1) == labels
        top = logits.topk(min(5, num_classes), dim=-1).indices
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += hits.sum()
        sums[2] += (top == labels[:, None]).any(-1).sum()
        sums[3] += labels.numel()
        sums[4:4 + num_classes] += torch.bincount(labels[hits], minlength=num_classes)
        sums[4 + num_classes:] += torch.bincount(labels, minlength=num_classes)
    if ctx.enabled:
        dist.all_reduce(sums)
    model.train(was_training)
    sums = sums.tolist()
    count = max(sums[3], 1)
    names = list(getattr(source, "classes", None) or range(num_classes))
    per_class = {str(name): (hits / total if total else None)
                 for name, hits, total in zip(names, sums[4:4 + num_classes], sums[4 + num_classes:])}
    return {"images": int(sums[3]), "loss": sums[0] / count, "top1": sums[1] / count, "top5": sums[2] / count,
            "per_class": per_class}


def evaluate(model: BEiT, source: ImageSource, transform: EvalTransform, batch_size: int = 256,
             device: str | torch.device = "auto") -> float:
    """Top-1 accuracy of ``model`` on every decodable image of ``source`` (all ranks together); the
    other numbers: :func:`evaluation`."""
    return evaluation(model, source, transform, batch_size, device)["top1"]
