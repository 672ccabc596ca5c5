"""The settings of a training run (optimisation, schedules, precision, parallelism, bookkeeping)."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from ..config import check_bool, check_choice, check_int, check_real
from ..pipeline import INPUT_PATHS

__all__ = ["TrainConfig"]


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
