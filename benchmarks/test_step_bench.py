"""End-to-end BEiT pre-training step: forward, masked LM loss, backward, gradient clipping and a fused
AdamW step (tokenizer excluded), bf16 autocast, at BEiT-B and BEiT-L sizes, batch 64/128/256.

Variants (each in a fresh Python process, so no variant inherits another's caches, allocator state
or compiled code, and its peak memory is its own):

* ``beitfast``: the fast step (auto backends, each block compiled by Inductor with our ops as single
  nodes); ``beitfast-jpeg``: the same step fed by the real pre-training input path, end to end: JPEG
  files written once from the embedded photographs (enlarged or shrunk to a longer side of 500 pixels,
  ImageNet's typical 500x375, so that decoding costs what it costs there), read by DataLoader workers
  (half the CPU cores, at most 8), decoded and augmented by the device input path (the trainer's
  default on CUDA: nvJPEG and ``DeviceTwoView``), masks from the stream; the tokenizer is excluded, as
  in every variant (random labels), so the gap to ``beitfast`` is the input path's (goal: within 10%);
  its row carries ``beitfast``'s images/s when both ran in one session; ``beitfast-unfused``: the same
  without the block compilation (what that fusion gains);
  ``beitfast-eager``: eager backends, no fusion; ``beitfast-compiled``: the whole model through
  ``torch.compile``; ``beitfast-fp8``: the fast step with torchao float8 linear layers (Hopper), its
  loss curve compared with ``beitfast``'s (bf16) on the same inputs; ``beitfast-checkpointed``: the
  fast step recomputing every block's activations (memory against time); ``beitfast-cudagraphs``: the
  whole model compiled with CUDA graphs (``mode="reduce-overhead"``);
* ``hf-sdpa`` / ``hf-eager``: Hugging Face ``BeitForMaskedImageModeling`` (attention implementation
  asserted after construction), and ``hf-sdpa-compiled``;
* ``timm`` / ``timm-compiled``: timm's BEiT blocks under the same pre-training head.

Every variant: ``cudnn.benchmark`` on; images, masks, labels and the gathered labels or indices a
baseline needs are made before the timed region (``beitfast-jpeg``: its images and masks come from the
input path inside it, the ``data`` region of a profile), and no variant indexes with a boolean mask
inside it (Hugging Face's logits are gathered with precomputed row indices, sparing its loss's host sync);
3 warm-up steps (compilation), then 5 trials
of 30 steps timed with CUDA events (:func:`beitfast.calibrate.time_trials`): median and spread; the
first loss must be within 0.5 of ln(vocab) (random labels, small initial logits) and every loss
finite; peak memory of the process. MFU uses the dense bf16 peak of the exact GPU model (vendor data
sheets); an unknown GPU gets no MFU rather than a guess. ``triton_launches_per_op``: the Triton kernels
our ops launch in one more step, by op (their launchers wrapped, the kernels still run; Inductor's own
kernels and CUDA-graph replays are not counted). Our variants bound the loss's rows by the masking
(``max_masked_per_image``), as the trainer does.

``python benchmarks/test_step_bench.py --variant beitfast ...`` runs one variant and prints (or
writes) its JSON; the tests launch it. With ``--profile`` the variant also writes a profiler trace,
its top ops and the time by region (:mod:`beitfast.profiling`). ``--smoke``: a tiny model on the CPU
(compiled variants through Dynamo's ``eager`` backend; one variant in a fresh process, the others in
the test's), no timing claims.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

# Dense bf16 tensor-core peak, FLOP/s, by exact device name (vendor data sheets: half the "with
# sparsity" figure). H100 SXM reports itself as "H100 80GB HBM3"; PCIe and NVL parts run lower clocks.
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}
WARMUP_STEPS, TRIALS, STEPS_PER_TRIAL = 3, 5, 30
LOSS_TOLERANCE = 0.5  # |first loss - ln(vocab)|
VARIANTS = ["beitfast", "beitfast-jpeg", "beitfast-unfused", "beitfast-eager", "beitfast-compiled",
            "beitfast-fp8", "beitfast-checkpointed", "beitfast-cudagraphs", "hf-sdpa", "hf-sdpa-compiled",
            "hf-eager", "timm", "timm-compiled"]
SIZES = ["base", "large"]
BATCHES = [64, 128, 256]
SMOKE_BATCH = 4
JPEG_SIDE = 500  # the longer side of the JPEG files of beitfast-jpeg: ImageNet's typical 500x375


def model_config(size: str, smoke: bool):
    from beitfast import BEiTConfig

    if smoke:
        return BEiTConfig.tiny(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, vocab_size=64,
                               drop_path_rate=0.1)
    return {"base": BEiTConfig.base, "large": BEiTConfig.large}[size](drop_path_rate=0.1)


def step_flops(config, batch: int, lm_rows_per_image: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), counting matmuls only.

    Per layer and token: qkv 3D^2, proj D^2, MLP 2 * mlp_ratio * D^2 multiply-adds; attention scores
    and values 2 * N * D per token; the patch projection C p^2 D per patch (forward and weight
    gradient only: the images need no gradient); the LM head D V per masked row (the useful work:
    Hugging Face computes logits for every patch, but is charged, like us, for the masked ones).
    """
    D, L = config.embed_dim, config.depth
    N = config.num_patches + 1
    per_token = L * ((4 + 2 * config.mlp_ratio) * D * D + 2 * N * D)
    body = batch * (N * per_token + lm_rows_per_image * D * config.vocab_size)
    patch = batch * config.num_patches * config.in_chans * config.patch_size ** 2 * D
    return 2 * (3 * body + 2 * patch)


