"""Blockwise mask generation: a batch of 2048 BEiT masks (14x14 patches, 75 masked), the official
Python loop against the native C++ backend (CPU, threaded over images) and the CUDA backend.

The CPU rows go to ``results/masking_cpu.json`` (a genuine CPU benchmark); the CUDA row, GPU only,
to ``results/masking_<gpu>.json``. The C++ row carries its speed-up over the Python loop when both
ran in the same session (goal: at least 50x). ``--smoke``: a batch of 64, nothing recorded.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from beitfast import MaskingGenerator, _ext

BATCH, SMOKE_BATCH = 2048, 64
GRID, NUM_MASKED = (14, 14), 75
SPEEDUP_GOAL = 50.0
_median_seconds: dict[str, float] = {}


def _generate(generator: MaskingGenerator, backend: str, batch: int = BATCH) -> torch.Tensor:
    if backend == "cuda":
        masks = generator.batch(batch, device="cuda", backend="cuda")
        torch.cuda.synchronize()
        return masks
    return generator.batch(batch, backend=backend)


def _row(benchmark, backend: str, batch: int = BATCH) -> dict:
    times = benchmark.stats.stats
    return dict(backend=backend, batch=batch, grid=list(GRID), num_masking_patches=NUM_MASKED,
                rounds=times.rounds, min_s=times.min, median_s=times.median, mean_s=times.mean,
                masks_per_s=batch / times.median)


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_masking_cpu(benchmark, backend, smoke, record_cpu_result):
    if backend == "cpp" and _ext.missing("blockwise_masks.out", "cpu"):
        pytest.skip(_ext.missing("blockwise_masks.out", "cpu"))
    generator = MaskingGenerator(GRID, NUM_MASKED, seed=0)
    batch = SMOKE_BATCH if smoke else BATCH
    if backend == "python":  # about a second per batch: a few rounds suffice
        masks = benchmark.pedantic(_generate, args=(generator, backend, batch), rounds=5, warmup_rounds=1)
    else:
        masks = benchmark(_generate, generator, backend, batch)
    assert masks.shape == (batch, GRID[0] * GRID[1])
    if benchmark.stats is None:  # --benchmark-disable: run once, nothing timed
        return
    row = _row(benchmark, backend, batch)
    _median_seconds[backend] = row["median_s"]
    if backend == "cpp" and "python" in _median_seconds:
        row["speedup_vs_python"] = _median_seconds["python"] / row["median_s"]
        row["speedup_goal"] = SPEEDUP_GOAL
    benchmark.extra_info.update(row)
    if not smoke:  # a smoke run's rows would replace the measured ones
        record_cpu_result("masking", **row)


@pytest.mark.gpu
def test_masking_cuda(benchmark, record_result):
    missing = _ext.missing("blockwise_masks.out", "cuda")
    if missing:
        pytest.skip(missing)
    generator = MaskingGenerator(GRID, NUM_MASKED, seed=0)
    _generate(generator, "cuda")
    masks = benchmark(_generate, generator, "cuda")
    assert masks.shape == (BATCH, GRID[0] * GRID[1]) and masks.is_cuda
    if benchmark.stats is None:  # --benchmark-disable: run once, nothing timed
        return
    row = _row(benchmark, "cuda")
    # The whole call (launch and synchronise) is timed; kernel time alone from CUDA events.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    kernel_ms = []
    for _ in range(20):
        start.record()
        generator.batch(BATCH, device="cuda", backend="cuda")
        end.record()
        torch.cuda.synchronize()
        kernel_ms.append(start.elapsed_time(end))
    row["event_median_ms"] = statistics.median(kernel_ms)
    if "python" in _median_seconds:
        row["speedup_vs_python"] = _median_seconds["python"] / row["median_s"]
    benchmark.extra_info.update(row)
    record_result("masking", **row)
