"""What a GPU check brings back (``$OUT``), and what becomes of it here.

The device machine returns only the files under ``$OUT``: at most 8, each at most 16 MiB, 64 MiB in all,
no deeper than two folders, names of letters, digits, ``.``, ``_`` and ``-`` only. ``gpu_check.sh``
calls ``pack`` after every phase, so a run cut short still returns what it had measured::

    gpu_check.log          every phase's whole output, written as it runs
    summary.json           the plan and each phase's status, duration, limit, cap and estimate; the machine
    rows-<gpu>.tar.gz      result rows, pytest-benchmark JSON and JUnit reports of the phases
    profile-<gpu>.tar.gz   one profile of the fused step (its trace trimmed to fit), once that phase ran

Commands (standard library only: the packer must work on the GPU machine before anything is built)::

    python benchmarks/gpu_out.py check OUT             # exit 1, listing the problems, if OUT breaks it
    python benchmarks/gpu_out.py pack --out OUT --work WORK --gpu SLUG ...   # what gpu_check.sh runs
    python benchmarks/gpu_out.py record DIR            # merge the GPU rows of DIR/rows-<gpu>.tar.gz into
                                                       # benchmarks/results (``make record-gpu``)
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
MAX_FOLDERS = 2  # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# What pack writes stays this far under the per-file limit (tar and gzip headers, a growing log).
FILE_BUDGET_BYTES = 15 * 2**20
LOG_NAME, SUMMARY_NAME = "gpu_check.log", "summary.json"
# Trace event categories dropped, in this order, until a profile fits: host-side detail first, the
# kernels and memory copies last.
TRIM_ORDER = ["python_function", "user_annotation", "cpu_instant_event", "ac2g", "cuda_runtime", "cpu_op",
              "cuda_driver"]
RESULTS = Path(__file__).resolve().parent / "results"


def check(out: Path) -> list[str]:
    """Every way ``out`` breaks the device machine's contract (empty when it keeps it)."""
    problems, files, total = [], 0, 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        bad = [part for part in rel.parts if not NAME.match(part)]
        if bad:
            problems.append(f"{rel}: name {bad[0]!r} has characters other than letters, digits, '.', '_' "
                            "and '-'")
        if path.is_symlink():
            problems.append(f"{rel}: a link (only plain files come back)")
        elif path.is_file():
            files += 1
            size = path.stat().st_size
            total += size
            if len(rel.parts) - 1 > MAX_FOLDERS:
                problems.append(f"{rel}: {len(rel.parts) - 1} folders deep (at most {MAX_FOLDERS})")
            if size > MAX_FILE_BYTES:
                problems.append(f"{rel}: {size} bytes (at most {MAX_FILE_BYTES})")
        elif not path.is_dir():
            problems.append(f"{rel}: not a plain file")
    if files > MAX_FILES:
        problems.append(f"{files} files (at most {MAX_FILES})")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes in all (at most {MAX_TOTAL_BYTES})")
    return problems


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a run killed while packing keeps the previous version."""
    temp = path.parent / f".{path.name}.partial"
    temp.write_bytes(data)
    os.replace(temp, path)


def _tar_gz(members: list[tuple[str, Path]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for arcname, path in members:
            tar.add(path, arcname=arcname)
    return buffer.getvalue()


def _files_under(folder: Path, prefix: str) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        return []
    return [(f"{prefix}/{p.relative_to(folder)}", p) for p in sorted(folder.rglob("*")) if p.is_file()]


def trim_trace(trace: dict, limit: int) -> tuple[bytes, list[str]]:
    """The trace as gzipped JSON under ``limit`` bytes, dropping event categories in ``TRIM_ORDER``;
    also the categories dropped."""
    dropped: list[str] = []
    events = trace.get("traceEvents", [])
    for category in [None, *TRIM_ORDER]:
        if category is not None:
            events = [e for e in events if e.get("cat") != category]
            dropped.append(category)
        data = gzip.compress(json.dumps({**trace, "traceEvents": events}).encode(), compresslevel=6)
        if len(data) <= limit:
            return data, dropped
    raise ValueError(f"the profile does not fit in {limit} bytes even with only its kernels and copies")


def profile_members(profile: Path, limit: int) -> tuple[list[tuple[str, Path]], list[str]]:
    """The profile folder's files, each ``*.trace.json`` replaced by a trimmed ``*.trace.json.gz``."""
    members, notes = [], []
    for arcname, path in _files_under(profile, "profile"):
        if path.name.endswith(".trace.json"):
            data, dropped = trim_trace(json.loads(path.read_text()), limit)
            packed = path.with_name(path.name + ".gz")
            packed.write_bytes(data)
            path.unlink()
            arcname, path = arcname + ".gz", packed
            notes.append(f"{packed.name}: {len(data)} bytes, dropped: {', '.join(dropped) or 'nothing'}")
        members.append((arcname, path))
    return members, notes


