"""Shared set-up of the benchmark suites (``pytest benchmarks/``).

Options:

* ``--smoke``: tiny shapes on the CPU, so the suites run end to end anywhere (``tests/test_bench_smoke.py``
  does, inside ``make test``). Timings then mean nothing (rows are marked ``smoke`` and never tabled).
  A benchmark opts in by taking the ``smoke`` or
  the ``bench_device`` fixture (and shrinking its shapes); the others are skipped in smoke mode, so a
  full-size CPU benchmark never runs there.
* ``--profile``: every benchmark that measures also writes a ``torch.profiler`` trace
  (``<test>.trace.json``, Chrome/Perfetto), its top ops (``<test>.kernels.txt``) and the time by
  region (``<test>.regions.json``, see :mod:`beitfast.profiling`) to ``--profile-dir`` (default
  ``<results dir>/profiles/``).
* ``--results-dir``: where result rows go; by default a new scratch folder under the system's temporary
  folder, named at the end of the run. A benchmark run never rewrites the committed
  ``benchmarks/results/``: only ``make record-cpu`` and ``make record-gpu`` (a GPU run's rows, see
  ``benchmarks/gpu_out.py``) do, deliberately.

A baseline the run selected must run: when every test of ``hf-*``, ``timm*``, ``liger*`` or
``cut-cross-entropy`` was skipped (a broken import, a peer not installed), the run fails and says why. On
the CPU this holds in smoke mode for the installed baselines that run there (Hugging Face, timm).

Fixtures:

* ``bench_device``: ``cuda``; ``cpu`` under ``--smoke``; otherwise the benchmark is skipped without a GPU.
  Suites that cannot run tiny on a CPU carry ``@pytest.mark.gpu`` instead (skipped without a GPU).
* ``smoke``: whether ``--smoke`` is on.
* ``record_result(name, **fields)`` saves one measured row to ``<results>/<name>_<gpu>.json`` when
  the run has a GPU (kernel timings on CPU mean nothing) and returns it either way.
* ``record_cpu_result(name, **fields)`` saves to ``<results>/<name>_cpu.json``, for the few genuine
  CPU benchmarks (mask generation).
* ``measure(fn, repeats=20, warmup=5, trials=5)``: ``(median milliseconds per call, peak bytes
  allocated above what was allocated before)``, timed by :func:`beitfast.calibrate.time_trials`
  (CUDA events). The first measurement of a test also goes to pytest-benchmark (one round per trial),
  so ``--benchmark-json`` / ``--benchmark-compare`` compare runs over time; with ``--profile`` it
  is profiled too.
* ``training_modes(forward, params)`` gives the ``fwd``, ``bwd`` and ``fwd+bwd`` callables of an op.
* ``report_trials(benchmark, ms_per_trial, **extra)``: hands trial times measured elsewhere (a
  subprocess) to pytest-benchmark.

A row holds the fields, the test id, the machine (GPU or CPU model), the versions of Python, torch,
triton and CUDA, the date and the git commit. A file keeps one row per test id: a rerun replaces the
rows of the tests it ran and keeps the others.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from beitfast._files import write_atomically
from beitfast.calibrate import git_commit, time_trials
from beitfast.ops.dispatch import gpu_slug

HAS_GPU = torch.cuda.is_available()
# Baselines by variant name: the distribution that provides each, and whether it runs on the CPU.
BASELINES = {
    **{name: ("transformers", True) for name in ("hf-sdpa", "hf-sdpa-compiled", "hf-eager")},
    **{name: ("timm", True) for name in ("timm", "timm-compiled")},
    **{name: ("liger-kernel", False) for name in ("liger", "liger-fp32-accum")},
    "cut-cross-entropy": ("cut-cross-entropy", False),
}


def pytest_addoption(parser):
    group = parser.getgroup("beitfast benchmarks")
    group.addoption("--smoke", action="store_true",
                    help="tiny shapes on the CPU: the suites run end to end, the timings mean nothing")
    group.addoption("--profile", action="store_true",
                    help="write a torch.profiler trace, a top-ops table and the time by region per benchmark")
    group.addoption("--results-dir", default=None,
                    help="where result rows (and profiles) go; default a new scratch folder (never the "
                         "committed benchmarks/results: make record-cpu / record-gpu update those)")
    group.addoption("--profile-dir", default=None,
                    help="where --profile writes; default <results dir>/profiles")


_baseline_of = pytest.StashKey[dict]()
_baseline_outcomes = pytest.StashKey[dict]()
_scratch = pytest.StashKey[Path]()


def pytest_collection_modifyitems(config, items):
    smoke = config.getoption("--smoke")
    skip = pytest.mark.skip(reason="no smoke mode (takes neither the smoke nor the bench_device fixture)")
    config.stash[_baseline_of] = {}
    for item in items:
        if smoke and not {"smoke", "bench_device"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        names = [value for value in params.values() if isinstance(value, str) and value in BASELINES]
        if names and _required(names[0], smoke):
            config.stash[_baseline_of][item.nodeid] = names[0]


def _required(baseline: str, smoke: bool) -> bool:
    """Whether a run that selects ``baseline`` must measure it: always on a GPU; on the CPU in smoke
    mode when it runs on the CPU and is installed."""
    distribution, runs_on_cpu = BASELINES[baseline]
    if HAS_GPU:
        return True
    try:
        importlib.metadata.version(distribution)  # not imported: a shadowed import must not hide it
    except importlib.metadata.PackageNotFoundError:
        return False
    return smoke and runs_on_cpu


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    baseline = item.config.stash.get(_baseline_of, {}).get(item.nodeid)
    if baseline is not None and (report.when == "call" or report.skipped or report.failed):
        skipped = report.skipped and isinstance(report.longrepr, tuple)
        reason = report.longrepr[2].removeprefix("Skipped: ") if skipped else ""
        item.config.stash.setdefault(_baseline_outcomes, {}).setdefault(baseline, []).append(
            (report.outcome, reason))


def missing_baselines(config) -> dict[str, str]:
    """Baselines the run selected whose every test was skipped: name -> the first skip's reason."""
    outcomes = config.stash.get(_baseline_outcomes, {})
    return {name: runs[0][1] for name, runs in outcomes.items() if all(o == "skipped" for o, _ in runs)}


