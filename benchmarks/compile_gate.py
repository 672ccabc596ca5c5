"""Ahead-of-time compile gate: every Triton kernel the launchers can start, compiled for real GPUs
without one.

The launchers run on CPU stand-in tensors at BEiT-B shapes with every Triton launch intercepted: a
launch is bound by Triton's own binder (the exact signature, constants and alignment attributes a
GPU launch would get), an autotuned launch yields every config the launcher's pruning keeps for the
target architecture (``torch.cuda.get_device_capability`` and ``get_device_properties`` answer for
the target). Each distinct launch is compiled by ``triton.compile`` for the target, through the
``ptxas`` of the Triton wheel, and weighed from its cubin (``cuobjdump --dump-resource-usage``) and
PTX. The CUDA kernels of ``beitfast._C`` are weighed from the built library the same way.

The gate fails on a compile error, on local memory (register spills, stack) in any kept sm_90
config or any CUDA kernel, on a kept config over the target's shared memory per block, and on a dot
that is not lowered to tensor cores (``wgmma`` / ``mma.sync``).

    python benchmarks/compile_gate.py                       # sm_90 and sm_80, writes the reports
    python benchmarks/compile_gate.py --arch 90 --only _fwd_kernel --no-write
    python benchmarks/compile_gate.py --report              # the written reports as a table

Reports: ``benchmarks/results/compile_<triton>_sm<arch>.json``. Run it with the triton under test
first on ``sys.path`` (``make compile-gate`` runs triton 3.8 and 3.6).
"""
from __future__ import annotations

import os

# The real compiler, not the interpreter: the kernel modules read this at import.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the launchers and the gate see of a target GPU."""

    capability: int
    name: str
    shared_per_block: int   # bytes, the opt-in maximum per block
    sms: int
    spills_fail: bool


ARCHS = {
    90: Arch(90, "NVIDIA H100 80GB HBM3", 232448, 132, spills_fail=True),
    80: Arch(80, "NVIDIA A100-SXM4-80GB", 166912, 108, spills_fail=False),
}


# ---------------------------------------------------------------------------------------------------
# Scenarios: what the model and the ops really launch, at BEiT-B shapes.

B, N, D, H, V, IMG, PATCH = 128, 197, 768, 12, 8192, 224, 16
MASKED = 75


def _empty(*shape, dtype=torch.float32):
    # Contents never matter (launches are intercepted); torch.empty costs nothing.
    return torch.empty(shape, dtype=dtype, requires_grad=dtype.is_floating_point)


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", None: "none"}[dtype]


