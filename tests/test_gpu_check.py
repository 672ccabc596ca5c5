"""A dry run of ``benchmarks/gpu_check.sh``, the one call on a GPU machine, here on the CPU and offline:
each phase's command goes to a stub (``GPU_CHECK_STUB``) that records it, against a fake ``$OUT``. It
checks the phase plan against the 9-minute budget, the tests the phases name, the build's status
handling, the per-phase limits, resuming, and the contract of what comes back (``gpu_out.check``), which a
phase breaking it must fail. ``make gpu-preflight`` runs the real commands on a stand-in of the machine."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BUDGET_S = 540  # 9 minutes on an H100, cold caches
# Records the command of each phase, writes a row (and, for the profile phase, a trace), and obeys
# STUB_FAIL (exit 3 for that phase), STUB_SLEEP (sleep in that phase) and STUB_LITTER (a phase that
# writes N files into $OUT, one with a bad name).
STUB = """#!/bin/bash
phase=$1; shift
mkdir -p "$WORK/commands" "$WORK/results"
printf '%s\\n' "$@" >"$WORK/commands/$phase"
echo "stub $phase"
echo '[{"benchmark": "fake", "test": "'$phase'", "gpu": null}]' >"$WORK/results/fake-$phase.json"
if [[ $phase == profile ]]; then
    mkdir -p "$WORK/profile"
    echo '{"traceEvents": [{"cat": "kernel", "name": "k"}, {"cat": "cpu_op", "name": "c"}]}' \\
        >"$WORK/profile/step.trace.json"
fi
if [[ $phase == "${STUB_LITTER_PHASE:-}" ]]; then
    for i in $(seq "$STUB_LITTER"); do echo "$i" >"$OUT/extra-$i.txt"; done
    echo bad >"$OUT/bad name+.json"
