"""A work model of attention with BEiT's relative position bias, per launch (a MODEL: counted work and
the time it implies at assumed rates, never a measurement).

For each launch of one layer's forward and backward: the grid and its programs (CTAs), the CTAs one
SM holds (from the compile gate's registers and shared memory, ``benchmarks/results/compile_*``),
the waves on an H100's 132 SMs, the tensor-core FLOPs executed (tile padding included), the bytes the
kernel's loads and stores move through L2 and the bytes that reach HBM, and a predicted time: per
wave ``max(FLOPs / tensor rate, HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth)`` plus a fixed
cost per launch. The same model is applied to the previous design (one backward program per (head,
group of images), scratch read-modify-write, fp32 bias), to a FlashAttention-2-style kernel without
bias and to SDPA fed a materialised ``[B, H, N, N]`` bias (tiles and occupancy of those two assumed,
not read from their code).

Shapes (BEiT-B heads, H = 12, D = 64, bf16): B=128/N=197 (pre-training at 224 px), B=16/N=1025 (512
px), B=8/N=1601 (640 px) and B=1/N=197 (reported only).

    python benchmarks/attention_work_model.py          # every table and the issue's targets
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# H100 SXM: data-sheet dense bf16 tensor rate and HBM bandwidth, SMs, registers and shared memory per
# SM. ASSUMED: L2 bandwidth about 5.5 TB/s (reported by microbenchmarks, not a data-sheet figure);
# mma.sync (tiles under 64 rows a warpgroup) at 2/3 of wgmma's rate; 2 us per launch.
GPU = dict(name="H100 SXM", flops=989e12, hbm=3.35e12, l2=5.5e12, l2_bytes=50e6, sms=132, regs=65536,
           smem=233472, max_ctas=32, max_warps=64)
MMA_SYNC_RATE = 2 / 3
LAUNCH_S = 2e-6
# A tensor re-read by concurrent CTAs stays in L2 if it takes at most this share of it (ASSUMED).
L2_SHARE = 0.5
H, D, E = 12, 64, 2  # heads, head dim, bytes per bf16 element
SHAPES = [(128, 197), (16, 1025), (8, 1601), (1, 197)]
TRAINING_SHAPES = SHAPES[:3]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded(n: int) -> int:
    """P of the dense bias (kernels.attention / ops.attention.padded_size)."""
    return cdiv(n, 128) * 128


def covered(n: int, block: int, tail: bool = True) -> int:
    """Rows a tiling executes: full blocks, then a tail of a power of two >= 16 (ours) or a full block."""
    full, rest = divmod(n, block)
    if rest == 0:
        return n
    return full * block + (max(16, 1 << (rest - 1).bit_length()) if tail else block)


@dataclass
class Launch:
    kernel: str
    config: str
    grid: tuple
    flops: float            # tensor-core FLOPs executed
    l2_bytes: float         # bytes of the kernel's loads and stores
    hbm_bytes: float        # bytes that reach HBM
    ctas_per_sm: int
    rate: float = 1.0       # share of the tensor rate its dots reach

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def waves(self) -> float:
        return self.programs / (GPU["sms"] * self.ctas_per_sm)

    def _waves(self) -> list[dict[str, float]]:
        """Per wave, the seconds of tensor cores (on the busiest SM), HBM and L2."""
        flops, hbm, l2 = (x / self.programs for x in (self.flops, self.hbm_bytes, self.l2_bytes))
        waves, left = [], self.programs
        while left > 0:
            in_wave = min(left, GPU["sms"] * self.ctas_per_sm)
            busiest = cdiv(in_wave, GPU["sms"])
            waves.append(dict(tensor=busiest * flops / (GPU["flops"] * self.rate / GPU["sms"]),
                              HBM=in_wave * hbm / GPU["hbm"], L2=in_wave * l2 / GPU["l2"]))
            left -= in_wave
        return waves

    def seconds(self) -> float:
        """Per wave the slowest of tensor cores, HBM and L2; plus the launch."""
        return LAUNCH_S + sum(max(wave.values()) for wave in self._waves())

    def bound(self) -> str:
        """What limits its first wave."""
        wave = self._waves()[0]
        return max(wave, key=wave.get)


def occupancy(registers: int, shared: int, warps: int) -> int:
    """CTAs one SM holds: registers (allocated per warp in units of 256), shared memory (1 KB reserved per
    CTA), warps and the CTA limit."""
    per_warp = cdiv(registers * 32, 256) * 256
    return max(1, min(GPU["regs"] // (per_warp * warps), GPU["smem"] // (shared + 1024),
                      GPU["max_warps"] // warps, GPU["max_ctas"]))


def gate_usage(kernel: str, config: str, n: int, report: str = "compile_3.8.0_sm90.json"):
    """``(registers, shared bytes, warps)`` of a compiled kernel and config from the compile gate's report
    (the row at this N, else at N = 197), or None when the report lacks it."""
    path = RESULTS / report
    if not path.exists():
        return None
    rows = [r for r in json.loads(path.read_text())["triton_kernels"]
            if r["kernel"] == f"attention.{kernel}" and r["config"] == config and "error" not in r
            and "HAS_BIAS=False" not in r["variant"]]
    for want in (f"N={n} ", "N=197 "):
        for row in rows:
            if want in row["variant"] + " ":
                return row["registers"], row["shared_bytes"], row["warps"]
    return None


def _ctas(kernel: str, config: str, n: int, fallback: int) -> int:
    usage = gate_usage(kernel, config, n)
    return occupancy(*usage) if usage else fallback


def _label(m: int, n: int, warps: int, stages: int) -> str:
    return f"BLOCK_M={m} BLOCK_N={n} w{warps} s{stages}"


# ---------------------------------------------------------------------------------------------------
# beitfast, this design: kernels/attention.py (its sm_90 tile candidates and its launch plan's grids)

def _kernels():
    from beitfast.kernels import attention

    return attention


def candidates() -> dict[str, list[tuple[int, int, int, int]]]:
    """The sm_90 autotune candidates ``(BLOCK_M, BLOCK_N, warps, stages)`` of each of our kernels."""
    k = _kernels()
    return dict(fwd=k._FWD_TILES[9], kv=k._KV_TILES[9], q=k._Q_TILES[9])


def _new_launch(kind: str, B: int, N: int, tile: tuple[int, int, int, int]) -> Launch:
    """One of our tiled kernels with one tile config: its grid from ``launch_plan``, its traffic
    from its loads and stores (bias tiles in bf16)."""
    m, n, _, _ = tile
    grid = dict(_kernels().launch_plan(B, H, N, {kind: (m, n), **{k: (64, 64) for k in ("fwd", "kv", "q")
                                                                 if k != kind}}, GPU["sms"]))[kind]
    P, bh, row = padded(N), B * H, N * D * E
    cm, cn = covered(N, m), covered(N, n)
    io = bh * (4 * row + 2 * P * 4)  # q, k, v, dO, lse, delta, each read once from HBM
    bias_tiles, bias_once = bh * cm * cn * E, H * P * P * E
    if kind == "fwd":  # q once, k and v once per query block, o and lse written
        flops, l2 = 4 * cm * cn * D * bh, bh * (2 * row + grid[0] * 2 * row + P * 4) + bias_tiles
        hbm = bh * (4 * row + P * 4) + bias_once
        name = "_fwd_kernel"
    elif kind == "kv":  # k, v once; q, dO, lse, delta once per key block; dk, dv written
        flops, l2 = 8 * cm * cn * D * bh, bh * (grid[0] * (2 * row + 2 * cm * 4) + 4 * row) + bias_tiles
        hbm = io + bh * 2 * row + bias_once
        name = "_bwd_kv_kernel"
    else:  # q, dO, o, lse once; k, v once per query block; dq and delta written
        flops, l2 = 6 * cm * cn * D * bh, bh * (3 * row + 2 * cm * 4 + grid[0] * 2 * row + row) + bias_tiles
        hbm = io + bh * 2 * row + bias_once
        name = "_bwd_q_kernel"
    label = _label(*tile)
    return Launch(name, label, grid, flops, l2, hbm, _ctas(name, label, N, 2))


def kept(kind: str, B: int, N: int) -> Launch:
    """The candidate the model predicts fastest (what autotuning should keep)."""
    return min((_new_launch(kind, B, N, tile) for tile in candidates()[kind]), key=Launch.seconds)


def shared_table(B: int, N: int) -> bool:
    """Pre-training shares one table among the layers (gathered once per step, so each layer's launcher
    casts the fp32 dense bias); the fine-tuning shapes give each layer its own table, which the launcher
    gathers straight into bf16."""
    return (B, N) == (128, 197)


def new_design(B: int, N: int) -> tuple[list[Launch], list[Launch]]:
    """(forward launches, backward launches) of one layer with a bias, each tiled kernel at its kept
    config."""
    P = padded(N)
    if shared_table(B, N):
        prep = H * P * P * (4 + E)  # the fp32 bias cast to bf16 by the launcher (one torch kernel)
        name = "bias cast"
    else:
        prep = P * P * 8 + H * P * P * E  # the int64 gather positions read, the bf16 bias written
        name = "bias gather"
    fwd = [Launch(name, "torch", (cdiv(H * P * P, 1024),), 0, prep, prep, 8), kept("fwd", B, N)]
    # the backward reads the forward's cast copy (saved for it): no second cast; dQ writes delta
    bwd = [kept("q", B, N), kept("kv", B, N), bias_launch(B, N)]
    groups = bwd[-1].grid[1]
    if groups > 1:
        partial = groups * H * P * P * 4
        bwd.append(Launch("group sum", "torch", (cdiv(H * P * P, 1024),), 0, partial + H * P * P * 4,
                          partial + H * P * P * 4, 8))
    return fwd, bwd


def bias_launch(B: int, N: int) -> Launch:
    """The bias-gradient kernel at its fixed sm_90 tile, the batch split into the launcher's groups."""
    P, bh, row = padded(N), B * H, N * D * E
    io = bh * (4 * row + 2 * P * 4)
    tm, tn, warps = _kernels()._BIAS_TILES[9]
    tiles = {k: (64, 64) for k in ("fwd", "kv", "q")}  # the bias grid does not depend on them
    grid = dict(_kernels().launch_plan(B, H, N, tiles, GPU["sms"]))["bias"]
    groups, cm, cn = grid[1], covered(N, tm), covered(N, tn)
    partial = groups * H * P * P * 4
    # per image: q, dO (rows) once per column block, k, v (columns) once per row block, lse and delta;
    # the bias tile once per group
    l2 = bh * (cdiv(N, tn) * (2 * row + 2 * cm * 4) + cdiv(N, tm) * 2 * row) + groups * H * cm * cn * E
    return Launch("_bwd_bias_kernel", f"{tm}x{tn} w{warps} s2", grid, 4 * cm * cn * D * bh, l2 + partial,
                  io + partial + H * P * P * E, _ctas("_bwd_bias_kernel", f"w{warps} s2", N, 1))