def attention_scenarios():
    from beitfast import ops
    from beitfast.model import num_relative_positions, relative_position_index

    def bias_of(img):
        grid = (img // PATCH, img // PATCH)
        return num_relative_positions(grid), relative_position_index(grid)

    def unpacked(qkv_dtype, table_dtype):
        rows, index = bias_of(IMG)
        q, k, v = (_empty(B, H, N, D // H, dtype=qkv_dtype) for _ in range(3))
        table = _empty(rows, H, dtype=table_dtype)
        with _autocast(qkv_dtype):
            out = ops.rel_pos_attention(q, k, v, table, index, backend="triton")
        out.backward(torch.empty_like(out))

    def packed(qkv_dtype, with_bias, img=IMG, batch=B):
        # What the model launches: its qkv projection [B, N, 3, H, D] read in place.
        rows, index = bias_of(img)
        qkv = _empty(batch, index.shape[0], 3, H, D // H, dtype=qkv_dtype)
        table = _empty(rows, H) if with_bias else None
        with _autocast(qkv_dtype):
            out = ops.rel_pos_attention_packed(qkv, table, index if with_bias else None, backend="triton")
        out.backward(torch.empty_like(out))

    for qkv_dtype in (torch.bfloat16, torch.float16):
        for table_dtype in (torch.float32, qkv_dtype):
            yield (f"attention qkv={_name(qkv_dtype)} table={_name(table_dtype)}",
                   lambda q=qkv_dtype, t=table_dtype: unpacked(q, t))
        for with_bias in (True, False):
            yield (f"attention packed qkv={_name(qkv_dtype)} bias={'yes' if with_bias else 'no'}",
                   lambda q=qkv_dtype, b=with_bias: packed(q, b))
    # 512-px fine-tuning: N = 1025 (one compile per sequence length).
    for with_bias in (True, False):
        yield (f"attention packed qkv=bf16 bias={'yes' if with_bias else 'no'} img=512",
               lambda b=with_bias: packed(torch.bfloat16, b, img=512, batch=16))


def cross_entropy_scenarios():
    from beitfast import ops

    def run(dtype, autocast, reduction="mean", grad=True, bound=MASKED):
        hidden = _empty(B, N - 1, D, dtype=dtype)
        weight, bias = _empty(V, D, dtype=dtype), _empty(V, dtype=dtype)
        labels = torch.zeros(B, N - 1, dtype=torch.long)
        mask = torch.zeros(B, N - 1, dtype=torch.bool)
        mask[:, :MASKED] = True
        with _autocast(autocast), torch.set_grad_enabled(grad):
            loss = ops.masked_lm_cross_entropy(hidden, weight, bias, labels, mask, reduction=reduction,
                                               backend="triton", max_masked_per_image=bound)
        if grad:
            loss.sum().backward()

    # Under bf16 autocast the model passes the fp32 final-norm output and the fp32 lm_head weight;
    # a bf16 model passes bf16 for both; the trainer bounds the rows by the masking (one chunk). Without
    # the bound, several chunks: the weight gradient's accumulating variant. Evaluation runs without
    # gradients; per-row losses have their own backward.
    for dtype, autocast in ((torch.float32, torch.bfloat16), (torch.bfloat16, None)):
        yield (f"loss hidden/weight={_name(dtype)} autocast={_name(autocast)}",
               lambda d=dtype, a=autocast: run(d, a))
    yield "loss bf16 rows unbounded", lambda: run(torch.bfloat16, None, bound=None)
    yield "loss fp32 under bf16 autocast, no grad", lambda: run(torch.float32, torch.bfloat16, grad=False)
    yield "loss bf16 reduction=none", lambda: run(torch.bfloat16, None, reduction="none")


def patch_embed_scenarios():
    from beitfast import ops

    grid = IMG // PATCH
    for images_dtype, autocast in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        for masked in (True, False):
            def run(images_dtype=images_dtype, autocast=autocast, masked=masked):
                images = _empty(B, 3, IMG, IMG, dtype=images_dtype)
                weight, bias = _empty(D, 3, PATCH, PATCH), _empty(D)
                cls, pos = _empty(1, 1, D), _empty(1, grid * grid + 1, D)
                mask = token = None
                if masked:
                    mask = torch.zeros(B, grid * grid, dtype=torch.bool)
                    token = _empty(1, 1, D)
                with _autocast(autocast):
                    out = ops.masked_patch_embed(images, weight, bias, PATCH, mask=mask, mask_token=token,
                                                 cls_token=cls, pos_embed=pos, backend="triton")
                out.backward(torch.empty_like(out))
            yield (f"patch_embed images={_name(images_dtype)} autocast={_name(autocast)} "
                   f"mask={'yes' if masked else 'no'}"), run


SCENARIOS = {
    "attention": attention_scenarios,
    "cross_entropy": cross_entropy_scenarios,
    "patch_embed": patch_embed_scenarios,
}


# ---------------------------------------------------------------------------------------------------
# Capture: bind every launch as Triton would for the target, compile nothing yet.

@dataclasses.dataclass
class Launch:
    kernel: JITFunction
    variant: str   # the constants the launcher passes
    config: str    # the autotune config (tiles, warps, stages)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    scenarios: list[str]

    @property
    def name(self) -> str:
        module = self.kernel.fn.__module__.rsplit(".", 1)[-1]
        return f"{module}.{self.kernel.fn.__name__}"

    def key(self) -> str:
        return repr((self.name, self.signature, sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted(self.options.items())))


def _config_label(kwargs: dict) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper())
    return f"{tiles} w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}".strip()


class Capture:
    """Intercepts Triton launches while a scenario runs; ``launches`` holds one entry per distinct
    compilation (the scenarios that need it listed)."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.target = GPUTarget("cuda", arch.capability, 32)
        self.backend = make_backend(self.target)
        self.launches: dict[str, Launch] = {}
        self.scenario = ""
        self._tuned: dict = {}
        self._binders: dict[int, object] = {}

    def _bind(self, fn: JITFunction, args, kwargs) -> None:
        from triton import knobs

        kwargs = dict(kwargs)
        config = self._tuned or {k: kwargs.get(k, v) for k, v in (("num_warps", 4), ("num_stages", 3))}
        variant = " ".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k not in config)
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = create_function_from_signature(fn.signature, fn.params, self.backend)
            self._binders[id(fn)] = binder
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization,
                                                              options)
        launch = Launch(fn, variant, _config_label(config), signature, constexprs, attrs,
                        dict(options.__dict__), [])
        launch = self.launches.setdefault(launch.key(), launch)
        if self.scenario not in launch.scenarios:
            launch.scenarios.append(self.scenario)

    def _autotuned(self, tuner: Autotuner, args, kwargs) -> None:
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        for config in configs:
            self._tuned = config.all_kwargs()
            try:
                tuner.fn.run(*args, **kwargs, **self._tuned)
            finally:
                self._tuned = {}
        tuner.nargs = None

    @contextlib.contextmanager
    def active(self):
        capture = self
        properties = types.SimpleNamespace(
            name=self.arch.name, major=self.arch.capability // 10, minor=self.arch.capability % 10,
            multi_processor_count=self.arch.sms, shared_memory_per_block_optin=self.arch.shared_per_block,
            total_memory=80 * 2**30,
        )
        from beitfast.ops import dispatch

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(
                JITFunction, "run", lambda fn, *a, **kw: capture._bind(fn, a, kw)))
            stack.enter_context(mock.patch.object(
                Autotuner, "run", lambda tuner, *a, **kw: capture._autotuned(tuner, a, kw)))
            stack.enter_context(mock.patch.object(
                torch.cuda, "get_device_capability", lambda *_: divmod(self.arch.capability, 10)))
            stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda *_: properties))
            # The stand-ins are CPU tensors: the device refusal is the one check that must not run.
            stack.enter_context(mock.patch.object(dispatch, "triton_device_reasons", lambda *a, **k: []))
            yield

    def run(self, scenarios) -> list[str]:
        """Runs each ``(label, fn)``; returns the errors of scenarios that did not get to launch."""
        errors = []
        with self.active():
            for label, fn in scenarios:
                self.scenario = label
                try:
                    fn()
                except Exception as exc:  # a launcher that fails before launching is a gate failure
                    errors.append(f"{label}: launcher failed: {type(exc).__name__}: {exc}")
        return errors


# ---------------------------------------------------------------------------------------------------
# Compile and weigh (in worker processes forked after the capture).

_JOBS: list[tuple[GPUTarget, Launch]] = []

_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_ATOMIC = re.compile(r"^\s*(?:@%p\d+\s+)?(atom|red)(\.[\w:]+)+", re.M)
_ATOMIC_OPS = {"add", "max", "min", "cas", "exch", "inc", "dec", "and", "or", "xor"}


def resource_usage(binary: bytes | str, suffix: str = ".cubin") -> dict[str, dict[str, int]]:
    """``{function: {registers, stack, shared_static, local}}`` of every kernel in a cubin or in a
    host library with embedded cubins (one entry per architecture, keyed ``name@sm_XX``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = binary if isinstance(binary, str) else os.path.join(tmp, "kernel" + suffix)
        if not isinstance(binary, str):
            with open(path, "wb") as f:
                f.write(binary)
        done = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", path], capture_output=True, text=True)
        # A host library without device code (a CPU-only build of the extension) has no kernels to weigh.
        if done.returncode != 0 and "does not contain device code" in done.stdout + done.stderr:
            return {}
        done.check_returncode()
        text = done.stdout
    usage, arch, name = {}, "", ""
    for line in text.splitlines():
        found = re.search(r"arch = (sm_\w+)", line) or re.match(r"\s*Function ([^:\s]+):", line)
        if found and found.re.pattern.startswith("arch"):
            arch = found.group(1)
        elif found:
            name = found.group(1)
        found = _RESOURCE.search(line)
        if found:
            reg, stack, shared, local = found.groups()
            usage[f"{name}@{arch}" if arch else name] = dict(
                registers=int(reg), stack=int(stack), shared_static=int(shared), local=int(local))
    return usage


def _atomics(ptx: str) -> dict[str, int]:
    kinds = Counter()
    for found in _ATOMIC.finditer(ptx):
        parts = found.group(0).split(".")
        op = next((p for p in parts if p in _ATOMIC_OPS), "?")
        kinds[f"{op}.{parts[-1]}"] += 1
    return dict(sorted(kinds.items()))


def _compile(index: int) -> dict:
    target, job = _JOBS[index]
    start = time.perf_counter()
    row = dict(kernel=job.name, variant=job.variant, config=job.config, scenarios=job.scenarios)
    try:
        kernel = triton.compile(ASTSource(job.kernel, job.signature, job.constexprs, job.attrs),
                                target=target, options=job.options)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {' | '.join(message[-6:])}"[:1500]
        row["compile_s"] = round(time.perf_counter() - start, 2)
        return row
    ptx, ttir, ttgir = kernel.asm["ptx"], kernel.asm["ttir"], kernel.asm["ttgir"]
    (usage,) = resource_usage(kernel.asm["cubin"]).values()
    dot_lines = [line for line in ttgir.splitlines() if re.search(r"\btt\.dot\b|warp_group_dot\b", line)]
    row.update(
        registers=usage["registers"], spill_bytes=usage["local"], stack_bytes=usage["stack"],
        shared_bytes=kernel.metadata.shared, warps=kernel.metadata.num_warps,
        stages=kernel.metadata.num_stages,
        dots=len(re.findall(r"\btt\.dot\b", ttir)),
        dots_without_tensor_cores=sum("mma" not in line for line in dot_lines),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)), mma=len(re.findall(r"\bmma\.sync\b", ptx)),
        atomics=_atomics(ptx), compile_s=round(time.perf_counter() - start, 2),
    )
    return row


def failures(row: dict, arch: Arch) -> list[str]:
    """Why a compiled kernel fails the gate (empty: it passes)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    why = []
    if arch.spills_fail and (row["spill_bytes"] or row["stack_bytes"]):
        why.append(f"spills: {row['spill_bytes']} B local, {row['stack_bytes']} B stack per thread "
                   f"({row['registers']} registers)")
    if row["shared_bytes"] > arch.shared_per_block:
        why.append(f"shared memory {row['shared_bytes']} B > {arch.shared_per_block} B per block on "
                   f"sm_{arch.capability}")
    if row["dots_without_tensor_cores"] or (row["dots"] and not row["wgmma"] + row["mma"]):
        why.append(f"{row['dots']} dot(s) not lowered to tensor cores")
    return why


def _demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return names
    return [re.sub(r"\(anonymous namespace\)::|c10::|beitfast::", "", line) for line in out.splitlines()]


def cuda_rows(library: str | None) -> list[dict]:
    """Resource usage of the CUDA kernels built into ``beitfast._C`` (every architecture in it)."""
    if library is None:
        return []
    usage = sorted(resource_usage(library).items())
    names = _demangle([key.partition("@")[0] for key, _ in usage])
    return [dict(kernel=name, arch=key.partition("@")[2], registers=u["registers"], spill_bytes=u["local"],
                 stack_bytes=u["stack"], shared_bytes=u["shared_static"])
            for name, (key, u) in zip(names, usage)]


def cuda_failures(row: dict) -> list[str]:
    if row["spill_bytes"] or row["stack_bytes"]:
        return [f"spills: {row['spill_bytes']} B local, {row['stack_bytes']} B stack per thread"]
    return []


def _built_library() -> str | None:
    spec = importlib.util.find_spec("beitfast._C")
    return spec.origin if spec and spec.origin else None


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load_scenarios(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCENARIOS


def gate(archs: list[Arch], scenario_sets: dict, only: str | None, jobs: int) -> dict[int, tuple[list, list]]:
    """Captures every launch for each architecture, compiles them all in one pool and checks them:
    ``{capability: (rows, failures)}``."""
    global _JOBS
    captured, launch_errors = [], {}
    for arch in archs:
        capture = Capture(arch)
        launch_errors[arch.capability] = capture.run([s for make in scenario_sets.values() for s in make()])
        captured += [(arch, capture.target, job) for job in capture.launches.values()
                     if not only or only in job.name]
    _JOBS = [(target, job) for _, target, job in captured]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(_compile, range(len(_JOBS))))
    results = {arch.capability: ([], launch_errors[arch.capability]) for arch in archs}
    for (arch, _, _), row in zip(captured, rows):
        row["failures"] = failures(row, arch)
        arch_rows, problems = results[arch.capability]
        arch_rows.append(row)
        problems += [f"sm_{arch.capability} {row['kernel']} [{row['variant']}] [{row['config']}] "
                     f"({row['scenarios'][0]}): {why}" for why in row["failures"]]
    return results


def _compact(variant: str) -> str:
    """``HAS_MASK=True HAS_CLS=False P=16`` -> ``MASK !CLS P=16`` for the table."""
    words = []
    for word in variant.split():
        name, _, value = word.partition("=")
        name = name.removeprefix("HAS_")
        words.append(name if value == "True" else f"!{name}" if value == "False" else word)
    return " ".join(words)


def _table(rows: list[dict], header: str) -> str:
    lines = [header, f"{'kernel':36} {'variant':28} {'config':34} {'reg':>4} {'spill':>5} {'smem':>7} "
             f"{'wgmma':>5} {'mma':>4} {'atomics':16} status"]
    for row in rows:
        head = f"{row['kernel']:36} {_compact(row['variant']):28} {row['config']:34}"
        if "error" in row:
            lines.append(f"{head} compile error")
            continue
        atomics = ",".join(f"{k}x{v}" for k, v in row["atomics"].items()) or "-"
        status = "FAIL" if row.get("failures") else "ok"
        lines.append(f"{head} {row['registers']:>4} {row['spill_bytes'] + row['stack_bytes']:>5} "
                     f"{row['shared_bytes']:>7} {row['wgmma']:>5} {row['mma']:>4} {atomics:16} {status}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per kernel: configs compiled, register range, worst spill, largest shared memory."""
    lines = [f"{'kernel':44} {'compiled':>8} {'registers':>9} {'max spill':>9} {'max smem':>8} "
             f"{'failing':>7}"]
    for name in dict.fromkeys(row["kernel"] for row in rows):
        mine = [row for row in rows if row["kernel"] == name]
        built = [row for row in mine if "error" not in row]
        regs = sorted(row["registers"] for row in built) or [0]
        lines.append(
            f"{name:44} {len(built):>4}/{len(mine):<3} {regs[0]:>4}-{regs[-1]:<4} "
            f"{max((row['spill_bytes'] + row['stack_bytes'] for row in built), default=0):>9} "
            f"{max((row['shared_bytes'] for row in built), default=0):>8} "
            f"{sum(bool(row.get('failures')) for row in mine):>7}")
    return "\n".join(lines)


def report(paths: list[Path]) -> str:
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        head = f"\n## {path.name}: triton {data['triton']}, {data['target']}, commit {data['commit']}"
        out += [_table(data["triton_kernels"], head), "", summary(data["triton_kernels"])]
        if data.get("cuda_kernels"):
            out.append("\nCUDA kernels (beitfast._C)")
            for row in data["cuda_kernels"]:
                spill = row["spill_bytes"] + row["stack_bytes"]
                out.append(f"  {row['kernel'][:90]:90} {row['arch']:7} reg {row['registers']:>3} "
                           f"spill {spill:>4} smem {row['shared_bytes']:>6}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=[90, 80])
    parser.add_argument("--only", help="compile only kernels whose name contains this")
    parser.add_argument("--ops", nargs="+", choices=sorted(SCENARIOS), help="only these ops' scenarios")
    parser.add_argument("--scenarios", help="a Python file whose SCENARIOS replace the built-in ones")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the reports")
    parser.add_argument("--no-write", action="store_true", help="print, write no report")
    parser.add_argument("--report", action="store_true", help="print the written reports as tables")
    args = parser.parse_args(argv)

    if args.report:
        paths = sorted(args.out.glob("compile_*.json"))
        print(report(paths) if paths else f"no compile reports in {args.out}")
        return 0

    scenario_sets = _load_scenarios(args.scenarios) if args.scenarios else dict(SCENARIOS)
    if args.ops:
        scenario_sets = {op: scenario_sets[op] for op in args.ops}
    library = None if args.scenarios else _built_library()
    problems = []
    start = time.perf_counter()
    results = gate([ARCHS[capability] for capability in args.arch], scenario_sets, args.only, args.jobs)
    elapsed = time.perf_counter() - start
    for capability, (rows, found) in results.items():
        sm = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        cuda = [row for row in cuda_rows(library) if row["arch"].startswith(f"sm_{capability}")]
        for row in cuda:
            row["failures"] = cuda_failures(row)
            found += [f"{row['arch']} CUDA {row['kernel']}: {why}" for why in row["failures"]]
        problems += found
        print(_table(rows, f"\n## triton {triton.__version__}, {sm}: {len(rows)} compilations"))
        if not args.no_write and not args.only:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"compile_{triton.__version__}_sm{capability}.json"
            path.write_text(json.dumps(dict(
                triton=triton.__version__, torch=torch.__version__, target=sm,
                date=datetime.date.today().isoformat(), commit=_commit(),
                shapes=dict(B=B, N=N, D=D, H=H, V=V, img=IMG, patch=PATCH, masked=MASKED),
                shared_limit=ARCHS[capability].shared_per_block, triton_kernels=rows, cuda_kernels=cuda,
            ), indent=1) + "\n")
            print(f"wrote {path}")
    print(f"\n{sum(len(rows) for rows, _ in results.values())} compilations in {elapsed:.0f} s "
          f"({args.jobs} processes)")
    for problem in problems:
        print("FAIL", problem)
    verdict = f"FAILED, {len(problems)} problem(s)" if problems else "passed"
    print(f"compile gate (triton {triton.__version__}): {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
