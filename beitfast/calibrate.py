"""Measured auto-dispatch: time every backend of every fused op on this GPU and write the table the
dispatcher reads (``beitfast bench --calibrate``).

Each op runs forward + backward at BEiT-B pre-training sizes, as the model calls it (bf16 autocast,
the same layouts and dtypes) at the batch the step benchmark and the goals use (128): attention
``[128, 12, 197, 64]`` with the relative position bias, the LM-head cross-entropy over 128 x 75 masked
rows of width 768 into 8192 tokens, the patch embedding of 128 images of 224 pixels with 16-pixel
patches and 75 masked patches each. The order measured at one batch need not hold at another. Backends that refuse the
inputs or fail are left out of the order, with the reason recorded; the dispatcher puts them after
the measured ones.

The table (``beitfast/ops/preferences/<GPU name>.json``)::

    {"gpu": "NVIDIA H100 80GB HBM3", "torch": ..., "triton": ..., "date": ..., "commit": ...,
     "preference": {"attention": ["triton", "sdpa", ...], ...},
     "timings_ms": {"attention": {"triton": 1.2, ...}, ...},
     "skipped": {"attention": {"flash": "why"}, ...},
     "shapes": {"name": "beit-base", ...}, "warmup": 5, "repeats": 20}
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ._files import write_atomically
from .ops import dispatch

__all__ = ["SHAPES", "calibrate", "measure_backends", "preference_table", "write_table", "time_trials",
           "cuda_event_timer"]

# Sizes of one calibration run, by name.
SHAPES: dict[str, dict[str, int]] = {
    "beit-base": {"batch": 128, "heads": 12, "grid": 14, "head_dim": 64, "vocab": 8192, "num_masked": 75,
                  "patch_size": 16, "channels": 3},
}

# An op's timed case: the keyword inputs ``dispatch.explain`` takes, and a factory giving for a backend
# name a callable running forward + backward once.
Case = tuple[dict[str, Any], Callable[[str], Callable[[], Any]]]
Timer = Callable[[Callable[[], Any]], float]


def _fwd_bwd(forward: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], Any]:
    """One forward + backward; gradients returned rather than accumulated (no extra adds timed)."""
    probe = forward()
    grad_out = None if probe.dim() == 0 else torch.randn_like(probe)

    def step():
        return torch.autograd.grad(forward(), leaves, grad_out)

    return step


def _masks(sizes: dict[str, int], device: torch.device) -> torch.Tensor:
    from .data import masking_for
    from .masking import MaskingGenerator

    grid = (sizes["grid"], sizes["grid"])
    masking = {**masking_for(grid), "num_masking_patches": sizes["num_masked"]}
    return MaskingGenerator(**masking, seed=0).batch(sizes["batch"]).to(device)


def _cases(sizes: dict[str, int], device: torch.device) -> dict[str, Case]:
    """The inputs of each op as ``BEiT.forward`` passes them under bf16 autocast."""
    from .model import num_relative_positions, relative_position_index
    from .ops import masked_lm_cross_entropy, masked_patch_embed, rel_pos_attention

    B, H, D, side = sizes["batch"], sizes["heads"], sizes["head_dim"], sizes["grid"]
    N, dim, patch = 1 + side * side, sizes["heads"] * sizes["head_dim"], sizes["patch_size"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    masks = _masks(sizes, device)

    # attention: q, k, v are views of the qkv projection's output, the bias table a float32 parameter.
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=compute, requires_grad=True)
    table = (torch.randn(num_relative_positions((side, side)), H, device=device) * 0.5).requires_grad_()
    rel_index = relative_position_index((side, side)).to(device)
    scale = D**-0.5

    def attention(name):
        def forward():
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            with autocast:
                return rel_pos_attention(q, k, v, table, rel_index, scale, backend=name)

        return _fwd_bwd(forward, [qkv, table])

    q, k, v = qkv.detach().permute(2, 0, 3, 1, 4)
    attention_inputs = {"q": q, "k": k, "v": v, "bias_table": table, "rel_index": rel_index, "scale": scale}

    # cross-entropy: the final norm's float32 output without the cls token, the LM head's parameters.
    hidden = torch.randn(B, N, dim, device=device, requires_grad=True)
    weight = (torch.randn(sizes["vocab"], dim, device=device) * dim**-0.5).requires_grad_()
    bias = torch.zeros(sizes["vocab"], device=device, requires_grad=True)
    labels = torch.randint(0, sizes["vocab"], (B, N - 1), device=device)

    def cross_entropy(name):
        def forward():
            with autocast:
                return masked_lm_cross_entropy(hidden[:, 1:], weight, bias, labels, mask=masks, backend=name)

        return _fwd_bwd(forward, [hidden, weight, bias])

    ce_inputs = {"hidden": hidden[:, 1:].detach(), "weight": weight, "bias": bias, "labels": labels,
                 "mask": masks, "ignore_index": -100, "reduction": "mean"}

    # patch embedding: float32 pixels (no gradient), the conv weight, mask and cls tokens.
    images = torch.randn(B, sizes["channels"], side * patch, side * patch, device=device)
    conv = (torch.randn(dim, sizes["channels"], patch, patch, device=device) * 0.02).requires_grad_()
    conv_bias = torch.zeros(dim, device=device, requires_grad=True)
    mask_token = (torch.randn(1, 1, dim, device=device) * 0.02).requires_grad_()
    cls_token = (torch.randn(1, 1, dim, device=device) * 0.02).requires_grad_()

    def patch_embed(name):
        def forward():
            with autocast:
                return masked_patch_embed(images, conv, conv_bias, patch, mask=masks, mask_token=mask_token,
                                          cls_token=cls_token, backend=name)

        return _fwd_bwd(forward, [conv, conv_bias, mask_token, cls_token])

    embed_inputs = {"images": images, "weight": conv, "bias": conv_bias, "patch_size": patch, "mask": masks,
                    "mask_token": mask_token, "cls_token": cls_token, "pos_embed": None}

    return {"attention": (attention_inputs, attention), "cross_entropy": (ce_inputs, cross_entropy),
            "patch_embed": (embed_inputs, patch_embed)}


def time_trials(fn: Callable[[], Any], trials: int, repeats: int, warmup: int = 0,
                device_type: str = "cuda") -> list[float]:
    """Milliseconds per call of ``fn`` in each of ``trials`` trials of ``repeats`` calls, after
    ``warmup`` untimed calls: the one timer of the calibration and of every benchmark suite.

    On CUDA each trial lies between two CUDA events (GPU time, no host overhead counted when the GPU
    is busy). On a CPU (the benchmarks' smoke mode, never a claim) it is the wall clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(trials):
        if device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / repeats)
        else:
            began = time.perf_counter()
            for _ in range(repeats):
                fn()
            times.append((time.perf_counter() - began) * 1e3 / repeats)
    return times


