"""A work model of attention with BEiT's relative position bias (a MODEL: counted work and the time
it implies at peak rates, never a measurement).

For each implementation and tile configuration, per layer at the given shape (default BEiT-B: B=128,
H=12, N=197, D=64, bf16): the FLOPs the kernels execute (tile padding and the backward's
recomputation of the scores included) against the useful ones, exponentials, global atomics,
scratch read-modify-write bytes (L2 if it fits) and the minimum HBM bytes, then the lower bound on
the time on H100 and H200 SXM (the slowest of compute, exponentials and HBM at peak rates).

``python benchmarks/attention_work_model.py`` prints the table; the attention benchmark prints the
same bounds beside its measured times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Data-sheet peaks (SXM parts): dense bf16 tensor-core FLOP/s, HBM bytes/s, SMs and boost clock
# (the exponential unit does 16 exp2 per clock per SM).
GPUS = {
    "H100": dict(flops=989e12, hbm=3.35e12, sms=132, clock=1.98e9),
    "H200": dict(flops=989e12, hbm=4.8e12, sms=132, clock=1.98e9),
}
BEIT_B = dict(B=128, H=12, N=197, D=64)
BYTES = 2  # bf16 q, k, v, out and their gradients


def covered(n: int, block: int, tail: int | None = None) -> int:
    """Rows a tiling executes for ``n``: full ``block`` tiles, then one tail tile (``tail`` wide, or a
    power of two >= 16 when None, as our kernels do; ``block`` when tails are full tiles)."""
    full, rest = divmod(n, block)
    if rest == 0:
        return n
    if tail is None:
        tail = max(16, 1 << (rest - 1).bit_length())
    return full * block + tail


@dataclass
class Work:
    name: str
    flops: float          # executed
    useful: float
    exps: float
    atomics: float
    scratch_bytes: float  # read-modify-write of scratch rows (L2-resident when small)
    hbm_bytes: float      # minimum HBM traffic

    def bound_ms(self, gpu: str) -> float:
        g = GPUS[gpu]
        return 1e3 * max(self.flops / g["flops"], self.exps / (g["sms"] * 16 * g["clock"]), self.hbm_bytes / g["hbm"])


def useful_flops(B, H, N, D) -> float:
    """The FLOPs attention benchmarks count for forward + backward (FlashAttention's convention: the
    backward is 2.5 times the forward): forward ``QK^T`` and ``PV``; backward the recomputed ``QK^T``,
    ``dV``, ``dP``, ``dQ``, ``dK``. 7 matmuls of 2 N^2 D at the exact N: executed / useful is then the
    cost of tile padding and of any recomputation beyond a flash backward's (the previous design's
    second pass)."""
    return 7 * 2 * B * H * N * N * D


def minimal_flops(B, H, N, D) -> float:
    """No recomputation at all (the probabilities kept from the forward, as eager attention does): 6
    matmuls of 2 N^2 D. A flash backward's recomputed scores alone make executed / minimal >= 7/6."""
    return 6 * 2 * B * H * N * N * D


def io_bytes(B, H, N, D) -> float:
    """q, k, v read and out written (forward); q, k, v, out, dout read and dq, dk, dv written (backward)."""
    tensor = B * H * N * D * BYTES
    return (3 + 1) * tensor + (5 + 3) * tensor