def predicted(kind: str, B: int, N: int, tile: tuple[int, int, int, int] | None = None) -> Launch:
    """One of our tiled kernels (``fwd``, ``q``, ``kv``) at an sm_90 ``(BLOCK_M, BLOCK_N, warps,
    stages)`` tile, or at the tile the model keeps; ``bias`` at its fixed tile."""
    if kind == "bias":
        return bias_launch(B, N)
    return _new_launch(kind, B, N, tile) if tile else kept(kind, B, N)


# ---------------------------------------------------------------------------------------------------
# beitfast, the previous design (commit 3ada4f8): registers and shared memory from its compile report

def old_design(B: int, N: int) -> tuple[list[Launch], list[Launch]]:
    """Forward one program per (image, head), 64 x 64, fp32 bias, batch-major (219 registers, 57 KB:
    2 CTAs/SM); backward one program per (head, group of images), 16 x 64 tiles (238 registers, 32 KB:
    2 CTAs/SM, mma.sync), dQ and dS scratch read-modify-written per tile, zero-filled and summed."""
    P, bh, row = padded(N), B * H, N * D * E
    cm, cn = covered(N, 64), covered(N, 64)
    nq = cdiv(N, 64)
    bias = H * P * P * 4
    # Batch-major: the CTAs that run together read every head's bias; past L2's share, each image re-reads.
    bias_hbm = bias if bias <= L2_SHARE * GPU["l2_bytes"] else B * bias
    fwd = [Launch("_fwd_kernel (old)", _label(64, 64, 4, 2), (bh,), 4 * cm * cn * D * bh,
                  bh * (2 * row + nq * 2 * row + cm * cn * 4 + P * 4), bh * (4 * row + P * 4) + bias_hbm, 2)]
    groups = max(1, min(B, 16, (1 << 26) // (H * P * P * 4)))
    bm, bn = covered(N, 16), covered(N, 64)
    nk = cdiv(N, 64)
    per_image = (2 * row + bm * 4 + bm * D * 4            # delta, dQ scratch zeroed
                 + nk * (2 * row + 2 * bm * 4 + bm * D * 8) + 2 * row + bm * bn * 4 + bm * bn * 8
                 + bm * D * 4 + 3 * row)                # dQ scratch read, dq, dk, dv written
    scratch = groups * H * P * P * 4
    rmw = bh * bm * bn * 8
    scratch_hbm = rmw if scratch > L2_SHARE * GPU["l2_bytes"] else scratch
    bwd = [Launch("torch.zeros", "torch", (cdiv(scratch, 4096),), 0, scratch, scratch, 8),
           Launch("_bwd_kernel (old)", _label(16, 64, 4, 1), (H, groups), 10 * bm * bn * D * bh,
                  bh * per_image,
                  bh * (8 * row + 2 * P * 4) + bias + scratch_hbm, 2, MMA_SYNC_RATE),
           Launch("partial.sum(0)", "torch", (cdiv(bias, 4096),), 0, scratch + bias, scratch + bias, 8)]
    return fwd, bwd


# ---------------------------------------------------------------------------------------------------
# references (tiles and occupancy ASSUMED, not read from their code)

def flash2_no_bias(B: int, N: int) -> tuple[list[Launch], list[Launch]]:
    """FlashAttention-2 style, no bias: forward 128 x 128 tiles (4 warps, 2 CTAs/SM), backward over key
    blocks of 128 with dQ accumulated by fp32 atomics (8 warps, 1 CTA/SM), a dot(dO, O) pre-pass and a
    dQ conversion; blocks padded to full tiles."""
    bh, row = B * H, N * D * E
    c = covered(N, 128, tail=False)
    nb = cdiv(N, 128)
    fwd = [Launch("fa2 fwd", "128x128 w4 (assumed)", (nb, B, H), 4 * c * c * D * bh,
                  bh * (2 * row + nb * 2 * row + N * 4), bh * (4 * row + N * 4), 2)]
    accum = bh * c * D * 4
    delta = bh * (2 * row + N * 4)
    bwd = [Launch("fa2 dot(dO, O)", "assumed", (nb, B, H), 0, delta, delta, 8),
           Launch("fa2 bwd", "128x128 w8 (assumed)", (nb, B, H), 10 * c * c * D * bh,
                  bh * (nb * (2 * row + 2 * N * 4 + 2 * c * D * 4) + 4 * row),
                  bh * (6 * row + 2 * N * 4) + 2 * accum, 1),
           Launch("fa2 dQ convert", "assumed", (nb, B, H), 0, accum + bh * row, accum + bh * row, 8)]
    return fwd, bwd


def sdpa_dense_bias(B: int, N: int) -> tuple[list[Launch], list[Launch]]:
    """SDPA's memory-efficient kernel with the bias materialised ``[B, H, N, N]`` (bf16, rows padded to
    8): 64 x 64 tiles (2 CTAs/SM), the bias read forward and backward, its ``[B, H, N, N]`` gradient
    written, then summed over the batch; backward grid over key blocks."""
    bh, row = B * H, N * D * E
    c = covered(N, 64, tail=False)
    nb = cdiv(N, 64)
    dense = bh * N * cdiv(N, 8) * 8 * E
    fwd = [Launch("bias expand", "torch", (cdiv(dense, 4096),), 0, dense + H * N * N * 4, dense, 8),
           Launch("sdpa fwd", "64x64 (assumed)", (nb, H, B), 4 * c * c * D * bh,
                  bh * (2 * row + nb * 2 * row + N * 4) + dense, bh * (4 * row + N * 4) + dense, 2)]
    bwd = [Launch("sdpa bwd", "64x64 (assumed)", (nb, H, B), 10 * c * c * D * bh,
                  bh * (nb * (2 * row + 2 * N * 4 + 2 * c * D * 4) + 4 * row) + 2 * dense,
                  bh * (8 * row + 2 * N * 4) + 2 * dense, 2),
           Launch("grad bias sum", "torch", (cdiv(dense, 4096),), 0, dense + H * N * N * 4,
                  dense + H * N * N * 4, 8)]
    return fwd, bwd


DESIGNS = {"beitfast (this design)": new_design, "beitfast (previous)": old_design,
           "FA2-style, no bias": flash2_no_bias, "SDPA + [B,H,N,N] bias": sdpa_dense_bias}


def total(launches: list[Launch]) -> float:
    return sum(launch.seconds() for launch in launches)


def launch_table(B: int, N: int) -> str:
    lines = [f"per launch, B={B} N={N} H={H} D={D} bf16, H100 MODEL (not a measurement)",
             f"{'design':24} {'dir':3} {'kernel':20} {'config':26} {'grid':>16} {'progs':>6} {'CTA/SM':>6} "
             f"{'waves':>6} {'GFLOP':>7} {'L2 MB':>8} {'HBM MB':>8} {'us':>8} bound"]
    for name, design in DESIGNS.items():
        for direction, launches in zip(("fwd", "bwd"), design(B, N)):
            for launch in launches:
                lines.append(
                    f"{name:24} {direction:3} {launch.kernel:20} {launch.config:26} {str(launch.grid):>16} "
                    f"{launch.programs:>6} {launch.ctas_per_sm:>6} {launch.waves:6.2f} "
                    f"{launch.flops / 1e9:7.2f} {launch.l2_bytes / 1e6:8.1f} {launch.hbm_bytes / 1e6:8.1f} "
                    f"{1e6 * launch.seconds():8.1f} "
                    f"{launch.bound()}")
    return "\n".join(lines)


def summary_rows():
    """``(B, N, design, fwd us, bwd us, fwd min programs, bwd min programs)`` for every shape and design;
    min programs over the launches of our kernels (torch's elementwise launches excluded)."""
    rows = []
    for B, N in SHAPES:
        for name, design in DESIGNS.items():
            fwd, bwd = design(B, N)
            kernels = [[l.programs for l in part if l.config != "torch"] for part in (fwd, bwd)]
            rows.append((B, N, name, 1e6 * total(fwd), 1e6 * total(bwd), min(kernels[0]), min(kernels[1])))
    return rows


def targets() -> list[tuple[str, bool]]:
    """The issue's targets at the training shapes: each of our launches >= 2 waves of 132 programs, the
    backward <= 2.5x the forward, fwd+bwd within 1.5x of the FA2-style kernel without bias."""
    out = []
    for B, N in TRAINING_SHAPES:
        fwd, bwd = new_design(B, N)
        ref = sum(total(part) for part in flash2_no_bias(B, N))
        ours = [l for l in fwd + bwd if l.config != "torch"]
        t_fwd, t_bwd = total(fwd), total(bwd)
        out += [(f"B={B} N={N}: every kernel launches >= 264 programs (min {min(l.programs for l in ours)})",
                 all(l.programs >= 2 * GPU["sms"] for l in ours)),
                (f"B={B} N={N}: bwd / fwd = {t_bwd / t_fwd:.2f} <= 2.5", t_bwd <= 2.5 * t_fwd),
                (f"B={B} N={N}: (fwd+bwd) / FA2-style = {(t_fwd + t_bwd) / ref:.2f} <= 1.5",
                 t_fwd + t_bwd <= 1.5 * ref)]
    return out


def table() -> str:
    lines = ["attention work MODEL per layer (not a measurement): predicted H100 time in us, and the fewest "
             "programs of any of the design's kernels per launch",
             f"{'B':>4} {'N':>5} {'design':24} {'fwd us':>8} {'bwd us':>8} {'total':>8} {'fwd progs':>9} "
             f"{'bwd progs':>9}"]
    for B, N, name, f, b, pf, pb in summary_rows():
        lines.append(f"{B:>4} {N:>5} {name:24} {f:8.1f} {b:8.1f} {f + b:8.1f} {pf:>9} {pb:>9}")
    lines.append("targets at the training shapes (model):")
    lines += [f"  {'ok  ' if ok else 'MISS'} {text}" for text, ok in targets()]
    for B, N in SHAPES:
        lines += ["", launch_table(B, N)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
