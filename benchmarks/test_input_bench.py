"""The input pipeline: what ``beitfast bench --data`` prints, recorded.

* CPU (a genuine CPU benchmark, ``results/input_pipeline_cpu.json``): today's PIL path against the
  fast CPU path on the same JPEGs (the embedded photographs, longer side 500), per core (one thread,
  timed batch by batch in turn) and with one DataLoader process per core. Goal: >= 2x per core.
* GPU (``results/input_pipeline_<gpu>.json``): the device path (nvJPEG, matrix-product resampling,
  batched jitter) and the tokenizers alone; the end-to-end BEiT-B pre-training step fed real JPEGs
  through the device path, tokenizer and masks included, next to the same step on synthetic inputs.
  Goals: >= 5,000 images/s for the device path; the real-JPEG step within 10% of the synthetic one.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from beitfast import BEiT, BEiTConfig, MaskingGenerator
from beitfast.data import TwoViewTransform, derive_seed, masking_for
from beitfast.input_bench import bench_paths, bench_tokenizers, write_jpegs
from beitfast.pipeline import DeviceTwoView

PER_CORE_GOAL = 2.0


def _by_path(rows: list[dict]) -> dict[str, dict]:
    return {row["path"]: row for row in rows}


def test_input_paths_cpu(record_cpu_result):
    rows = _by_path(bench_paths(batch_size=32, batches=10, workers=os.cpu_count() or 1))
    speedup = rows["fast-cpu"]["speedup_per_core_vs_pil"]
    record_cpu_result("input_pipeline", paths=list(rows.values()), speedup_per_core=speedup,
                      speedup_goal=PER_CORE_GOAL)


@pytest.mark.gpu
def test_input_paths_gpu(record_result):
    rows = bench_paths(batch_size=256, batches=8, device="cuda", device_path=True)
    record_result("input_pipeline", paths=rows)


@pytest.mark.gpu
def test_tokenizers_gpu(record_result):
    record_result("input_pipeline", paths=bench_tokenizers(batch_size=256, batches=10, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("tokenizer_kind", ["kmeans", "dalle"])
def test_step_with_real_jpegs_against_synthetic_inputs(tmp_path, record_result, tokenizer_kind):
    """BEiT-B, batch 128, bf16: images/s of the training step on fixed synthetic tensors, and of the
    same step whose inputs are made each step from JPEG files (read, decoded and augmented on the GPU,
    tokenized, masked)."""
    from beitfast.tokenizers import DalleTokenizer, KMeansTokenizer

    batch, steps = 128, 10
    config = BEiTConfig.base()
    model = BEiT(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokenizer = (KMeansTokenizer(torch.randn(config.vocab_size, 3 * 8 * 8)) if tokenizer_kind == "kmeans"
                 else DalleTokenizer(vocab_size=config.vocab_size)).cuda()
    masking = MaskingGenerator(**masking_for(config.grid), seed=0)
    paths = write_jpegs(tmp_path)
    device_views = DeviceTwoView(TwoViewTransform(), "cuda")

    def train(images, tokens, masks):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(images, bool_masked_pos=masks, labels=tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def real_inputs(step):
        blobs = [paths[(step * batch + j) % len(paths)].read_bytes() for j in range(batch)]
        rngs = [random.Random(derive_seed(0, step, j)) for j in range(batch)]
        images, tokenizer_views = device_views.views(blobs, rngs)
        tokens = tokenizer.tokenize(tokenizer_views).flatten(1)
        return images, tokens, masking.batch(batch, device="cuda")

    synthetic = real_inputs(0)

    def rate(make_inputs) -> float:
        for step in range(3):
            train(*make_inputs(step))
        torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(steps):
            train(*make_inputs(step))
        torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - started)

    synthetic_rate = rate(lambda step: synthetic)
    real_rate = rate(real_inputs)
    record_result("step_real_jpegs", model="base", batch=batch, tokenizer=tokenizer_kind,
                  synthetic_images_per_s=synthetic_rate, real_jpeg_images_per_s=real_rate,
                  real_over_synthetic=real_rate / synthetic_rate, goal=0.9)