def ours(B, H, N, D, fwd_tile=(64, 64), bwd_tile=(16, 64), max_groups=16, scratch_cap=1 << 26) -> Work:
    """beitfast's kernels: tail tiles, one-pass backward (5 matmuls, exp once), no atomics; the score
    gradient summed per group of images in scratch, groups added once."""
    P = math.ceil(N / 128) * 128
    fm, fn = covered(N, fwd_tile[0]), covered(N, fwd_tile[1])
    bm, bn = covered(N, bwd_tile[0]), covered(N, bwd_tile[1])
    groups = max(1, min(B, max_groups, scratch_cap // (H * P * P * 4)))  # as kernels.attention.group_size
    flops = B * H * 2 * D * (2 * fm * fn + 5 * bm * bn)
    exps = B * H * (fm * fn + fm * math.ceil(fn / fwd_tile[1]) + bm * bn)
    scratch = B * H * (2 * 4 * bm * bn + 2 * 4 * bm * D * math.ceil(bn / bwd_tile[1]))
    bias = H * P * P * 4
    hbm = io_bytes(B, H, N, D) + 2 * B * H * P * 4 + bias + 2 * groups * bias + bias
    return Work(f"beitfast fwd {fwd_tile[0]}x{fwd_tile[1]}, bwd {bwd_tile[0]}x{bwd_tile[1]}",
                flops, useful_flops(B, H, N, D), exps, 0, scratch, hbm)


def previous(B, H, N, D, tile=64) -> Work:
    """The design this replaced: 64 x 64 tiles padded at every N, a dq pass and a dk/dv pass that
    both rebuild P (7 matmuls, exp twice), one fp32 atomic per image and score."""
    n = covered(N, tile, tile)
    flops = B * H * 2 * D * (2 * n * n + 7 * n * n)
    exps = B * H * (n * n + n * math.ceil(n / tile) + 2 * n * n)
    return Work(f"previous design {tile}x{tile}", flops, useful_flops(B, H, N, D), exps, B * H * N * N, 0,
                io_bytes(B, H, N, D) + 2 * B * H * N * 4 + H * N * N * 4)


def flash_no_bias(B, H, N, D, tile=(128, 128)) -> Work:
    """A bias-free flash kernel with square-ish tiles and no tail specialisation (the tiles are an
    assumption about FA3/cuDNN, not read from their code): 5-matmul backward, exp once."""
    m, n = covered(N, tile[0], tile[0]), covered(N, tile[1], tile[1])
    flops = B * H * 2 * D * 7 * m * n
    return Work(f"no-bias flash {tile[0]}x{tile[1]} (assumed tiles)", flops, useful_flops(B, H, N, D),
                B * H * 2 * m * n, 0, 0, io_bytes(B, H, N, D) + 2 * B * H * N * 4)


def sdpa_with_bias(B, H, N, D, tile=(64, 64)) -> Work:
    """SDPA's memory-efficient kernel fed the gathered bias (what timm and transformers do): flash
    work with its tiles (assumed), plus the bias read per image and the ``[B, H, N, ceil8(N)]`` bias
    gradient written and reduced over the batch."""
    m, n = covered(N, tile[0], tile[0]), covered(N, tile[1], tile[1])
    flops = B * H * 2 * D * 7 * m * n
    grad_bias = B * H * N * (math.ceil(N / 8) * 8) * BYTES
    return Work(f"sdpa + gathered bias {tile[0]}x{tile[1]} (assumed tiles)", flops, useful_flops(B, H, N, D),
                B * H * 2 * m * n, 0, 0, io_bytes(B, H, N, D) + 2 * B * H * N * 4 + 2 * grad_bias)


def rows(B=BEIT_B["B"], H=BEIT_B["H"], N=BEIT_B["N"], D=BEIT_B["D"]) -> list[Work]:
    return [
        # The autotune candidates of kernels/attention.py (_FWD_TILES, _BWD_TILES).
        *(ours(B, H, N, D, fwd, bwd) for fwd in ((64, 64), (128, 64), (64, 32))
          for bwd in ((16, 64), (16, 32))),
        previous(B, H, N, D),
        sdpa_with_bias(B, H, N, D),
        flash_no_bias(B, H, N, D),
    ]


def padded_work_ratios(ns=(50, 197, 577, 785), blocks=(16, 32, 64, 128)) -> dict[int, dict[int, float]]:
    """Executed / useful score-tile area per sequence length and block size, with our tail tiles."""
    return {n: {b: covered(n, b) ** 2 / n ** 2 for b in blocks} for n in ns}


def table(shape: dict | None = None) -> str:
    shape = shape or BEIT_B
    minimal = minimal_flops(**shape)
    lines = [f"attention work MODEL (not a measurement), per layer fwd+bwd at {shape}, bf16",
             "exec/useful: executed FLOPs over the 7 matmuls at exact N attention benchmarks count; "
             "exec/minimal: over 6 (no recomputation)",
             f"{'implementation':48s} {'exec/useful':>11s} {'exec/minimal':>12s} {'GFLOP':>7s} {'Mexp':>7s} "
             f"{'Matomic':>8s} {'scratch MB':>10s} {'HBM MB':>7s} {'H100 ms>=':>9s} {'H200 ms>=':>9s}"]
    for w in rows(**shape):
        lines.append(f"{w.name:48s} {w.flops / w.useful:11.3f} {w.flops / minimal:12.3f} {w.flops / 1e9:7.1f} "
                     f"{w.exps / 1e6:7.1f} "
                     f"{w.atomics / 1e6:8.1f} {w.scratch_bytes / 1e6:10.0f} {w.hbm_bytes / 1e6:7.0f} "
                     f"{w.bound_ms('H100'):9.3f} {w.bound_ms('H200'):9.3f}")
    lines.append("padded-work ratio (executed / useful score area) with tail tiles, by N and block:")
    for n, by_block in padded_work_ratios().items():
        lines.append(f"  N={n:4d}: " + "  ".join(f"{b}: {r:.3f}" for b, r in by_block.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