fi
[[ $phase == "${STUB_SLEEP_PHASE:-}" ]] && sleep "$STUB_SLEEP"
if [[ $phase == "${STUB_FAIL:-}" ]]; then echo "BUILD FAILED: stub"; exit 3; fi
exit 0
"""


def gpu_out():
    spec = importlib.util.spec_from_file_location("gpu_out", ROOT / "benchmarks" / "gpu_out.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path, **env):
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    environment = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "GPU_CHECK_STUB": str(stub),
                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return done, summary, out, work


def statuses(summary):
    return {phase["name"]: phase["status"] for phase in summary["phases"]}


def test_the_plan_fits_the_budget_and_returns_what_the_contract_allows(tmp_path):
    done, summary, out, work = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    phases = summary["phases"]
    names = [p["name"] for p in phases]
    assert names[:5] == ["build", "correctness", "step-beitfast", "step-hf-sdpa", "step-timm"]
    assert names[-1] == "flex-autotune" and "profile" in names
    assert names.index("profile") < names.index("step-hf-sdpa-compiled")  # compiled baselines last
    assert all(status == "ok" for status in statuses(summary).values())
    estimates = sum(p["estimate_s"] for p in phases)
    assert summary["estimate_total_s"] == estimates <= BUDGET_S - 15 and summary["budget_s"] == BUDGET_S
    assert phases[0]["estimate_s"] + phases[1]["estimate_s"] <= 120  # build and correctness in about 2 min
    for phase in phases:  # a cap of its own, never the whole budget, never under the estimate
        assert phase["estimate_s"] <= phase["cap_s"] <= BUDGET_S // 3, phase
        assert phase["limit_s"] <= phase["cap_s"] and phase["exit_code"] == 0
    assert not summary["not_done"] and summary["next_call"] is None and summary["contract"]["ok"]
    listing = {p.name: p.stat().st_size for p in out.rglob("*")}
    assert set(listing) == {"gpu_check.log", "summary.json", "rows-cpu.tar.gz", "profile-cpu.tar.gz"}
    assert gpu_out().check(out) == []
    with tarfile.open(out / "rows-cpu.tar.gz") as tar:
        rows = {m.name for m in tar.getmembers()}
    assert {f"results/fake-{name}.json" for name in names} <= rows
    with tarfile.open(out / "profile-cpu.tar.gz") as tar:
        assert [m.name for m in tar.getmembers()] == ["profile/step.trace.json.gz"]
    log = (out / "gpu_check.log").read_text()
    assert "stub flex-autotune" in log and "step-timm: ok (exit 0)" in log


def test_the_phases_name_tests_that_exist_and_pip_stays_offline(tmp_path):
    _, summary, _, work = dry_run(tmp_path)
    commands = {path.name: path.read_text().split("\n") for path in (work / "commands").iterdir()}
    assert commands["build"] == ["bash", "-c", "build_and_check", ""]
    named = [a for args in commands.values() for a in args if re.match(r"(tests|benchmarks)/\w+\.py", a)]
    assert len(named) > 15
    for arg in named:
        path, _, test = arg.partition("::")
        source = (ROOT / path).read_text()
        if test:
            assert f"def {test.split('[')[0]}(" in source, arg
    assert "benchmarks/test_step_bench.py::test_pretrain_step[hf-sdpa-base-128]" in named
    for args in commands.values():
        if "pytest" in args:  # every benchmark writes to the run's folder, never the committed rows
            assert "--results-dir" in args or any(a.startswith("tests/") for a in args), args
    pip_lines = [line for line in SCRIPT.read_text().splitlines() if "-m pip install" in line]
    assert pip_lines and all("--no-index" in line for line in pip_lines)
    assert all("--smoke" not in args for args in commands.values())  # what the GPU machine runs


def test_the_extra_phases_run_only_when_named_and_select_their_benchmarks(tmp_path):
    for run in ("default", "named"):
        (tmp_path / run).mkdir()
    _, default, _, _ = dry_run(tmp_path / "default")
    assert not {"attention-model", "step-beitfast-compiled"} & set(statuses(default))
    _, summary, _, work = dry_run(tmp_path / "named", GPU_CHECK_PHASES="attention-model")
    status = statuses(summary)
    assert status.pop("build") == status.pop("attention-model") == "ok"
    assert set(status.values()) == {"not selected"}
    args = (work / "commands" / "attention-model").read_text().split("\n")
    selection = args[args.index("-k") + 1]
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
               "benchmarks/test_attention_bench.py", "-k", selection]
    collected = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True)
    ids = sorted(line.split("::")[1] for line in collected.stdout.splitlines() if "::" in line)
    shapes = ("224", "224-b1", "512", "640")
    backends = ("triton", "triton-packed", "sdpa", "flash", "fa3-nobias", "sdpa-flash-nobias",
                "sdpa-cudnn-nobias")
    expected = ["test_work_model_table", *(f"test_read_rates_the_model_assumes[{level}]"
                                           for level in ("L2-16-20", "HBM-2048-1")),
                *(f"test_our_kernels_against_the_work_model[beit-b-{shape}]" for shape in shapes),
                *(f"test_attention[{backend}-beit-b-512]" for backend in backends)]
    assert ids == sorted(expected), collected.stdout[-2000:] + collected.stderr[-2000:]


def test_a_failed_build_stops_the_run_with_a_clear_summary(tmp_path):
    done, summary, out, work = dry_run(tmp_path, STUB_FAIL="build")
    assert done.returncode == 1
    assert sorted(p.name for p in (work / "commands").iterdir()) == ["build"]  # nothing ran after it
    status = statuses(summary)
    assert status.pop("build") == "failed"
    assert set(status.values()) == {"not run: build failed"}
    assert summary["next_call"] is None
    log = (out / "gpu_check.log").read_text()
    assert "BUILD FAILED: stub" in log and "build did not succeed: stopping" in log
    assert "No module named" not in log and gpu_out().check(out) == []


def test_a_phase_past_its_limit_is_killed_and_the_next_one_runs(tmp_path):
    plan = "build 5 1; correctness 2 1; step-beitfast 5 1; flex-autotune 100 1000"
    done, summary, out, _ = dry_run(tmp_path, GPU_CHECK_PLAN=plan, STUB_SLEEP_PHASE="correctness",
                                    STUB_SLEEP="30")
    assert done.returncode == 1
    phases = {p["name"]: p for p in summary["phases"]}
    assert phases["correctness"]["status"] == "timeout" and phases["correctness"]["exit_code"] == 124
    assert phases["correctness"]["duration_s"] <= 5
    assert phases["step-beitfast"]["status"] == "ok"
    assert phases["flex-autotune"]["status"] == "skipped: no time"  # its estimate does not fit what is left
    assert summary["not_done"] == ["correctness", "flex-autotune"]
    assert summary["next_call"] == "GPU_CHECK_PHASES='correctness flex-autotune' bash benchmarks/gpu_check.sh"


def test_a_second_run_on_the_same_machine_resumes_after_what_ended_well(tmp_path):
    done, summary, _, work = dry_run(tmp_path, STUB_FAIL="step-timm")
    assert done.returncode == 1 and statuses(summary)["step-timm"] == "failed"
    for path in (work / "commands").iterdir():
        path.unlink()
    done, summary, _, work = dry_run(tmp_path)
    assert done.returncode == 0
    assert sorted(p.name for p in (work / "commands").iterdir()) == ["step-timm"]
    status = statuses(summary)
    assert status.pop("step-timm") == "ok" and set(status.values()) == {"done earlier"}
    done, summary, _, _ = dry_run(tmp_path, GPU_CHECK_PHASES="no-such-phase")
    assert done.returncode == 2 and "unknown phase 'no-such-phase'" in done.stdout


def test_a_phase_breaking_the_out_contract_fails_the_run_and_the_rest_still_comes_back(tmp_path):
    done, summary, out, work = dry_run(tmp_path, STUB_LITTER_PHASE="op-attention", STUB_LITTER="6")
    assert done.returncode == 1
    problems = summary["contract"]["problems"]
    assert any("10 files (at most 8)" in p for p in problems)  # log, summary, rows and 7 more
    assert any("'bad name+.json'" in p for p in problems)
    assert "$OUT broke its contract" in (out / "gpu_check.log").read_text()
    assert gpu_out().check(out) == []  # moved out of the way, into the rows
    with tarfile.open(out / "rows-cpu.tar.gz") as tar:
        names = {m.name for m in tar.getmembers()}
    assert {"stray/extra-1.txt", "stray/bad_name_.json"} <= names


@pytest.mark.parametrize("breach", ["nine files", "bad name", "too deep", "too big", "link"])
def test_the_contract_checker_fails_each_breach(tmp_path, breach):
    check = gpu_out().check
    out = tmp_path / "out"
    out.mkdir()
    for name in ("gpu_check.log", "summary.json"):
        (out / name).write_text("x")
    assert check(out) == []
    if breach == "nine files":
        for i in range(7):
            (out / f"rows-{i}.tar.gz").write_text("x")
    elif breach == "bad name":
        (out / "step+beitfast.json").write_text("x")
    elif breach == "too deep":
        (out / "a" / "b" / "c").mkdir(parents=True)
        (out / "a" / "b" / "c" / "f.json").write_text("x")
    elif breach == "too big":
        with open(out / "trace.json", "wb") as f:
            f.truncate(16 * 2**20 + 1)
    else:
        (out / "link.json").symlink_to(out / "summary.json")
    assert len(check(out)) == 1, check(out)


def test_a_profile_too_big_is_trimmed_to_its_kernels_or_refused():
    trim = gpu_out().trim_trace
    events = [{"cat": "cpu_op", "name": f"aten::op{i}", "ts": i} for i in range(20000)]
    events += [{"cat": "kernel", "name": "gemm", "ts": 1}, {"cat": "gpu_memcpy", "name": "copy", "ts": 2}]
    trace = {"traceEvents": events, "deviceProperties": []}
    data, dropped = trim(trace, 10**6)
    assert dropped == [] and len(data) <= 10**6
    data, dropped = trim(trace, 2000)
    assert "cpu_op" in dropped and len(data) <= 2000
    kept = json.loads(__import__("gzip").decompress(data))["traceEvents"]
    assert [e["cat"] for e in kept] == ["kernel", "gpu_memcpy"]
    with pytest.raises(ValueError, match="does not fit"):
        trim(trace, 10)


def _returned(tmp_path, mode, rows_by_file):
    """A folder as a device call's files come back: summary.json and rows-<gpu>.tar.gz."""
    folder = tmp_path / "returned"
    (folder / "results").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"mode": mode, "commit": "0123abc"}))
    for name, rows in rows_by_file.items():
        (folder / "results" / name).write_text(json.dumps(rows))
    with tarfile.open(folder / "rows-NVIDIA_H100_80GB_HBM3.tar.gz", "w:gz") as tar:
        tar.add(folder / "results", arcname="results")
    return folder


