"""Mean, standard deviation and provenance of per-seed results, for the examples' seed studies.

Each study (``digits_reproduction.py``, ``segmentation_seeds.py``) writes ``results.json``:
``{"settings": ..., "results": [one dict per seed], "summary": ..., "provenance": ...}``. Seeds can run in
several processes at once (e.g. two on a 2-core machine); this merges their files, refusing ones whose
settings differ in anything but the seeds:

    python examples/seed_stats.py out-a/results.json out-b/results.json --output merged.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch


def summarize(results: list[dict], keys: tuple[str, ...]) -> dict:
    """Per key: mean, sample standard deviation (n - 1; 0 for one seed), min, max and n over seeds; and,
    for a pair of keys, the per-seed difference (first - second) with its mean and std, how many seeds
    the first wins and the paired t-test."""
    summary = {}
    for key in keys:
        values = [r[key] for r in results]
        summary[key] = {"mean": statistics.mean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values), "max": max(values), "n": len(values)}
    if len(keys) == 2:
        first, second = keys
        diffs = [r[first] - r[second] for r in results]
        summary[f"{first}_minus_{second}"] = {
            "per_seed": diffs, "mean": statistics.mean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            f"{first}_better": sum(d > 0 for d in diffs), "n": len(diffs), **paired_t(diffs)}
    return summary


def paired_t(diffs: list[float]) -> dict:
    """The paired t-test of the per-seed differences (mean 0 under the null): t, degrees of freedom and
    the two-sided p-value (scipy's t distribution; None without scipy or with fewer than 2 seeds)."""
    n = len(diffs)
    if n < 2 or statistics.stdev(diffs) == 0:
        return {"t": None, "df": n - 1, "p_two_sided": None}
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / n ** 0.5)
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return {"t": t, "df": n - 1, "p_two_sided": None}
    return {"t": t, "df": n - 1, "p_two_sided": float(2 * student_t.sf(abs(t), n - 1))}


def provenance() -> dict:
    """Where and when: commit (and the tracked files that differed from it), date, machine, torch,
    threads. Call it at the start of a run: that is the code that runs."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "examples", "beitfast", "kernels")
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"commit": commit.strip() if commit else None,
            # the code that ran may differ from the commit in these (modified tracked files at the start)
            "uncommitted_changes": changed.split("\n")[:-1] if changed is not None else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="results.json files of runs with the same settings")
    parser.add_argument("--output", required=True, help="the merged JSON to write")
    args = parser.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in args.files]
    first = {k: v for k, v in runs[0]["settings"].items() if k not in ("seeds", "output")}
    for name, run in zip(args.files, runs):
        settings = {k: v for k, v in run["settings"].items() if k not in ("seeds", "output")}
        if settings != first:
            print(f"seed_stats: {name} has other settings than {args.files[0]}: {settings} vs {first}",
                  file=sys.stderr)
            return 2
    results = sorted((r for run in runs for r in run["results"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        print(f"seed_stats: a seed appears twice in {args.files}: {seeds}", file=sys.stderr)
        return 2
    merged_keys = ("settings", "results", "summary", "summary_keys")
    merged = {"settings": {**first, "seeds": seeds}, "results": results,
              "summary": summarize(results, tuple(runs[0]["summary_keys"])),
              "summary_keys": runs[0]["summary_keys"],
              # each run's provenance and anything else it recorded (e.g. its pre-training)
              "runs": [{"file": f, **{k: v for k, v in run.items() if k not in merged_keys}}
                       for f, run in zip(args.files, runs)]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{len(results)} seeds from {len(runs)} runs -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
