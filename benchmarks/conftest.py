"""Shared set-up of the benchmark suites (``pytest benchmarks/``).

* Benchmarks marked ``@pytest.mark.gpu`` are skipped where there is no CUDA device (``beitfast.testing``).
* ``record_result(name, **fields)`` saves one measured row to ``results/<name>_<gpu>.json`` when the
  run has a GPU (kernel timings on CPU mean nothing) and returns it either way.
* ``measure(fn, repeats=20, warmup=5)`` times a GPU callable with CUDA events:
  ``(milliseconds per call, peak bytes allocated above what was allocated before)``.
* ``training_modes(forward, params)`` gives the ``fwd``, ``bwd`` and ``fwd+bwd`` callables of an op.
* ``record_cpu_result(name, **fields)`` saves to ``results/<name>_cpu.json``, for the few genuine CPU
  benchmarks (mask generation).

A row holds the fields, the test id, the machine (GPU or CPU model), the versions of Python, torch,
triton and CUDA, the date and the git commit. A file keeps one row per test id: a rerun replaces the
rows of the tests it ran and keeps the others.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from beitfast._files import write_atomically
from beitfast.calibrate import cuda_event_timer, git_commit
from beitfast.ops.dispatch import gpu_slug

HAS_GPU = torch.cuda.is_available()
RESULTS = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device_type: str) -> dict[str, Any]:
    """What a result was measured on: the GPU (or CPU), and the software versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device_type == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        device = {"gpu": properties.name, "gpu_memory_bytes": properties.total_memory,
                  "compute_capability": f"{properties.major}.{properties.minor}"}
    else:
        device = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    return {**device, "python": sys.version.split()[0], "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit()}


def _save(path: Path, row: dict[str, Any]) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r.get("test") != row["test"]] + [row]
    # An interrupted run must not leave a torn results file that every later run fails to parse.
    write_atomically(path, lambda temp: Path(temp).write_text(json.dumps(rows, indent=1) + "\n"))


def _recorder(request, cpu_benchmark: bool) -> Callable[..., dict[str, Any]]:
    def record(name: str, **fields: Any) -> dict[str, Any]:
        on_gpu = HAS_GPU and not cpu_benchmark
        row = {"benchmark": name, **fields, "test": request.node.nodeid,
               **machine("cuda" if on_gpu else "cpu")}
        if cpu_benchmark:
            _save(RESULTS / f"{gpu_slug(name)}_cpu.json", row)
        elif on_gpu:
            _save(RESULTS / f"{gpu_slug(name)}_{gpu_slug(row['gpu'])}.json", row)
        return row

    return record


@pytest.fixture
def record_result(request) -> Callable[..., dict[str, Any]]:
    """``record_result(name, **fields)``: a GPU benchmark's row, saved when there is a GPU."""
    return _recorder(request, cpu_benchmark=False)


@pytest.fixture
def record_cpu_result(request) -> Callable[..., dict[str, Any]]:
    """``record_cpu_result(name, **fields)``: a CPU benchmark's row, always saved."""
    return _recorder(request, cpu_benchmark=True)


def _measure(fn: Callable[[], Any], repeats: int = 20, warmup: int = 5) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = cuda_event_timer(warmup=0, repeats=repeats)(fn)
    return ms, torch.cuda.max_memory_allocated() - base


@pytest.fixture
def measure() -> Callable[..., tuple[float, int]]:
    """``measure(fn, repeats=20, warmup=5)``: (milliseconds per call, peak bytes above the start)."""
    return _measure


def _training_modes(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> list[tuple[str, Callable]]:
    """``[(mode, fn)]`` for forward, backward (through one kept graph) and forward + backward."""
    out = forward()
    grad = torch.randn_like(out)

    def backward():
        torch.autograd.grad(out, params, grad, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(forward(), params, grad)

    return [("fwd", forward), ("bwd", backward), ("fwd+bwd", forward_backward)]


@pytest.fixture
def training_modes() -> Callable[..., list[tuple[str, Callable]]]:
    """``training_modes(forward, params)``: the fwd, bwd and fwd+bwd callables of an op."""
    return _training_modes