def peak_flops(gpu_name: str) -> float | None:
    return PEAK_BF16.get(gpu_name)


class TimmStyleMIM(nn.Module):
    """timm's BEiT blocks under the BEiT pre-training head (mask token, cls, LM head, loss). The masked
    rows come as precomputed flat indices, so the model does no boolean indexing."""

    def __init__(self, config):
        super().__init__()
        import timm

        self.backbone = timm.models.beit.Beit(
            img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
            depth=config.depth, num_heads=config.num_heads, num_classes=0, use_abs_pos_emb=False,
            use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=config.layer_scale_init_value,
            drop_path_rate=config.drop_path_rate,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size)

    def forward(self, images, mask, masked_rows, masked_labels):
        m = self.backbone
        x = m.patch_embed(images)
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        bias = m.rel_pos_bias()
        for blk in m.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
        x = self.norm(x)[:, 1:].flatten(0, 1).index_select(0, masked_rows)
        return F.cross_entropy(self.lm_head(x).float(), masked_labels)


def build(variant: str, config, device: torch.device, smoke: bool):
    """``(model, loss(batch) closure, details)`` of a variant; ``batch`` is the dict of prepared inputs."""
    import beitfast
    from beitfast import checkpoint

    compile_options = {"backend": "eager"} if smoke else {}
    details: dict = {}
    if variant.startswith("beitfast"):
        fused = variant in ("beitfast", "beitfast-jpeg", "beitfast-fp8", "beitfast-checkpointed")
        options = {"kernels": "eager" if variant == "beitfast-eager" else "auto",
                   "fuse_blocks": "auto" if fused else "off",
                   "checkpoint_blocks": -1 if variant == "beitfast-checkpointed" else 0}
        model = beitfast.BEiT(config.replace(**options)).to(device)
        if variant == "beitfast-fp8":
            from beitfast.train import float8_training

            float8_training(model, device)
        run = model
        if variant == "beitfast-compiled":
            run = torch.compile(model, **compile_options)
        elif variant == "beitfast-cudagraphs":
            if device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            run = torch.compile(model, mode="reduce-overhead")
        details["fuse_blocks"] = "compile" if fused and device.type == "cuda" else "off"
        return model, lambda b: run(b["images"], bool_masked_pos=b["mask"], labels=b["labels"],
                                    max_masked_per_image=b["max_masked_per_image"]), details
    if variant.startswith("hf"):
        import transformers

        implementation = variant.split("-")[1]
        # The same model as ours; hf_config_kwargs turns drop path off (inference), training keeps it.
        hf_kwargs = {**checkpoint.hf_config_kwargs(config, "masked_image_modeling"),
                     "drop_path_rate": config.drop_path_rate}
        hf_config = transformers.BeitConfig(**hf_kwargs, attn_implementation=implementation)
        model = transformers.BeitForMaskedImageModeling(hf_config).to(device)
        actual = model.config._attn_implementation
        if actual != implementation:
            raise RuntimeError(f"{variant}: transformers runs attention implementation {actual!r}")
        details["attn_implementation"] = actual
        run = torch.compile(model, **compile_options) if variant.endswith("-compiled") else model

        def hf_loss(b):  # HF's own loss indexes its logits with the boolean mask (a host sync): not here
            logits = run(pixel_values=b["images"], bool_masked_pos=b["mask"]).logits  # [B, N, V]
            return F.cross_entropy(logits.flatten(0, 1).index_select(0, b["masked_rows"]).float(),
                                   b["masked_labels"])

        return model, hf_loss, details
    if variant.startswith("timm"):
        model = TimmStyleMIM(config).to(device)
        run = torch.compile(model, **compile_options) if variant.endswith("-compiled") else model
        return model, lambda b: run(b["images"], b["mask"], b["masked_rows"], b["masked_labels"]), details
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


