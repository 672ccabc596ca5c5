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

This module is the loop, which does not know its task; the rest lives in :mod:`beitfast.training`
(settings, optimisation, devices, checkpoints, progress, one file per task) and is re-exported here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .config import BEiTConfig
from .data import ImageSource
from .model import BEiT
from .ops.cross_entropy import invalid_label_count, reset_invalid_label_count
from .training.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    PREVIOUS_CHECKPOINT_NAME,
    Checkpointing,
    restore_rng_states,
    rng_states,
)
from .training.config import TrainConfig
from .training.devices import Distributed, float8_training, resolve_device, setup_distributed, wrap_model
from .training.progress import (
    METRICS_NAME,
    PLOT_NAME,
    Progress,
    ensure_writable,
    plot_metrics,
    write_bytes_atomically,
)
from .training.optimization import (
    adamw,
    clip_gradients,
    cosine_schedule,
    layer_id,
    param_groups,
    set_schedules,
    step_if_finite,
)
from .training.tasks.classification import Classification, classifier_from_pretrained, evaluate, evaluation
from .training.tasks.mim import MaskedImageModeling, pretraining_run

__all__ = [
    "TrainConfig", "Trainer", "NonFiniteLossError", "cosine_schedule", "layer_id", "param_groups",
    "MaskedImageModeling", "Classification", "pretrain", "pretraining_trainer",
    "classifier_from_pretrained", "evaluate", "evaluation",
    "setup_distributed", "plot_metrics", "float8_training", "CHECKPOINT_NAME", "METRICS_NAME", "PLOT_NAME",
    "PREVIOUS_CHECKPOINT_NAME",
    # importable from here since before beitfast.training existed:
    "CHECKPOINT_FORMAT", "Distributed", "resolve_device", "ensure_writable", "write_bytes_atomically",
    "rng_states", "restore_rng_states",
]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; that step's update was skipped and nothing
    was saved after it."""


class Trainer(Checkpointing):
    """Runs ``task`` on batches of ``stream`` (a :class:`beitfast.data.BatchStream` already made for
    this rank) with the recipe of ``config``; ``fit()`` returns the metric records of this run. Tasks:
    :mod:`beitfast.training.tasks`; checkpoints and resume:
    :class:`~beitfast.training.checkpoints.Checkpointing`.

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
        self.wrapped = wrap_model(model, config, self.ctx, self.device)
        # A task may group its model's parameters itself (segmentation: the official layer ids of its backbone).
        groups_of = getattr(task, "param_groups", param_groups)
        self.groups = groups_of(model, config.weight_decay, config.layer_decay)
        self.optimizer = adamw(self.groups, config)
        self.params = [p for g in self.groups for p in g["params"]]
        self.checkpoint_path = self.output / CHECKPOINT_NAME
        self.progress = Progress(self.output, task.name, config, self.ctx.is_main)
        self.last_good: int | None = None
        self.step = 0
        self.resumed_from: tuple[Path, int] | None = None  # (checkpoint, step) when fit() resumed
        self.schedule_changes = ""  # on resume: the schedule settings that differ from the checkpoint's

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

    def _read_step(self, step: int, loss, accuracy, grad_norm) -> tuple[float, float, float, int]:
        """The step's one host synchronisation, after the optimizer step is queued: every number the record
        needs, the count of masked tokens whose label the fused loss had to ignore included. A non-finite
        loss or gradient norm stops the run here (``optimizer.step`` skipped that update)."""
        numbers = [loss, accuracy, grad_norm, invalid_label_count(loss.device).to(torch.float32)]
        loss_value, accuracy_value, grad_norm_value, invalid_value = torch.stack(numbers).tolist()
        if invalid_value:
            reset_invalid_label_count()
            self.progress.log(f"warning: step {step + 1}: {int(invalid_value)} masked token(s) had a "
                              f"label outside [0, vocab_size) and were ignored by the loss (set "
                              f"BEITFAST_CHECKS=1 to stop there)")
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            what = (f"the loss became {loss_value}" if not math.isfinite(loss_value)
                    else f"the gradient norm became {grad_norm_value} (loss {loss_value:.4g})")
            where = self._last_good_checkpoint()
            raise NonFiniteLossError(
                f"{what} at step {step + 1}; its update was skipped, training stopped and nothing "
                f"was saved after it: {where}. Lower the learning rate or check the data."
            )
        return loss_value, accuracy_value, grad_norm_value, int(invalid_value)

    def fit(self) -> list[dict]:
        c = self.config
        resume, payload = self._resume_checkpoint()
        if resume is not None:
            self.load_checkpoint(resume, payload)
            self.resumed_from = (resume, self.step)
            self.progress.log(f"{self.task.name}: resumed from {resume} at step {self.step} of {c.steps}" + (
                f" (schedule re-planned: {self.schedule_changes})" if self.schedule_changes else ""))
        else:
            self._seed_rngs(0)
        self.progress.start_metrics(self.step)
        if self.step >= c.steps:
            return []
        self.progress.open_bar(self.step, resumed=resume is not None)
        records: list[dict] = []
        lr_schedule = getattr(self.task, "lr_schedule", cosine_schedule)  # a task's own (segmentation: poly)
        batches = self._batches()
        self.wrapped.train()
        started = time.perf_counter()
        try:
            batch = self.stream.prepare(next(batches), self.device)
            for step in range(self.step, c.steps):
                tick = time.perf_counter()
                lr, wd = set_schedules(self.optimizer, c, step, lr_schedule)
                loss, accuracy, _ = self._train_step(batch)
                if step + 1 < c.steps:
                    # The next batch's input work (the device input path decodes and augments here) is
                    # issued before this step's synchronisation, so the host does it while the device
                    # runs the step. Batches are functions of their step: nothing else changes.
                    batch = self.stream.prepare(next(batches), self.device)
                grad_norm = clip_gradients(self.params, c.clip_grad, loss.device)
                # loss is the global mean (all-reduced): every rank skips or steps alike.
                step_if_finite(self.optimizer, loss, grad_norm, c.fused_optimizer)
                loss_value, accuracy_value, grad_norm_value, invalid = self._read_step(step, loss, accuracy,
                                                                                       grad_norm)
                self.step = step + 1
                elapsed = time.perf_counter() - tick
                record = {"step": self.step, "loss": loss_value, "accuracy": accuracy_value, "lr": lr,
                          "weight_decay": wd, "grad_norm": grad_norm_value, "invalid_labels": invalid,
                          "images_per_s": c.batch_size / elapsed, "elapsed_s": time.perf_counter() - started}
                records.append(record)
                self.progress.write(record)
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save_checkpoint(self.step)
                    self.progress.plot()
                if self.on_step is not None:
                    self.on_step(self.step, record)
        finally:
            self.progress.close()
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
    """The :class:`Trainer` :func:`pretrain` runs (a new model, its stream and task:
    :func:`beitfast.training.tasks.mim.pretraining_run`), for callers that want the trainer's state after
    ``fit()`` (``resumed_from``)."""
    model, task, stream = pretraining_run(model_config, tokenizer, source, config, mask_ratio, crop_scale)
    return Trainer(model, task, stream, config, on_step=on_step)