def _records(work: Path) -> dict[str, dict]:
    """The last record of each phase (gpu_check.sh appends one JSON line per phase it starts or ends)."""
    last: dict[str, dict] = {}
    path = work / "records.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                last[record["name"]] = record
    return last


def junit_counts(path: Path) -> dict:
    """Tests passed, failed, errors and skipped in a JUnit report, and the ids that failed."""
    import xml.etree.ElementTree as ElementTree

    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError):  # a phase killed while pytest wrote it
        return counts
    for case in root.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
        counts[key] += 1
        if outcome in ("failure", "error"):
            counts["failed_tests"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def summary(work: Path, out: Path, args: argparse.Namespace, problems: list[str], notes: list[str]) -> dict:
    plan = [line.split("\t") for line in (work / "plan.tsv").read_text().splitlines() if line.strip()]
    records = _records(work)
    phases, left = [], []
    for name, cap, estimate in plan:
        record = records.get(name, {"status": "not run yet"})
        junit = work / "junit" / f"{name}.xml"
        phase = {"name": name, "cap_s": int(cap), "estimate_s": int(estimate), **record}
        if junit.exists():
            phase["tests"] = junit_counts(junit)
        phases.append(phase)
        if phase["status"] not in ("ok", "done earlier"):
            left.append(name)
    started = float((work / "started").read_text()) if (work / "started").exists() else time.time()
    next_call = None
    if left and records.get("build", {}).get("status") in ("ok", "done earlier"):
        next_call = f"GPU_CHECK_PHASES='{' '.join(left)}' bash benchmarks/gpu_check.sh"
    return {
        "mode": args.mode, "gpu": args.gpu, "device": args.device, "commit": args.commit,
        "budget_s": args.budget, "elapsed_s": round(time.time() - started, 1),
        "estimate_total_s": sum(int(e) for _, _, e in plan), "time_unit": "seconds on the GPU machine",
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "phases": phases, "not_done": left, "next_call": next_call, "notes": notes,
        "contract": {"ok": not problems, "problems": problems},
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
    }


def pack(out: Path, work: Path, args: argparse.Namespace) -> int:
    """Rewrite ``out``: the rows tarball, the profile, the summary; stray files moved into the tarball
    (and reported) so the rest still comes back. 1 when the contract was broken."""
    out.mkdir(parents=True, exist_ok=True)
    problems = check(out)
    expected = {LOG_NAME, SUMMARY_NAME, f"rows-{args.gpu}.tar.gz", f"profile-{args.gpu}.tar.gz"}
    stray = work / "stray"
    for path in sorted(out.iterdir()):
        if path.name not in expected:
            problems.append(f"{path.name}: written to $OUT by a phase (moved into rows-{args.gpu}.tar.gz)")
            stray.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(stray / re.sub(r"[^A-Za-z0-9._-]", "_", path.name)))
    log = out / LOG_NAME
    if log.exists() and log.stat().st_size > FILE_BUDGET_BYTES:  # keep the start and the end
        data = log.read_bytes()
        (work / LOG_NAME).write_bytes(data)
        cut = b"\n[... middle of the log cut to fit; whole log in rows tarball ...]\n"
        _replace(log, data[: 2**20] + cut + data[-(FILE_BUDGET_BYTES - 2**20 - len(cut)):])
    notes: list[str] = []
    members = _files_under(work / "results", "results") + _files_under(work / "junit", "junit")
    members += _files_under(stray, "stray")
    if (work / LOG_NAME).exists():
        members.append((LOG_NAME, work / LOG_NAME))
    _replace(out / f"rows-{args.gpu}.tar.gz", _tar_gz(members))
    if (work / "profile").is_dir():
        profile, notes = profile_members(work / "profile", FILE_BUDGET_BYTES - 2**20)
        _replace(out / f"profile-{args.gpu}.tar.gz", _tar_gz(profile))
    for name in (f"rows-{args.gpu}.tar.gz", f"profile-{args.gpu}.tar.gz"):
        if (out / name).exists() and (out / name).stat().st_size > FILE_BUDGET_BYTES:
            problems.append(f"{name}: over {FILE_BUDGET_BYTES} bytes")
    reported = work / "contract-problems.txt"  # every later summary keeps them: the strays are gone by then
    with open(reported, "a") as f:
        f.writelines(f"{problem}\n" for problem in problems)
    run = summary(work, out, args, reported.read_text().splitlines(), notes)
    _replace(out / SUMMARY_NAME, json.dumps(run, indent=1).encode())
    problems += [p for p in check(out) if p not in problems]
    print("gpu_out: " + "; ".join(f"{p['name']} {p['status']}" for p in run["phases"]))
    for problem in problems:
        print(f"gpu_out: $OUT contract: {problem}", file=sys.stderr)
    return 1 if problems else 0