def make_batch(config, batch: int, device: torch.device) -> dict:
    """Inputs of every step, made once: images, blockwise masks, a token for every patch, and what the
    baselines index with (the masked rows' labels and flat row indices)."""
    from beitfast import MaskingGenerator
    from beitfast.data import masking_for

    images = torch.randn(batch, config.in_chans, *config.image_hw, device=device)
    masking = masking_for(config.grid)
    mask = MaskingGenerator(**masking, seed=0).batch(batch).to(device)  # 75 of 196 at 224
    if not mask.any(1).all():
        raise ValueError("every image needs a masked patch")
    labels = torch.randint(0, config.vocab_size, (batch, config.num_patches), device=device)
    masked_rows = mask.flatten().nonzero().squeeze(1)
    return {"images": images, "mask": mask, "labels": labels, "masked_rows": masked_rows,
            "masked_labels": labels.flatten()[masked_rows],
            "max_masked_per_image": masking["num_masking_patches"]}


def triton_launches_per_op(fn) -> dict[str, int]:
    """The Triton kernels of our ops (``beitfast.kernels.<op>``) one call of ``fn`` launches, by op."""
    from unittest import mock

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counts: dict[str, int] = {}
    patches = []
    for kind in (JITFunction, InterpretedFunction):
        def counted(kernel, *args, _run=kind.run, **kwargs):
            module = kernel.fn.__module__
            if module.startswith("beitfast.kernels.") and not kwargs.get("warmup"):
                op = module.rsplit(".", 1)[-1]
                counts[op] = counts.get(op, 0) + 1
            return _run(kernel, *args, **kwargs)
        patches.append(mock.patch.object(kind, "run", counted))
    with patches[0], patches[1]:
        fn()
    return dict(sorted(counts.items()))