def test_record_merges_only_the_gpu_rows_of_that_gpu(tmp_path):
    record = gpu_out().record
    h100 = "NVIDIA H100 80GB HBM3"
    results = tmp_path / "results"
    results.mkdir()
    kept_row = {"test": "old", "gpu": h100, "images_per_s": 1.0}
    (results / "pretrain_step_NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(
        [kept_row, {"test": "b", "gpu": h100, "images_per_s": 2.0}]))
    (results / "masking_cpu.json").write_text("[]")
    new = [{"test": "b", "gpu": h100, "images_per_s": 3.0}, {"test": "c", "gpu": h100, "images_per_s": 4.0}]
    folder = _returned(tmp_path, "gpu", {"pretrain_step_NVIDIA_H100_80GB_HBM3.json": new,
                                         "masking_cpu.json": [{"test": "m", "cpu": "the GPU machine's"}]})
    assert record(folder, results) == 0
    assert json.loads((results / "pretrain_step_NVIDIA_H100_80GB_HBM3.json").read_text()) == [kept_row, *new]
    assert (results / "masking_cpu.json").read_text() == "[]"  # the GPU machine's CPU rows stay out
    foreign = _returned(tmp_path / "2", "gpu", {"attention_NVIDIA_H100_80GB_HBM3.json": [
        {"test": "x", "gpu": "NVIDIA H200"}]})
    assert record(foreign, results) == 1 and not (results / "attention_NVIDIA_H100_80GB_HBM3.json").exists()
    assert record(_returned(tmp_path / "3", "cpu", {}), results) == 2  # a dry run's rows are never recorded
