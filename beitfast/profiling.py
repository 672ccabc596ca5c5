"""Where a training step's time goes: a ``torch.profiler`` trace (Chrome/Perfetto JSON), a table of the
top kernels and the time by region (``pytest benchmarks --profile``, see benchmarks/conftest.py).

Regions are read from the names of the profiled ops and their callers, outermost caller first:
``optimizer`` (``Optimizer.step`` and the ``optimizer`` scope, gradient clipping included), ``data``
(the ``data`` scope), ``patch embedding`` (convolutions, our patch-embedding ops), ``loss`` (our LM
cross-entropy ops, log-softmax, NLL), ``attention`` (our attention ops, SDPA, FlexAttention,
softmax, batched matmuls), ``linear GEMMs`` (mm, addmm, scaled mm, by the op's own name) and everything
else as ``elementwise`` (LayerNorm, GELU, residual adds, copies, Inductor's fused kernels). An op is
charged its own (self) time: device time on a GPU, CPU time on a CPU. So the LM head inside our fused
loss counts as loss, while a baseline's LM head counts as a GEMM; an eager attention's matmuls count
as attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["REGIONS", "region_of", "profile_calls"]

# (region, lower-case name fragments), matched against each caller's name, outermost first: a fused
# op's own GEMMs belong to it.
_SCOPES: list[tuple[str, tuple[str, ...]]] = [
    ("optimizer", ("optimizer", "clip_grad", "adamw")),
    ("data", ("data",)),
    ("patch embedding", ("patch_embed", "conv")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("attention", ("attention", "gather_bias", "fold_bias_grad", "flex", "softmax", "bmm")),
]
# Matched against the op's own name only (``matmul`` is a linear layer or an attention product).
_GEMMS = ("aten::mm", "aten::addmm", "aten::_scaled_mm", "aten::_addmm_activation")
REGIONS = [region for region, _ in _SCOPES] + ["linear GEMMs", "elementwise"]


def region_of(names: list[str]) -> str:
    """The region of an op given its callers' names and its own (last), outermost first."""
    for name in names:
        lowered = name.lower()
        for region, fragments in _SCOPES:
            if any(fragment in lowered for fragment in fragments):
                return region
    if names and names[-1] in _GEMMS:
        return "linear GEMMs"
    return "elementwise"


def _chain(event) -> list[str]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names[::-1]


def profile_calls(fn: Callable[[], Any], calls: int, directory: str | Path, name: str,
                  device_type: str) -> dict[str, Any]:
    """Profile ``calls`` calls of ``fn`` (after one untimed call) and write ``<name>.trace.json`` (open
    in Perfetto or chrome://tracing) and ``<name>.kernels.txt`` (the top ops by self time) to
    ``directory``. Returns the paths and ``regions_ms``: milliseconds per call by region."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    on_gpu = device_type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    fn()
    if on_gpu:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if on_gpu:
            torch.cuda.synchronize()
    trace = directory / f"{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    self_time = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = directory / f"{name}.kernels.txt"
    table.write_text(prof.key_averages().table(sort_by=self_time, row_limit=30) + "\n")
    regions_us = dict.fromkeys(REGIONS, 0.0)
    for event in prof.events():
        spent = getattr(event, self_time)
        if spent > 0:
            regions_us[region_of(_chain(event))] += spent
    regions_ms = {region: us / 1e3 / calls for region, us in regions_us.items()}
    (directory / f"{name}.regions.json").write_text(json.dumps(regions_ms, indent=1) + "\n")
    return {"trace": str(trace), "kernels": str(table), "regions_ms": regions_ms}