def pytest_sessionfinish(session, exitstatus):
    if missing_baselines(session.config) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for baseline, reason in missing_baselines(config).items():
        terminalreporter.write_line(f"FAILED: baseline {baseline} did not run (every test of it was skipped: "
                                    f"{reason}); a benchmark run must measure the baselines it selects",
                                    red=True)
    if _scratch in config.stash:
        terminalreporter.write_line(f"result rows: {config.stash[_scratch]} (scratch; --results-dir sets it)")


def results_dir(config) -> Path:
    """Where rows go: ``--results-dir``, else a scratch folder made for this run."""
    given = config.getoption("--results-dir")
    if given:
        return Path(given)
    if _scratch not in config.stash:
        config.stash[_scratch] = Path(tempfile.mkdtemp(prefix="beitfast-benchmark-results-"))
    return config.stash[_scratch]


@pytest.fixture
def smoke(request) -> bool:
    return request.config.getoption("--smoke")


@pytest.fixture
def bench_device(request) -> torch.device:
    if HAS_GPU:
        return torch.device("cuda")
    if request.config.getoption("--smoke"):
        return torch.device("cpu")
    pytest.skip("needs a CUDA device (or --smoke: tiny shapes on the CPU, no timing claims)")


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
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            # Set by gpu_check.sh where the checkout travelled without its .git.
            "commit": os.environ.get("BEITFAST_COMMIT") or git_commit()}


def _save(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r.get("test") != row["test"]] + [row]
    # An interrupted run must not leave a torn results file that every later run fails to parse.
    write_atomically(path, lambda temp: Path(temp).write_text(json.dumps(rows, indent=1) + "\n"))


def _recorder(request, cpu_benchmark: bool) -> Callable[..., dict[str, Any]]:
    folder = results_dir(request.config)
    smoke_run = request.config.getoption("--smoke")

    def record(name: str, **fields: Any) -> dict[str, Any]:
        on_gpu = HAS_GPU and not cpu_benchmark
        row = {"benchmark": name, **fields, "test": request.node.nodeid, "smoke": smoke_run,
               **machine("cuda" if on_gpu else "cpu")}
        if cpu_benchmark or smoke_run:
            _save(folder / f"{gpu_slug(name)}_cpu.json", row)
        elif on_gpu:
            _save(folder / f"{gpu_slug(name)}_{gpu_slug(row['gpu'])}.json", row)
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


def _report_trials(benchmark, ms_per_trial: list[float], **extra: Any) -> None:
    """Give pytest-benchmark one round per trial, in seconds (its unit), from times measured with our
    timer: its own clock would time host launches, not the GPU."""
    benchmark.extra_info.update(extra)
    if benchmark.disabled or benchmark.stats is not None:  # once per test: the first measurement
        return
    benchmark._mode = "beitfast measure"  # refuse a second use, as benchmark(...) itself does
    stats = benchmark._make_stats(1)
    for ms in ms_per_trial:
        stats.update(ms / 1e3)


@pytest.fixture
def report_trials(benchmark) -> Callable[..., None]:
    """``report_trials(ms_per_trial, **extra)``: hand trial times measured elsewhere to pytest-benchmark."""
    return lambda ms_per_trial, **extra: _report_trials(benchmark, ms_per_trial, **extra)


def profile_name(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", nodeid.split("::", 1)[-1]).strip("_")


@pytest.fixture
def profile_dir(request) -> Path | None:
    """``--profile-dir`` or ``<results dir>/profiles`` under ``--profile``, else None."""
    if not request.config.getoption("--profile"):
        return None
    if request.config.getoption("--profile-dir"):
        return Path(request.config.getoption("--profile-dir"))
    return results_dir(request.config) / "profiles"


@pytest.fixture
def measure(request, benchmark, bench_device, profile_dir) -> Callable[..., tuple[float, int]]:
    """``measure(fn, repeats=20, warmup=5, trials=5)``: (median milliseconds per call, peak bytes
    above the start); trials, median and spread go to pytest-benchmark (first call of a test)."""
    calls = []

    def run(fn: Callable[[], Any], repeats: int = 20, warmup: int = 5, trials: int = 5) -> tuple[float, int]:
        on_gpu = bench_device.type == "cuda"
        if request.config.getoption("--smoke"):
            repeats, warmup, trials = 1, 1, 2
        for _ in range(warmup):
            fn()
        base = 0
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = time_trials(fn, trials, repeats, device_type=bench_device.type)
        peak = torch.cuda.max_memory_allocated() - base if on_gpu else 0
        median = statistics.median(times)
        calls.append(1)
        label = f"measure_{len(calls)}"
        _report_trials(benchmark, times, **{f"{label}_median_ms": median, f"{label}_min_ms": min(times),
                                            f"{label}_max_ms": max(times)})
        if profile_dir is not None:
            from beitfast.profiling import profile_calls

            name = profile_name(request.node.nodeid) + (f"-{len(calls)}" if len(calls) > 1 else "")
            profile_calls(fn, 3, profile_dir, name, bench_device.type)
        return median, peak

    return run


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