def cuda_event_timer(warmup: int, repeats: int) -> Timer:
    """Milliseconds per call of a CUDA callable: ``warmup`` untimed calls, then one trial of
    ``repeats`` calls between two CUDA events."""

    def time_ms(fn: Callable[[], Any]) -> float:
        return time_trials(fn, 1, repeats, warmup)[0]

    return time_ms


def measure_backends(cases: dict[str, Case], time_ms: Timer) -> tuple[dict, dict]:
    """``(timings_ms, skipped)``: per op, the time of each backend that takes the inputs, and for the
    others the reason (its refusal, or the error it raised)."""
    timings: dict[str, dict[str, float]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for op, (inputs, make_step) in cases.items():
        timings[op], skipped[op] = {}, {}
        for name, reasons in dispatch.explain(op, **inputs).items():
            if reasons:
                skipped[op][name] = "; ".join(reasons)
                continue
            try:
                timings[op][name] = float(time_ms(make_step(name)))
            except Exception as error:  # a backend that fails is left out, not the calibration
                skipped[op][name] = f"{type(error).__name__}: {error}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return timings, skipped


def git_commit() -> str | None:
    """The commit of the checkout beitfast runs from, if it is one."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def preference_table(gpu: str, timings: dict, skipped: dict, shapes: dict, **extra: Any) -> dict:
    """The table the dispatcher reads: each op's measured backends, fastest first."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": gpu, "torch": torch.__version__, "triton": triton_version,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
        "preference": {op: sorted(by_name, key=by_name.__getitem__) for op, by_name in timings.items()},
        "timings_ms": timings, "skipped": skipped, "shapes": shapes, **extra,
    }


def write_table(table: dict, path: str | os.PathLike) -> Path:
    """Write ``table`` as JSON to ``path`` atomically (readers see the old file or the new one)."""
    return write_atomically(path, lambda temp: Path(temp).write_text(json.dumps(table, indent=1) + "\n"))


def calibrate(device: str | torch.device = "cuda", shapes: str = "beit-base", output: str | None = None,
              warmup: int = 5, repeats: int = 20) -> dict:
    """Time fwd+bwd of every backend of every op on ``device`` and write the preference table to
    ``output`` (default: the package's file for this GPU kind). Returns the table, plus the ``path``
    written."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"calibrate: needs a CUDA device, got {str(device)!r} (timings of GPU kernels on "
                         "a CPU say nothing about a GPU)")
    if not torch.cuda.is_available():
        raise ValueError("calibrate: needs a CUDA device, and torch sees none")
    if shapes not in SHAPES:
        raise ValueError(f"calibrate: unknown shapes {shapes!r}; known: {sorted(SHAPES)}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"calibrate: needs warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        timings, skipped = measure_backends(_cases(SHAPES[shapes], device), cuda_event_timer(warmup, repeats))
    gpu = torch.cuda.get_device_name(device)
    table = preference_table(gpu, timings, skipped, {"name": shapes, **SHAPES[shapes]}, warmup=warmup,
                             repeats=repeats)
    path = write_table(table, output or dispatch.PREFERENCES_DIR / f"{dispatch.gpu_slug(gpu)}.json")
    return {**table, "path": str(path)}
