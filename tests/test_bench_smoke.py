"""The benchmark suites run end to end on the CPU in smoke mode (tiny shapes, no timing claims), so
they cannot rot: ``pytest benchmarks --smoke --profile`` passes, writes rows only where it is told,
profiles every measured benchmark (trace, top ops, time by region) and reports to pytest-benchmark.
The README's step table is what ``benchmarks/make_tables.py`` makes of the recorded results."""

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module(file: str):
    """A module of benchmarks/ loaded by path (no test folder is on sys.path)."""
    spec = importlib.util.spec_from_file_location(Path(file).stem, BENCHMARKS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke_rows_in(folder: Path) -> list[str]:
    """Rows marked smoke in the benchmark row files (lists of rows; other JSON files are not rows)."""
    found = []
    for path in folder.glob("*.json"):
        rows = json.loads(path.read_text())
        if isinstance(rows, list):
            found += [f"{path.name}: {row.get('test')}" for row in rows if isinstance(row, dict) and row.get("smoke")]
    return found


@pytest.mark.slow
def test_benchmarks_run_in_smoke_mode(tmp_path):
    results = tmp_path / "results"
    env = _as_a_user_runs_it()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(BENCHMARKS), "--smoke", "--profile", "--results-dir", str(results),
         "--benchmark-json", str(tmp_path / "benchmark.json"), "-q", "-p", "no:cacheprovider", "-x"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert not _smoke_rows_in(BENCHMARKS / "results")  # a smoke run never writes to the recorded results

    steps = json.loads((results / "pretrain_step_cpu.json").read_text())
    ran = {row["variant"] for row in steps}
    assert {"beitfast", "beitfast-jpeg", "beitfast-compiled", "hf-sdpa", "hf-sdpa-compiled", "timm",
            "timm-compiled"} <= ran
    for row in steps:
        assert row["smoke"] and row["loss_ok"] and row["trials"] == len(row["step_ms_per_trial"]) == 2
        regions = row["regions_ms"]
        assert set(regions) == {"optimizer", "data", "patch embedding", "loss", "attention", "linear GEMMs",
                                "elementwise"}
        assert regions["optimizer"] > 0 and regions["linear GEMMs"] > 0 and sum(regions.values()) > 0
        trace = json.loads(Path(row["profile_trace"]).read_text())
        assert trace["traceEvents"]
    profiles = {p.name for p in (results / "profiles").iterdir()}
    assert "step-beitfast-beit-smoke-b4.kernels.txt" in profiles
    assert any(name.startswith("test_patch_embed_eager") and name.endswith(".trace.json") for name in profiles)

    benchmarks = json.loads((tmp_path / "benchmark.json").read_text())["benchmarks"]
    names = {b["name"] for b in benchmarks}
    assert "test_pretrain_step[beitfast-base-128]" in names and "test_masking_cpu[python]" in names
    step = next(b for b in benchmarks if b["name"] == "test_pretrain_step[beitfast-base-128]")
    assert step["stats"]["rounds"] == 2  # one round per trial, in seconds
    row = next(r for r in steps if r["variant"] == "beitfast")
    assert step["stats"]["min"] == pytest.approx(min(row["step_ms_per_trial"]) / 1e3)
    jpeg = next(r for r in steps if r["variant"] == "beitfast-jpeg")  # fed by the device input path, on CPU
    assert jpeg["input_path"] == "device" and jpeg["data_workers"] == 2 and jpeg["regions_ms"]["data"] > 0
    assert jpeg["synthetic_images_per_s"] == row["images_per_s"]


def _as_a_user_runs_it() -> dict[str, str]:
    """The environment without the interpreter, and not that of an xdist worker (pytest-benchmark saves
    nothing there)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}


def _committed_results() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (BENCHMARKS / "results").iterdir() if path.is_file()}


def _rows_folder(output: str) -> Path:
    """The scratch folder a run without --results-dir names at its end."""
    return Path(re.search(r"^result rows: (\S+)", output, re.M).group(1))


@pytest.mark.slow
def test_hugging_face_baselines_run_from_the_repository_root():
    """``python -m pytest benchmarks`` from the checkout, as gpu_check.sh runs it: with PYTHONSAFEPATH the
    checkout's ``kernels/`` does not shadow Hugging Face's ``kernels`` (which transformers imports), so
    the ``hf-*`` rows are measured; without it they would be skipped, and a skipped baseline fails the run."""
    committed = _committed_results()
    env = _as_a_user_runs_it()
    command = [sys.executable, "-m", "pytest", "benchmarks", "--smoke", "-q", "-p", "no:cacheprovider",
               "-k", "test_pretrain_step and hf-sdpa-base-128"]
    done = subprocess.run(command, cwd=BENCHMARKS.parent, env={**env, "PYTHONSAFEPATH": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    rows = json.loads((_rows_folder(done.stdout) / "pretrain_step_cpu.json").read_text())
    assert [row["variant"] for row in rows] == ["hf-sdpa"] and rows[0]["commit"]
    assert _committed_results() == committed  # the rows went to a scratch folder
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed: nothing to shadow")
    env.pop("PYTHONSAFEPATH", None)
    shadowed = subprocess.run(command, cwd=BENCHMARKS.parent, env=env, capture_output=True, text=True,
                              timeout=600)
    assert shadowed.returncode == 1, shadowed.stdout[-5000:]
    assert "FAILED: baseline hf-sdpa did not run" in shadowed.stdout


@pytest.mark.slow
def test_a_cpu_benchmark_run_leaves_the_committed_results_alone(tmp_path):
    """A genuine CPU benchmark run without --results-dir writes its rows to a scratch folder; only
    ``make record-cpu`` updates benchmarks/results."""
    committed = _committed_results()
    command = [sys.executable, "-m", "pytest", str(BENCHMARKS / "test_masking_bench.py"), "-q",
               "-p", "no:cacheprovider", "-k", "test_masking_cpu and cpp"]
    done = subprocess.run(command, cwd=tmp_path, env=_as_a_user_runs_it(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    if "1 skipped" in done.stdout:
        pytest.skip("the C++ masking backend is not built")
    rows = json.loads((_rows_folder(done.stdout) / "masking_cpu.json").read_text())
    assert [row["backend"] for row in rows] == ["cpp"] and not rows[0]["smoke"]
    assert _committed_results() == committed


def step_row(variant, images_per_s, **extra):
    return {"benchmark": "pretrain_step", "variant": variant, "model": "beit-base", "batch": 128, "trials": 5,
            "steps_per_trial": 30, "images_per_s": images_per_s, "images_per_s_min": images_per_s - 10,
            "images_per_s_max": images_per_s + 10, "step_ms": 128e3 / images_per_s, "peak_memory_bytes": 3 * 2**30,
            "mfu": 0.42, "first_loss": 9.01, "loss_ok": True, "gpu": "NVIDIA H200", "date": "2026-11-28T15:00:00",
            "commit": "0123456789abcdef", "smoke": False, **extra}


def test_make_tables_fills_the_readme_from_results(tmp_path):
    tables = _benchmark_module("make_tables.py")
    (tmp_path / "results").mkdir()
    rows = [step_row("hf-sdpa", 900.0), step_row("beitfast", 1500.0, mfu=None),
            step_row("beitfast-fp8", 1800.0, loss_gap_vs_bf16_max=0.0123),
            step_row("beitfast-jpeg", 1290.0, data_workers=8)]
    (tmp_path / "results" / "pretrain_step_nvidia_h200.json").write_text(json.dumps(rows))
    smoke = [step_row("beitfast", 1.0, smoke=True, gpu=None)]
    (tmp_path / "results" / "pretrain_step_cpu.json").write_text(json.dumps(smoke))
    ops = [{"benchmark": "attention", "backend": backend, "mode": mode, "shape": "beit-b-224", "batch": 128,
            "ms": ms, "peak_memory_bytes": 2**30, "gpu": "NVIDIA H200", "date": "2026-11-28T15:00:00"}
           for backend, mode, ms in (("sdpa", "fwd+bwd", 1.25), ("triton", "fwd+bwd", 0.5), ("triton", "fwd", 0.2))]
    (tmp_path / "results" / "attention_nvidia_h200.json").write_text(json.dumps(ops))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{tables.BEGIN}\nold\n{tables.END}\n\n{tables.OPS_BEGIN}\n{tables.OPS_END}\nafter\n")
    args = ["--results", str(tmp_path / "results"), "--readme", str(readme)]
    assert tables.main([*args, "--check"]) == 1
    assert tables.main(args) == 0 and tables.main([*args, "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith(f"{tables.OPS_END}\nafter\n") and "old" not in text
    assert "**attention forward + backward, NVIDIA H200** (batch 128, shape beit-b-224; measured 2026-11-28)" in text
    assert "| triton | 0.500 | 1024 |\n| sdpa | 1.250 | 1024 |" in text  # fastest first, fwd+bwd only
    lines = [line for line in text.split(tables.END)[0].splitlines() if line.startswith("| ")]
    assert lines[1].endswith("| 9.01 ok; curve within 1.2% of bf16 |")  # fastest first
    assert lines[2].startswith("| beitfast | 1500 (1490-1510) | 85.3 | 3.0 | n/a |")
    assert lines[3].startswith("| beitfast-jpeg | 1290 (1280-1300) | 99.2 | 3.0 | 42.0% | 9.01 ok |")
    assert lines[4].startswith("| hf-sdpa | 900 (890-910) | 142.2 | 3.0 | 42.0% | 9.01 ok |")
    assert ("Real JPEGs: `beitfast-jpeg` (JPEG files through the device input path, 8 DataLoader workers, "
            "tokenizer excluded) makes 1290 images/s, 86.0% of `beitfast` on synthetic inputs (1500); goal >= "
            "90%: not met.") in text
    assert "NVIDIA H200" in text and "2026-11-28" in text and "01234567" in text
    assert text.count("| beitfast |") == 1  # the smoke row is not tabled
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="marker"):
        tables.main(args)


def test_readme_step_table_matches_the_results():
    assert _benchmark_module("make_tables.py").main(["--check"]) == 0, "run python benchmarks/make_tables.py"


def test_regions_by_caller_names():
    from beitfast.profiling import region_of

    cases = {
        ("Optimizer.step#AdamW.step", "aten::_fused_adamw_"): "optimizer",
        ("optimizer", "aten::_foreach_norm"): "optimizer",
        ("data", "aten::copy_"): "data",
        ("beitfast::masked_patch_embed", "aten::mm"): "patch embedding",  # a fused op owns its GEMMs
        ("autograd::engine::evaluate_function: ConvolutionBackward0", "aten::convolution_backward"): "patch embedding",
        ("beitfast::lm_cross_entropy_reduced", "aten::mm"): "loss",
        ("aten::cross_entropy_loss", "aten::log_softmax"): "loss",
        ("beitfast::attention_fwd",): "attention",
        ("aten::matmul", "aten::bmm"): "attention",  # an attention product, not a linear layer
        ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention"): "attention",
        ("aten::linear", "aten::addmm"): "linear GEMMs",
        ("autograd::engine::evaluate_function: AddmmBackward0", "AddmmBackward0", "aten::mm"): "linear GEMMs",
        ("aten::linear",): "elementwise",  # the wrapper's own overhead, not the GEMM
        ("aten::native_layer_norm",): "elementwise",
        ("CompiledFunction", "triton_poi_fused_add_mul_0"): "elementwise",
    }
    for names, region in cases.items():
        assert region_of(list(names)) == region, names


def test_attention_calibration_pairs_each_profiled_kernel_with_the_models_prediction():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = _benchmark_module("test_attention_bench.py")

    def event(name, us, device=DeviceType.CUDA):
        return SimpleNamespace(device_type=device, name=name, device_time_total=us)

    events = [event("_fwd_kernel", 300.0), event("_fwd_kernel", 30.0), event("_bwd_q_kernel", 60.0),
              event("_bwd_kv_kernel", 90.0), event("_bwd_bias_kernel", 120.0),
              event("elementwise_kernel", 15.0), event("beitfast::attention_fwd", 999.0, DeviceType.CPU)]
    measured = bench.device_kernel_us(events, calls=3)
    assert measured == {"_fwd_kernel": 110.0, "_bwd_q_kernel": 20.0, "_bwd_kv_kernel": 30.0,
                        "_bwd_bias_kernel": 40.0, "elementwise_kernel": 5.0}
    rows = bench.calibration_rows(measured, 16, 1025)
    assert [row["kernel"] for row in rows] == [*bench.MODELLED, "other kernels"]
    model = bench.work_model()
    for row in rows[:-1]:
        kind = bench.MODELLED[row["kernel"]]
        tile = None if kind == "bias" else bench.autotuned_tile(row["kernel"])
        assert row["measured_us"] == measured[row["kernel"]]
        assert row["model_us"] == pytest.approx(1e6 * model.predicted(kind, 16, 1025, tile).seconds())
        assert row["model_tile_us"] == pytest.approx(1e6 * model.predicted(kind, 16, 1025).seconds())
        assert row["model_bound"] in ("tensor", "HBM", "L2")
    assert rows[-1] == {"kernel": "other kernels", "measured_us": 5.0}


def test_the_read_probe_reads_every_block_of_its_buffer_each_time():
    import torch

    bench = _benchmark_module("test_attention_bench.py")
    x = torch.randn(5 * bench.READ_BLOCK)  # 5 blocks for 2 programs: blocks 0, 2, 4 and 1, 3
    out = torch.full((2 * bench.READ_BLOCK,), float("nan"))
    bench.read_once(x, out, repeats=3)
    blocks = x.view(5, -1)
    torch.testing.assert_close(out.view(2, -1), 3 * torch.stack([blocks[0::2].sum(0), blocks[1::2].sum(0)]))