def record(folder: Path, results: Path) -> int:
    """Merge the GPU rows of ``folder``'s rows tarball into ``results``, replacing rows of the same test:
    only ``<benchmark>_<gpu>.json`` files whose rows were measured on that GPU; never CPU rows (the GPU
    machine's CPU is not the one the committed CPU rows describe), never smoke rows."""
    tarballs = sorted(folder.glob("rows-*.tar.gz"))
    if len(tarballs) != 1:
        print(f"record: expected one rows-<gpu>.tar.gz in {folder}, found {len(tarballs)}", file=sys.stderr)
        return 2
    run = json.loads((folder / SUMMARY_NAME).read_text()) if (folder / SUMMARY_NAME).exists() else {}
    if run.get("mode") != "gpu":
        print(f"record: {folder} is not a GPU run (mode {run.get('mode')!r}); nothing recorded",
              file=sys.stderr)
        return 2
    from beitfast._files import write_atomically
    from beitfast.ops.dispatch import gpu_slug

    recorded, gpu = 0, tarballs[0].name.removeprefix("rows-").removesuffix(".tar.gz")
    with tarfile.open(tarballs[0]) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and re.fullmatch(rf"results/\w+_{gpu}\.json", member.name)):
                continue  # CPU rows, pytest-benchmark and JUnit reports
            rows = json.loads(tar.extractfile(member).read())
            foreign = [r.get("test") for r in rows if gpu_slug(r.get("gpu") or "") != gpu or r.get("smoke")]
            if foreign:
                print(f"record: {member.name}: rows not measured on {gpu}: {foreign}", file=sys.stderr)
                return 1
            target = results / Path(member.name).name
            tests = {r["test"] for r in rows}
            old = json.loads(target.read_text()) if target.exists() else []
            kept = [r for r in old if r.get("test") not in tests]
            text = json.dumps(kept + rows, indent=1) + "\n"
            write_atomically(target, lambda temp: Path(temp).write_text(text))
            recorded += len(rows)
            print(f"record: {target.name}: {len(rows)} rows merged ({len(kept)} kept)")
    print(f"record: {recorded} rows from {tarballs[0].name} (commit {run.get('commit')})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="exit 1 if the folder breaks the $OUT contract")
    check_parser.add_argument("out", type=Path)
    pack_parser = commands.add_parser("pack", help="rewrite $OUT from the run's work folder")
    pack_parser.add_argument("--out", type=Path, required=True)
    pack_parser.add_argument("--work", type=Path, required=True)
    pack_parser.add_argument("--gpu", required=True, help="the device in file names: NVIDIA_H100_80GB_HBM3")
    pack_parser.add_argument("--device", default="")
    pack_parser.add_argument("--mode", choices=["gpu", "cpu", "stub"], required=True)
    pack_parser.add_argument("--commit", default="unknown")
    pack_parser.add_argument("--budget", type=int, required=True)
    record_parser = commands.add_parser("record", help="merge a GPU run's rows into benchmarks/results")
    record_parser.add_argument("folder", type=Path, help="the folder the device call's $OUT came back to")
    record_parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check(args.out)
        for problem in problems:
            print(f"{args.out}: {problem}")
        return 1 if problems else 0
    if args.command == "pack":
        if not NAME.match(args.gpu):
            parser.error(f"--gpu: expected letters, digits, '.', '_', '-', got {args.gpu!r}")
        return pack(args.out, args.work, args)
    return record(args.folder, args.results)


if __name__ == "__main__":
    sys.exit(main())