def jpeg_feed(config, batch: int, device: torch.device, smoke: bool):
    """``(feed, workers)``: ``feed(inputs)`` puts the next batch of the real pre-training input path
    into ``inputs`` (its model views and masks; the labels stay random): JPEG files written once to a
    temporary folder (removed with ``feed``), the device input path (``pretrain_stream(on_device=True)``)
    with DataLoader workers, as ``Trainer`` runs it."""
    from beitfast.data import ImageFolder, TwoViewTransform, masking_for, pretrain_stream
    from beitfast.input_bench import write_jpegs

    folder = tempfile.TemporaryDirectory(prefix="beitfast-jpegs-")
    write_jpegs(folder.name, max_side=JPEG_SIDE, enlarge=True)
    size = config.image_hw[0]
    stream = pretrain_stream(ImageFolder(folder.name), TwoViewTransform(size, size // 2),
                             masking_for(config.grid), batch, on_device=True)
    workers = 2 if smoke else max(1, min(8, (os.cpu_count() or 2) // 2))
    batches = stream.iterate(0, workers, device)

    def feed(inputs: dict) -> None:
        assert folder  # the files live as long as the feed
        inputs["images"], _, inputs["mask"] = stream.prepare(next(batches), device)

    return feed, workers


def run_variant(variant: str, size: str, batch: int, trials: int, steps: int, device: torch.device,
                smoke: bool = False, profile_dir: str | None = None) -> dict:
    """Time one variant in this process; the result row's fields (or ``{"skipped": why}``)."""
    from beitfast.calibrate import time_trials

    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    config = model_config(size, smoke)
    try:
        model, loss_fn, details = build(variant, config, device, smoke)
    except (ImportError, ValueError) as error:  # a missing package, fp8 off Hopper: the reason is the row
        return {"skipped": f"{variant}: {error}"}
    except torch.OutOfMemoryError:
        return {"skipped": f"{variant} BEiT-{size} does not fit"}
    losses: list[torch.Tensor] = []

    graphs = variant.endswith("cudagraphs")
    feed = None

    def step():
        if feed is not None:
            with torch.profiler.record_function("data"):
                feed(inputs)
        if graphs:  # the previous replay's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(inputs)
        loss.backward()
        with torch.profiler.record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())  # kept past a CUDA graph replay; no host synchronisation

    try:
        inputs = make_batch(config, batch, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        if variant == "beitfast-jpeg":
            feed, details["data_workers"] = jpeg_feed(config, batch, device, smoke)
            details.update(input_path="device", jpeg_side=JPEG_SIDE, labels="random (tokenizer excluded)")
        times = time_trials(step, trials, steps, warmup=WARMUP_STEPS, device_type=device.type)
    except torch.OutOfMemoryError:
        return {"skipped": f"{variant} BEiT-{size} batch {batch} does not fit"}
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    curve = torch.stack(losses).float().tolist()
    if not graphs:
        details["triton_launches_per_op"] = triton_launches_per_op(step)
    expected = math.log(config.vocab_size)
    median_ms = statistics.median(times)
    row = {
        "variant": variant, "model": f"beit-{size}" if not smoke else "beit-smoke", "batch": batch,
        "trials": trials, "steps_per_trial": steps, "warmup_steps": WARMUP_STEPS,
        "step_ms_per_trial": times, "step_ms": median_ms, "step_ms_min": min(times),
        "step_ms_max": max(times),
        "images_per_s": batch / median_ms * 1e3, "images_per_s_min": batch / max(times) * 1e3,
        "images_per_s_max": batch / min(times) * 1e3, "peak_memory_bytes": peak,
        "first_loss": curve[0], "expected_first_loss": expected,
        "loss_ok": abs(curve[0] - expected) < LOSS_TOLERANCE and all(map(math.isfinite, curve)),
        "losses": curve, **details,
    }
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak_fl = peak_flops(gpu)
        flops = step_flops(config, batch, inputs["mask"].sum(1).float().mean().item())
        row.update(gpu=gpu, model_flops_per_step=flops, peak_bf16_flops=peak_fl,
                   mfu=flops / (median_ms / 1e3) / peak_fl if peak_fl else None)
    if profile_dir is not None:
        from beitfast.profiling import profile_calls

        def data_and_step():  # the profile shows the host-to-device copy of a batch, or the feed's input path
            if feed is None:
                with torch.profiler.record_function("data"):
                    inputs["images"] = host_images.to(device, non_blocking=True)
            step()

        host_images = inputs["images"].cpu()
        if device.type == "cuda":
            host_images = host_images.pin_memory()
        name = f"step-{variant}-{row['model']}-b{batch}"
        profiled = profile_calls(data_and_step, 3, profile_dir, name, device.type)
        row["regions_ms"] = profiled["regions_ms"]
        row["profile_trace"] = profiled["trace"]
        print(f"{name}: time by region (ms per step)")
        for region, ms in profiled["regions_ms"].items():
            print(f"  {region:<16} {ms:9.3f}")
        # What the regions do not account for (an idle GPU waiting for the host, unattributed kernels).
        print(f"  {'sum':<16} {sum(profiled['regions_ms'].values()):9.3f}   timed step: {median_ms:.3f}")
    return row


# -- the tests: one subprocess per variant ---------------------------------------------------------


def run_in_subprocess(variant, size, batch, trials, steps, smoke, profile_dir, timeout) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--size", size, "--batch", str(batch),
               "--trials", str(trials), "--steps", str(steps)]
    if smoke:
        command.append("--smoke")
    if profile_dir is not None:
        command += ["--profile", str(profile_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-4000:], done.stderr[-4000:], sep="\n")
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: the benchmark process failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_bf16_curves: dict[tuple[str, int], list[float]] = {}
_synthetic_rates: dict[tuple[str, int], float] = {}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrain_step(variant, size, batch, bench_device, smoke, record_result, report_trials, profile_dir):
    if smoke and (size, batch) != ("base", 128):
        pytest.skip("smoke mode runs one tiny configuration per variant")
    if smoke and variant != VARIANTS[0]:
        # Smoke mode times nothing: one variant goes through a fresh process (that path must not rot),
        # the others run here, sparing a process start and its imports each.
        row = run_variant(variant, size, SMOKE_BATCH, 2, 2, bench_device, smoke, profile_dir)
    else:
        trials, steps = (2, 2) if smoke else (TRIALS, STEPS_PER_TRIAL)
        row = run_in_subprocess(variant, size, SMOKE_BATCH if smoke else batch, trials, steps, smoke,
                                profile_dir, timeout=300 if smoke else 600)
    if "skipped" in row:
        pytest.skip(row["skipped"])
    key = (row["model"], row["batch"])
    if variant == "beitfast":
        _bf16_curves[key] = row["losses"]
        _synthetic_rates[key] = row["images_per_s"]
    if variant == "beitfast-jpeg" and key in _synthetic_rates:  # the same step on synthetic inputs
        row["synthetic_images_per_s"] = _synthetic_rates[key]
        row["real_over_synthetic"] = row["images_per_s"] / _synthetic_rates[key]
    if variant == "beitfast-fp8" and key in _bf16_curves:  # same seed, inputs and steps as beitfast
        bf16 = _bf16_curves[key]
        row["loss_gap_vs_bf16_max"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], bf16))
        row["loss_gap_vs_bf16_last"] = abs(row["losses"][-1] - bf16[-1]) / abs(bf16[-1])
    report_trials(row["step_ms_per_trial"], variant=variant, model=row["model"], batch=row["batch"],
                  images_per_s=row["images_per_s"])
    record_result("pretrain_step", **row)
    assert row["loss_ok"], (f"{variant}: first loss {row['first_loss']:.3f}, "
                            f"expected ~{row['expected_first_loss']:.3f}")
    if profile_dir is not None:
        assert Path(row["profile_trace"]).exists()


@pytest.mark.gpu
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", ["beitfast", "beitfast-checkpointed", "hf-sdpa", "timm"])
def test_largest_batch(variant, size, record_result):
    """The largest batch (powers of two from 64) whose training step fits in GPU memory, each try in
    a fresh process."""
    largest, batch = None, 64
    while batch <= 8192:
        row = run_in_subprocess(variant, size, batch, trials=1, steps=1, smoke=False, profile_dir=None,
                                timeout=600)
        if "skipped" in row:
            break
        largest = batch
        batch *= 2
    record_result("pretrain_largest_batch", variant=variant, model=f"beit-{size}", largest_batch=largest)


def main() -> None:
    parser = argparse.ArgumentParser(description="One variant of the step benchmark; prints its row.")
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--size", default="base", choices=SIZES)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--steps", type=int, default=STEPS_PER_TRIAL)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU; no timing claims")
    parser.add_argument("--profile", metavar="DIR", default=None, help="write a profile of the step to DIR")
    args = parser.parse_args()
    if args.smoke:
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke else "cuda")
    row = run_variant(args.variant, args.size, args.batch, args.trials, args.steps, device, args.smoke,
                      args.profile)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
