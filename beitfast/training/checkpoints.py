"""Checkpoints of a training run and its exact resume: ``checkpoint.pt`` holds the model, the optimizer,
the step and the RNG states of torch, Python and NumPy of every rank (the data stream and the masks are
functions of the step), with the SHA-256 of its contents; the one it replaced is kept as
``checkpoint-previous.pt``, where resume falls back when the newest is damaged."""

from __future__ import annotations

import dataclasses
import io
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import checkpoint
from .._files import FileIntegrityError, add_digest, keep_previous, remove_stale_temporaries
from ..config import BEiTConfig
from ..data import derive_seed
from .progress import METRICS_NAME, PLOT_NAME, write_bytes_atomically

__all__ = ["CHECKPOINT_NAME", "PREVIOUS_CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "rng_states",
           "restore_rng_states", "Checkpointing"]

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint-previous.pt"  # the one before: resume falls back to it
CHECKPOINT_FORMAT = checkpoint.TRAIN_CHECKPOINT_FORMAT


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


def _architecture(config: BEiTConfig | dict) -> dict:
    values = config.to_dict() if isinstance(config, BEiTConfig) else dict(config)
    for how in ("kernels", "fuse_blocks", "residual_dtype", "checkpoint_blocks"):
        values.pop(how, None)  # how the model runs, not what it computes
    values["img_size"] = list(values["img_size"]) if isinstance(values["img_size"], (list, tuple)) else values["img_size"]
    return values


class Checkpointing:
    """The checkpoint part of :class:`beitfast.train.Trainer` (a base class of it): saving, finding,
    verifying and loading. It works on the trainer's ``ctx``, ``config``, ``model``, ``optimizer``,
    ``device``, ``task``, ``stream``, ``output``, ``checkpoint_path``, ``step`` and ``last_good``."""

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
