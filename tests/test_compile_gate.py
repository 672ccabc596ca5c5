"""The ahead-of-time compile gate (benchmarks/compile_gate.py): every Triton kernel and kept autotune
config compiles for sm_90a and sm_80 with triton 3.8 (this environment) and 3.6 (the GPU machines),
without spills on sm_90, inside shared memory, with its dots on tensor cores; and the gate really
fails on the mistakes it exists for.

Each gate run is a subprocess: the kernels must be imported without the interpreter, and triton 3.6
comes first on PYTHONPATH (``BEITFAST_TRITON36``, which `make test` installs and sets)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GATE = ROOT / "benchmarks" / "compile_gate.py"
SAMPLES = Path(__file__).resolve().parent / "compile_gate" / "samples.py"


def _gate(*args, triton_path=None, timeout=1800):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".cache" / "beitfast" / "triton-aot"))
    if triton_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_path, env.get("PYTHONPATH")]))
    # Not the repository root: a top-level `kernels` folder must not become importable.
    return subprocess.run([sys.executable, str(GATE), *args], cwd=GATE.parent, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _triton36() -> str:
    path = os.environ.get("BEITFAST_TRITON36")
    if not path or not (Path(path) / "triton").is_dir():
        pytest.skip("BEITFAST_TRITON36 names no triton 3.6 folder (`make test` installs and sets it)")
    return path


@pytest.mark.parametrize("version", ["3.8", "3.6"])
def test_every_kernel_compiles_for_sm90_and_sm80(version, tmp_path):
    triton_path = _triton36() if version == "3.6" else None
    # The reports go to tmp_path: a test run leaves the tracked ones (`make compile-gate`) alone.
    result = _gate("--jobs", str(os.cpu_count() or 1), "--out", str(tmp_path), triton_path=triton_path)
    output = result.stdout + result.stderr
    assert f"compile gate (triton {version}." in output, output[-3000:]
    assert result.returncode == 0, output[-6000:]


def test_the_gate_fails_on_a_float_global_a_spill_and_an_fma_dot():
    result = _gate("--arch", "90", "--scenarios", str(SAMPLES), "--no-write", "--jobs", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    fails = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert any("reads_float_global" in f and "Cannot access global variable SCALE" in f
               for f in fails), output
    assert any("BLOCK_M=256" in f and "spills" in f for f in fails), output
    assert any("PRECISION=ieee" in f and "not lowered to tensor cores" in f for f in fails), output
    # The clean kernel passes: the gate does not fail everything.
    assert not any("PRECISION=tf32" in f and "BLOCK_M=64" in f for f in fails), output
    assert len(fails) == 3, output


def test_a_library_without_device_code_has_no_cuda_rows():
    # A CPU-only build of the extension (BEITFAST_BUILD_CUDA=0, or no nvcc) gives an empty CUDA table.
    # In a subprocess: importing the gate drops TRITON_INTERPRET from its process's environment.
    host_only = next(p for p in map(Path, ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6",
                                           sys.executable]) if p.exists())
    code = f"import compile_gate; print(compile_gate.cuda_rows({str(host_only)!r}))"
    done = subprocess.run([sys.executable, "-c", code],
                          cwd=GATE.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_report_prints_a_table_of_the_written_reports(tmp_path):
    result = _gate("--arch", "90", "--scenarios", str(SAMPLES), "--out", str(tmp_path), "--jobs", "2")
    assert list(tmp_path.glob("compile_*_sm90.json")), result.stdout + result.stderr
    table = _gate("--report", "--out", str(tmp_path)).stdout
    assert "tile_product" in table and "wgmma" in table and "FAIL" in table and "ok" in table, table
