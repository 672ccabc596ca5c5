"""Flash attention with a dense additive bias for BEiT's short sequences, forward and backward, in Triton.

``out = softmax(q k^T * scale + bias[h, :N, :N]) v``. The bias is BEiT's relative position bias already
gathered from its table (``beitfast.ops.relative_position_bias``): a dense ``[H, P, P]`` tensor padded
to ``P = padded_size(N)`` (a multiple of the largest tile), identical for every image, or the ``[R, H]``
table with its index, which the launcher gathers straight into the compute dtype. The kernels read it
in the compute dtype (the forward casts an fp32 dense bias for 16-bit q, k, v: half the bytes; the
backward reads the forward's copy, so one gather or cast per layer), as affine tiles without bounds
masks, and never see the relative-position index; its gradient is fp32 (folded into the table's rows
when a table was given).

* N and the head dim are compile-time constants (one compile per sequence length). A sequence is cut
  into full tiles, read without masks, and one tail tile of the smallest power of two >= 16 that
  covers the rest, the only tile that masks: at N = 197, 64-wide tiles execute 208 rows, not 256.
* Every grid is ``(blocks, B, H)``: the programs that run together belong to one head and share its
  bias tiles in L2 (head-major), and every sequence length gives ``blocks * B * H`` programs. The tiles
  are autotuned per sequence length and per ``B * H`` (bucketed), so inference at batch 1 and training
  keep different tiles.
* forward: one program per (query block, image, head); online softmax in fp32, base 2; saves the row
  log-sum-exp (base 2) for the backward.
* backward, three launches, no atomics and no read-modify-write of global memory: dQ per (query block,
  image, head) over the key blocks (three matmuls), which also writes ``delta = rowsum(dO * O)`` for
  its rows; dK and dV per (key block, image, head) over the query blocks (four); the bias gradient per
  (score tile, group of images, head), ``dS`` summed over the group's images in registers and written
  once (two matmuls: the scores and ``dP`` recomputed). With more than one group the launcher adds the
  groups' ``[H, P, P]`` sums in a fixed order. Results repeat bit for bit for a given tile
  configuration.

q, k and v are read through their strides (the model's packed ``[B, N, 3, H, D]`` qkv needs no copy);
the output is written ``[B, N, H, D]`` (returned as a ``[B, H, N, D]`` view, so the projection reads
it without a copy); the backward writes dq, dk and dv packed as one ``[B, N, 3, H, D]`` tensor, the
gradient of the model's qkv.

Ops: ``beitfast::attention_fwd`` / ``beitfast::attention_packed_fwd`` (q, k, v apart or packed) and
``beitfast::attention_bwd``, registered with ``torch.library`` so ``torch.compile`` keeps each as one
node. Entry points: :func:`attention` and :func:`attention_packed`; :func:`launch_plan` lists the
launches and grids for a shape (the work model reads it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.attention import fold_bias_grad, gathered, padded_size

__all__ = ["attention", "attention_packed", "bias_groups", "launch_plan"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The bias-gradient launch aims at this many programs per SM (two resident CTAs, two waves) before it
# splits the batch into more groups of images (each group adds an [H, P, P] fp32 partial sum).
_BIAS_PROGRAMS_PER_SM = 4


def _tail(n: int, block: int) -> int:
    """The tail tile after ``n // block`` full ones: a power of two >= 16 covering the rest, or 0."""
    rest = n % block
    return 0 if rest == 0 else max(16, triton.next_power_of_2(rest))


def _tile_configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates on a GPU; one small config under the
    interpreter, where autotuning cannot time anything."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes
    ]


def _fits(config, named_args, kwargs) -> bool:
    """fp32 inputs and head dims above 64 keep the tiles up to 64 x 64 (bigger ones spill or overflow
    shared memory)."""
    wide = named_args["Q"].element_size() == 4 or kwargs.get("BLOCK_D", 64) > 64
    return not wide or config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 64


def _generation(device: torch.device) -> int:
    """The key of the per-generation tile tables: ``9`` for sm_90 and later, ``8`` for earlier GPUs."""
    return 9 if torch.cuda.get_device_capability(device)[0] >= 9 else 8


def _prune_by_arch(tiles: dict[int, list[tuple[int, int, int, int]]]):
    """A pruning function keeping the candidates of the GPU's generation (:func:`_generation`) that
    fit."""

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        mine = tiles[_generation(named_args["Q"].device)]
        keep = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in mine]
        return [c for c in keep if _fits(c, named_args, kwargs)] or keep

    return prune


def _union(tiles: dict[int, list]) -> list:
    return list(dict.fromkeys(t for arch in tiles.values() for t in arch))


# Forward: BLOCK_M query rows per program (K and V are read once per query block: 256 rows read them
# half as often as 128), BLOCK_N key rows a step. 32 x 64 with 4 warps left an 8-byte stack frame without
# a bias on sm_90 with triton 3.6; 256 x 64 with 16 warps (128 registers a thread) fits sm_90 without
# spills but spills on sm_80 (compile gate).
_FWD_TILES = {9: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (256, 64, 16, 2)],
              8: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)]}
_FWD_CONFIGS = _tile_configs(_union(_FWD_TILES))
# dK/dV: BLOCK_N key rows (the M side of its four matmuls: 64 rows per warpgroup reach wgmma on
# sm_90), BLOCK_M query rows a step. On sm_80 (mma.sync, operands in registers) 64 key rows spill
# with 4 and 8 warps (compile gate): 32 there.
_KV_TILES = {9: [(64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2)],
             8: [(64, 32, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2)]}
_KV_CONFIGS = _tile_configs(_union(_KV_TILES))
# dQ: BLOCK_M query rows (the M side of its three matmuls), BLOCK_N key rows a step; K and V are read
# once per query block, so 256 rows read them half as often as 128. On sm_90 256 x 32 with 16 warps fits
# (121 registers, no spills) where 256 x 64 leaves a 16 to 24 byte stack frame with 2 stages (compile
# gate). On sm_80 64 x 64 spills with 3 stages or 8 warps.
_Q_TILES = {9: [(64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (256, 32, 16, 2)],
            8: [(64, 32, 4, 2), (32, 64, 4, 2)]}
_Q_CONFIGS = _tile_configs(_union(_Q_TILES))
# The bias gradient's tile ``(rows, columns, warps)`` per GPU generation, fixed (not autotuned: its
# number of image groups, and so its scratch, depends on the number of tiles). Each image's q and dO
# rows and k and v columns are read once per tile, so the bytes per bias-gradient element fall as the
# tile grows: 8 bytes at 64 x 64, 6 at 128 x 64 (sm_90, a warpgroup per 64 rows; 128 x 128 spills
# there), 64 x 64 on sm_80 (mma.sync operands in registers: 255 registers already). The interpreter
# runs ``_BIAS_TILE`` (tests change it).
_BIAS_TILES = {9: (128, 64, 8), 8: (64, 64, 4)}
_BIAS_TILE = (32, 32, 4) if _INTERPRET else None
_HEURISTICS = {
    "TAIL_M": lambda args: _tail(args["N"], args["BLOCK_M"]),
    "TAIL_N": lambda args: _tail(args["N"], args["BLOCK_N"]),
}


def bias_tile(device: torch.device) -> tuple[int, int, int]:
    """``(rows, columns, warps)`` of the bias-gradient kernel's tile on ``device``'s GPU generation."""
    if _BIAS_TILE is not None:
        return _BIAS_TILE
    return _BIAS_TILES[_generation(device)]


def bias_tiles(n: int, tile: tuple[int, ...]) -> int:
    """Score tiles of the bias gradient per head."""
    return triton.cdiv(n, tile[0]) * triton.cdiv(n, tile[1])


def bias_groups(batch: int, heads: int, n: int, sms: int, tile: tuple[int, ...]) -> int:
    """Groups of images the bias gradient splits the batch into: one, unless the score tiles of all
    heads give fewer than ``_BIAS_PROGRAMS_PER_SM`` programs per SM."""
    tiles = bias_tiles(n, tile) * heads
    groups = max(1, min(batch, triton.cdiv(_BIAS_PROGRAMS_PER_SM * sms, tiles)))
    return triton.cdiv(batch, triton.cdiv(batch, groups))  # none empty


def launch_plan(B: int, H: int, N: int, tiles: dict[str, tuple[int, int]], sms: int, bias: bool = True):
    """``[(kernel, grid)]`` of one forward and one backward, for the given ``{kernel: (BLOCK_M,
    BLOCK_N)}`` tiles (``fwd``, ``kv``, ``q``, and ``bias``: sm_90's when not given); the grids the
    launchers below compute."""
    plan = [("fwd", (triton.cdiv(N, tiles["fwd"][0]), B, H)), ("q", (triton.cdiv(N, tiles["q"][0]), B, H)),
            ("kv", (triton.cdiv(N, tiles["kv"][1]), B, H))]
    if bias:
        tile = tiles.get("bias", _BIAS_TILES[9])
        plan.append(("bias", (bias_tiles(N, tile), bias_groups(B, H, N, sms, tile), H)))
    return plan


@triton.jit
def _load_rows(base, rows, cols, s_row, s_col, N: tl.constexpr, D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A ``[rows, cols]`` tile; masks rows only in a tail tile and columns only when ``D`` is not a
    power of two."""
    # A mask that varies along the contiguous columns would split vector loads into single ones
    # (and a 64-bit address each): the column mask only exists when D is not a power of two.
    ptrs = base + rows[:, None] * s_row + cols[None, :] * s_col
    if cols.shape[0] == D:
        if MASK_ROWS:
            return tl.load(ptrs, mask=(rows < N)[:, None], other=0.0)
        else:
            return tl.load(ptrs)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=(rows < N)[:, None] & (cols < D)[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)


@triton.jit
def _store_rows(base, value, rows, cols, s_row, s_col, N: tl.constexpr, D: tl.constexpr, MASK_ROWS: tl.constexpr):
    ptrs = base + rows[:, None] * s_row + cols[None, :] * s_col
    value = value.to(base.dtype.element_ty)
    if cols.shape[0] == D:
        if MASK_ROWS:
            tl.store(ptrs, value, mask=(rows < N)[:, None])
        else:
            tl.store(ptrs, value)
    elif MASK_ROWS:
        tl.store(ptrs, value, mask=(rows < N)[:, None] & (cols < D)[None, :])
    else:
        tl.store(ptrs, value, mask=(cols < D)[None, :])


@triton.jit
def _scores_log2(q, k, bias_ptr, rows, cols, s_bi, scale_log2, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """``(q k^T * scale + bias) * log2(e)`` for one tile; exp2 is the cheap exponential."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    if HAS_BIAS:
        # Padded storage: a tile never reads outside it, so no mask.
        s += tl.load(bias_ptr + rows[:, None] * s_bi + cols[None, :]).to(tl.float32) * LOG2E
    return s


@triton.jit
def _fwd_key_block(
    acc, m_i, l_i, q, k_base, v_base, bias_ptr, rows, start_n, offs_d,
    s_kn, s_kd, s_vn, s_vd, s_bi, scale_log2,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, TAIL: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK)
    k = _load_rows(k_base, cols, offs_d, s_kn, s_kd, N, D, TAIL)
    v = _load_rows(v_base, cols, offs_d, s_vn, s_vd, N, D, TAIL)
    s = _scores_log2(q, k, bias_ptr, rows, cols, s_bi, scale_log2, HAS_BIAS, PRECISION)
    if TAIL:
        s = tl.where((cols < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows masked so far (a user bias of -inf): exponentiate against 0, not -inf (-inf - -inf is NaN).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_query_block(
    Q, K, V, BIAS, OUT, LSE, start_m, scale_log2,
    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_bi,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_N: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, rows, offs_d, s_qn, s_qd, N, D, MASK_ROWS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N // BLOCK_N * BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q, K, V, BIAS, rows, start_n, offs_d, s_kn, s_kd, s_vn, s_vd, s_bi, scale_log2,
            N, D, HAS_BIAS, PRECISION, BLOCK_N, False,
        )
    if TAIL_N > 0:
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q, K, V, BIAS, rows, N // BLOCK_N * BLOCK_N, offs_d, s_kn, s_kd, s_vn, s_vd, s_bi,
            scale_log2, N, D, HAS_BIAS, PRECISION, TAIL_N, True,
        )
    # A fully masked row (l_i = 0) gives zeros, and an LSE of +inf so that the backward's
    # probabilities and gradients of that row are zeros too.
    masked = l_i == 0.0
    _store_rows(OUT, acc / tl.where(masked, 1.0, l_i)[:, None], rows, offs_d, s_on, s_od, N, D, MASK_ROWS)
    # LSE rows are padded like the bias: the tail's extra rows are written too, never read as valid.
    tl.store(LSE + rows, tl.where(masked, float("inf"), m_i + tl.log2(l_i)))


@triton.jit
def _fill_rows(ptr, START: tl.constexpr, END: tl.constexpr):
    """Zeros in ``ptr[START:END]`` (both multiples of 16): padding that no tile covers gets defined
    values, so every output is a function of the inputs."""
    for start in range(START, END, 16):
        tl.store(ptr + start + tl.arange(0, 16), tl.zeros([16], tl.float32))


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "D", "HAS_BIAS", "batch_heads"],
                 prune_configs_by={"early_config_prune": _prune_by_arch(_FWD_TILES)})
@triton.heuristics(_HEURISTICS)
@triton.jit(do_not_specialize=["batch_heads"])
def _fwd_kernel(
    Q, K, V, BIAS, OUT, LSE,
    scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_bh, s_bi, batch_heads,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """One program per (query block, image, head); the last query block may be the tail tile."""
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    OUT += b * s_ob + h * s_oh
    if HAS_BIAS:
        BIAS += h * s_bh
    LSE += (b * tl.num_programs(2) + h) * P
    if TAIL_M == 0 or start_m + BLOCK_M <= N:
        _fwd_query_block(
            Q, K, V, BIAS, OUT, LSE, start_m, scale_log2,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_bi,
            N, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, TAIL_N, False,
        )
    else:
        _fwd_query_block(
            Q, K, V, BIAS, OUT, LSE, start_m, scale_log2,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_bi,
            N, D, HAS_BIAS, PRECISION, TAIL_M, BLOCK_N, BLOCK_D, TAIL_N, True,
        )
    if start_m + BLOCK_M >= N:  # the last query block
        _fill_rows(LSE, N // BLOCK_M * BLOCK_M + TAIL_M, P)


# ---------------------------------------------------------------------------------------------------
# backward

@triton.jit
def _kv_tile(
    dk, dv, k, v, Q, DOUT, LSE, DELTA, BIAS, rows, cols, offs_d, scale_log2, s_qn, s_qd, s_gn, s_gd, s_bi,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
):
    """One (query block, key block) tile for dK and dV, in transposed form (rows are keys)."""
    q = _load_rows(Q, rows, offs_d, s_qn, s_qd, N, D, MASK_ROWS)
    do = _load_rows(DOUT, rows, offs_d, s_gn, s_gd, N, D, MASK_ROWS)
    lse = tl.load(LSE + rows)
    delta = tl.load(DELTA + rows)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
    if HAS_BIAS:
        s_t += tl.load(BIAS + rows[None, :] * s_bi + cols[:, None]).to(tl.float32) * LOG2E
    p_t = tl.exp2(s_t - lse[None, :])
    if MASK_ROWS or MASK_COLS:
        p_t = tl.where((cols < N)[:, None] & (rows < N)[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _kv_block(
    Q, K, V, DOUT, DK, DV, LSE, DELTA, BIAS, start_n, scale, scale_log2,
    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_dkn, s_dkd, s_dvn, s_dvd, s_bi,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_M: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, cols, offs_d, s_kn, s_kd, N, D, MASK_COLS)
    v = _load_rows(V, cols, offs_d, s_vn, s_vd, N, D, MASK_COLS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Full query blocks in a loop without branches (so it pipelines), then the tail.
    for start_m in range(0, N // BLOCK_M * BLOCK_M, BLOCK_M):
        dk, dv = _kv_tile(
            dk, dv, k, v, Q, DOUT, LSE, DELTA, BIAS, start_m + tl.arange(0, BLOCK_M), cols, offs_d,
            scale_log2, s_qn, s_qd, s_gn, s_gd, s_bi, N, D, HAS_BIAS, PRECISION, False, MASK_COLS,
        )
    if TAIL_M > 0:
        dk, dv = _kv_tile(
            dk, dv, k, v, Q, DOUT, LSE, DELTA, BIAS, N // BLOCK_M * BLOCK_M + tl.arange(0, TAIL_M), cols,
            offs_d, scale_log2, s_qn, s_qd, s_gn, s_gd, s_bi, N, D, HAS_BIAS, PRECISION, True, MASK_COLS,
        )
    _store_rows(DK, dk * scale, cols, offs_d, s_dkn, s_dkd, N, D, MASK_COLS)
    _store_rows(DV, dv, cols, offs_d, s_dvn, s_dvd, N, D, MASK_COLS)


@triton.autotune(configs=_KV_CONFIGS, key=["N", "D", "HAS_BIAS", "batch_heads"],
                 prune_configs_by={"early_config_prune": _prune_by_arch(_KV_TILES)})
@triton.heuristics(_HEURISTICS)
@triton.jit(do_not_specialize=["batch_heads"])
def _bwd_kv_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, DK, DV,
    scale, scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    s_bh, s_bi, batch_heads,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dK and dV of one (key block, image, head): the query blocks in turn, sums in registers."""
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    DOUT += b * s_gb + h * s_gh
    DK += b * s_dkb + h * s_dkh
    DV += b * s_dvb + h * s_dvh
    LSE += (b * tl.num_programs(2) + h) * P
    DELTA += (b * tl.num_programs(2) + h) * P
    if HAS_BIAS:
        BIAS += h * s_bh
    if TAIL_N == 0 or start_n + BLOCK_N <= N:
        _kv_block(
            Q, K, V, DOUT, DK, DV, LSE, DELTA, BIAS, start_n, scale, scale_log2,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_dkn, s_dkd, s_dvn, s_dvd, s_bi,
            N, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, TAIL_M, False,
        )
    else:
        _kv_block(
            Q, K, V, DOUT, DK, DV, LSE, DELTA, BIAS, start_n, scale, scale_log2,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_dkn, s_dkd, s_dvn, s_dvd, s_bi,
            N, D, HAS_BIAS, PRECISION, BLOCK_M, TAIL_N, BLOCK_D, TAIL_M, True,
        )


@triton.jit
def _q_tile(
    dq, q, do, lse, delta, K, V, BIAS, rows, cols, offs_d, scale_log2, s_kn, s_kd, s_vn, s_vd, s_bi,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    MASK_COLS: tl.constexpr,
):
    """One (query block, key block) tile for dQ."""
    k = _load_rows(K, cols, offs_d, s_kn, s_kd, N, D, MASK_COLS)
    v = _load_rows(V, cols, offs_d, s_vn, s_vd, N, D, MASK_COLS)
    s = _scores_log2(q, k, BIAS, rows, cols, s_bi, scale_log2, HAS_BIAS, PRECISION)
    p = tl.exp2(s - lse[:, None])
    if MASK_COLS:
        p = tl.where((cols < N)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _q_block(
    Q, K, V, OUT, DOUT, DQ, LSE, DELTA, BIAS, start_m, scale, scale_log2,
    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd, s_bi,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_N: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, rows, offs_d, s_qn, s_qd, N, D, MASK_ROWS)
    do = _load_rows(DOUT, rows, offs_d, s_gn, s_gd, N, D, MASK_ROWS)
    lse = tl.load(LSE + rows)
    # delta = rowsum(dO * O) in fp32, here where dO is read anyway; stored for the dK/dV and bias-gradient
    # launches that follow (zero on rows past N).
    o = _load_rows(OUT, rows, offs_d, s_on, s_od, N, D, MASK_ROWS)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + rows, delta)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N // BLOCK_N * BLOCK_N, BLOCK_N):
        dq = _q_tile(dq, q, do, lse, delta, K, V, BIAS, rows, start_n + tl.arange(0, BLOCK_N), offs_d,
                     scale_log2, s_kn, s_kd, s_vn, s_vd, s_bi, N, D, HAS_BIAS, PRECISION, False)
    if TAIL_N > 0:
        dq = _q_tile(dq, q, do, lse, delta, K, V, BIAS, rows, N // BLOCK_N * BLOCK_N + tl.arange(0, TAIL_N),
                     offs_d, scale_log2, s_kn, s_kd, s_vn, s_vd, s_bi, N, D, HAS_BIAS, PRECISION, True)
    _store_rows(DQ, dq * scale, rows, offs_d, s_dqn, s_dqd, N, D, MASK_ROWS)


@triton.autotune(configs=_Q_CONFIGS, key=["N", "D", "HAS_BIAS", "batch_heads"],
                 prune_configs_by={"early_config_prune": _prune_by_arch(_Q_TILES)})
@triton.heuristics(_HEURISTICS)
@triton.jit(do_not_specialize=["batch_heads"])
def _bwd_q_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DELTA, DQ,
    scale, scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_gb, s_gh, s_gn, s_gd,
    s_dqb, s_dqh, s_dqn, s_dqd,
    s_bh, s_bi, batch_heads,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """dQ of one (query block, image, head): the key blocks in turn, the sum in registers; also the
    block's ``delta`` rows (and the zero padding of the last block), which the launches after it read."""
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    OUT += b * s_ob + h * s_oh
    DOUT += b * s_gb + h * s_gh
    DQ += b * s_dqb + h * s_dqh
    LSE += (b * tl.num_programs(2) + h) * P
    DELTA += (b * tl.num_programs(2) + h) * P
    if HAS_BIAS:
        BIAS += h * s_bh
    if TAIL_M == 0 or start_m + BLOCK_M <= N:
        _q_block(Q, K, V, OUT, DOUT, DQ, LSE, DELTA, BIAS, start_m, scale, scale_log2,
                 s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd, s_bi,
                 N, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, TAIL_N, False)
    else:
        _q_block(Q, K, V, OUT, DOUT, DQ, LSE, DELTA, BIAS, start_m, scale, scale_log2,
                 s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd, s_bi,
                 N, D, HAS_BIAS, PRECISION, TAIL_M, BLOCK_N, BLOCK_D, TAIL_N, True)
    if start_m + BLOCK_M >= N:  # the last query block: delta's padding rows
        _fill_rows(DELTA, N // BLOCK_M * BLOCK_M + TAIL_M, P)


@triton.jit
def _bias_tile(
    Q, K, V, DOUT, LSE, DELTA, BIAS, DBIAS, start_m, start_n, first, last, H, scale_log2,
    s_qb, s_qn, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_gb, s_gn, s_gd, s_bi,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
):
    """``dS`` of one ``[ROWS, COLS]`` score tile summed over images ``[first, last)``, written once."""
    rows = start_m + tl.arange(0, ROWS)
    cols = start_n + tl.arange(0, COLS)
    offs_d = tl.arange(0, BLOCK_D)
    bias = tl.load(BIAS + rows[:, None] * s_bi + cols[None, :]).to(tl.float32) * LOG2E
    acc = tl.zeros([ROWS, COLS], tl.float32)
    for b in range(first, last):
        q = _load_rows(Q + b * s_qb, rows, offs_d, s_qn, s_qd, N, D, MASK_ROWS)
        do = _load_rows(DOUT + b * s_gb, rows, offs_d, s_gn, s_gd, N, D, MASK_ROWS)
        k = _load_rows(K + b * s_kb, cols, offs_d, s_kn, s_kd, N, D, MASK_COLS)
        v = _load_rows(V + b * s_vb, cols, offs_d, s_vn, s_vd, N, D, MASK_COLS)
        lse = tl.load(LSE + b * H * P + rows)
        delta = tl.load(DELTA + b * H * P + rows)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc += p * (dp - delta[:, None])
    if MASK_ROWS or MASK_COLS:  # the padding's gradient is zero
        acc = tl.where((rows < N)[:, None] & (cols < N)[None, :], acc, 0.0)
    tl.store(DBIAS + rows[:, None] * P + cols[None, :], acc)


@triton.jit
def _bias_fill(DBIAS, start, ROWS: tl.constexpr, FROM: tl.constexpr, P: tl.constexpr, BY_ROW: tl.constexpr):
    """Zeros in the padding next to a last tile: rows ``[FROM, P)`` under its ``ROWS`` columns
    starting at ``start`` (``BY_ROW``), or columns ``[FROM, P)`` beside its rows."""
    span = tl.arange(0, ROWS)
    for pad in range(FROM, P, 16):
        band = pad + tl.arange(0, 16)
        if BY_ROW:
            tl.store(DBIAS + band[:, None] * P + (start + span)[None, :], tl.zeros([16, ROWS], tl.float32))
        else:
            tl.store(DBIAS + (start + span)[:, None] * P + band[None, :], tl.zeros([ROWS, 16], tl.float32))


@triton.jit
def _bias_tile_rows(
    Q, K, V, DOUT, LSE, DELTA, BIAS, DBIAS, start_m, start_n, first, last, H, scale_log2,
    s_qb, s_qn, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_gb, s_gn, s_gd, s_bi,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
):
    """The tile for ``ROWS`` rows: a full column block or the tail one, and the padding past the last."""
    if TAIL_N == 0 or start_n + BLOCK_N <= N:
        _bias_tile(Q, K, V, DOUT, LSE, DELTA, BIAS, DBIAS, start_m, start_n, first, last, H, scale_log2,
                   s_qb, s_qn, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_gb, s_gn, s_gd, s_bi,
                   N, D, P, PRECISION, ROWS, BLOCK_N, BLOCK_D, MASK_ROWS, False)
    else:
        _bias_tile(Q, K, V, DOUT, LSE, DELTA, BIAS, DBIAS, start_m, start_n, first, last, H, scale_log2,
                   s_qb, s_qn, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_gb, s_gn, s_gd, s_bi,
                   N, D, P, PRECISION, ROWS, TAIL_N, BLOCK_D, MASK_ROWS, True)
    if start_n + BLOCK_N >= N:
        _bias_fill(DBIAS, start_m, ROWS, N // BLOCK_N * BLOCK_N + TAIL_N, P, False)


@triton.jit
def _bwd_bias_kernel(
    Q, K, V, BIAS, DOUT, LSE, DELTA, DBIAS,
    scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    s_bh, s_bi,
    B, GROUP,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """The bias gradient of one (``[BLOCK_M, BLOCK_N]`` score tile, group of GROUP images, head) into
    the group's ``[H, P, P]`` slice; the padding past the last tiles is zeroed by the programs beside
    it."""
    col_blocks = triton.cdiv(N, BLOCK_N)
    start_m = tl.program_id(0) // col_blocks * BLOCK_M
    start_n = tl.program_id(0) % col_blocks * BLOCK_N
    g = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    H = tl.num_programs(2)
    first = g * GROUP
    last = tl.minimum(first + GROUP, B)
    Q += h * s_qh
    K += h * s_kh
    V += h * s_vh
    DOUT += h * s_gh
    LSE += h * P
    DELTA += h * P
    BIAS += h * s_bh
    DBIAS += (g * H + h) * P * P
    if TAIL_M == 0 or start_m + BLOCK_M <= N:
        _bias_tile_rows(Q, K, V, DOUT, LSE, DELTA, BIAS, DBIAS, start_m, start_n, first, last, H, scale_log2,
                        s_qb, s_qn, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_gb, s_gn, s_gd, s_bi,
                        N, D, P, PRECISION, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, False)
    else:
        _bias_tile_rows(Q, K, V, DOUT, LSE, DELTA, BIAS, DBIAS, start_m, start_n, first, last, H, scale_log2,
                        s_qb, s_qn, s_qd, s_kb, s_kn, s_kd, s_vb, s_vn, s_vd, s_gb, s_gn, s_gd, s_bi,
                        N, D, P, PRECISION, TAIL_M, BLOCK_N, TAIL_N, BLOCK_D, True)
    if start_m + BLOCK_M >= N:  # the last row block: the rows under its columns, and the corner
        covered_m = N // BLOCK_M * BLOCK_M + TAIL_M
        if TAIL_N == 0 or start_n + BLOCK_N <= N:
            _bias_fill(DBIAS, start_n, BLOCK_N, covered_m, P, True)
        else:
            _bias_fill(DBIAS, start_n, TAIL_N, covered_m, P, True)
        if start_n + BLOCK_N >= N:
            for corner in range(N // BLOCK_N * BLOCK_N + TAIL_N, P, 16):
                _bias_fill(DBIAS, corner, 16, covered_m, P, True)


# ---------------------------------------------------------------------------------------------------
# launch code (no device checks and no reads of results on the host: the op layer checks the inputs)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products, as PyTorch's fp32 matmul does by default (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_buffer(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer the kernels fully overwrite comes from here (tests poison it with NaN)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _bias_args(bias, dtype, rel_index=None):
    """The dense bias in the compute dtype (gathered from the table ``bias`` when ``rel_index`` is
    given) and its head and row strides, or a dummy without one."""
    if bias is None:
        return None, (0, 0)
    bias = bias.to(dtype) if rel_index is None else gathered(bias, rel_index, dtype)
    return bias, (bias.stride(0), bias.stride(1))


def _batch_heads(B: int, H: int) -> int:
    """``B * H`` rounded up to a power of two, at most 4096: an autotuning key of the three tiled kernels
    (never read by them), so that a batch of one (inference) and a training batch each keep the tile
    that suits their number of programs."""
    return min(triton.next_power_of_2(B * H), 4096)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward(q, k, v, bias, scale, rel_index=None):
    """``out`` (a ``[B, H, N, D]`` view of ``[B, N, H, D]`` storage), the base-2 log-sum-exp
    ``[B, H, P]`` (fp32, rows padded like the bias) and the bias as the kernel read it (in the compute
    dtype)."""
    B, H, N, D = q.shape
    P = padded_size(N)
    out = _new_buffer(q, (B, N, H, D)).transpose(1, 2)
    lse = _new_buffer(q, (B, H, P), torch.float32)
    bias, bias_strides = _bias_args(bias, q.dtype, rel_index)
    _fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B, H)](
        q, k, v, bias, out, lse,
        scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias_strides, _batch_heads(B, H),
        N=N, D=D, P=P,
        HAS_BIAS=bias is not None, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(D),
    )
    return out, lse, bias


def _backward(dout, q, k, v, out, lse, bias, scale):
    """``dqkv`` (``[B, N, 3, H, D]``: dq, dk, dv packed like the model's qkv) and the bias gradient
    (fp32 ``[H, P, P]``, summed over the batch, zero padding; empty without a bias)."""
    B, H, N, D = q.shape
    P = padded_size(N)
    block_d = _block_d(D)
    precision = _precision(q.dtype)
    dqkv = _new_buffer(q, (B, N, 3, H, D))
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))
    delta = _new_buffer(q, (B, H, P), torch.float32)
    bias, bias_strides = _bias_args(bias, q.dtype)
    common = dict(N=N, D=D, P=P, HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_D=block_d)
    # dQ first: it writes delta, which dK/dV and the bias gradient read.
    _bwd_q_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B, H)](
        q, k, v, bias, out, dout, lse, delta, dq, scale, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *dq.stride(), *bias_strides,
        _batch_heads(B, H), **common,
    )
    _bwd_kv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B, H)](
        q, k, v, bias, dout, lse, delta, dk, dv, scale, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), *bias_strides,
        _batch_heads(B, H), **common,
    )
    if bias is None:
        return dqkv, torch.empty(0, device=q.device, dtype=torch.float32)
    tile = bias_tile(q.device)
    groups = bias_groups(B, H, N, _sm_count(q.device), tile)
    group = triton.cdiv(B, groups)
    partial = _new_buffer(q, (groups, H, P, P), torch.float32)
    _bwd_bias_kernel[(bias_tiles(N, tile), groups, H)](
        q, k, v, bias, dout, lse, delta, partial, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *bias_strides, B, group,
        N=N, D=D, P=P, PRECISION=precision, BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_D=block_d,
        TAIL_M=_tail(N, tile[0]), TAIL_N=_tail(N, tile[1]), num_warps=tile[2], num_stages=2,
    )
    # The groups' sums added in a fixed order (no atomics anywhere): deterministic.
    return dqkv, partial[0] if groups == 1 else partial.sum(0)


# ---------------------------------------------------------------------------------------------------
# torch.library registration and autograd


def _fake_out(q, bias, rel_index):
    B, H, N, D = q.shape
    P = padded_size(N)
    read = q.new_empty(0)
    if rel_index is not None:
        read = q.new_empty(bias.shape[1], P, P)
    elif _casts(q, bias, None):
        read = torch.empty_like(bias, dtype=q.dtype)
    return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty(B, H, P, dtype=torch.float32), read


def _casts(q, bias, rel_index) -> bool:
    """Whether the forward reads a copy of ``bias`` made for it: gathered from a table, or a dense fp32
    bias cast for 16-bit q, k, v."""
    return bias is not None and (rel_index is not None or bias.dtype != q.dtype)


def _fwd_outputs(q, bias, rel_index, out, lse, read):
    """The op's outputs: the copy of the bias the forward made is returned (the backward reads it: one
    gather or cast per layer, and the fp32 bias need not be kept), else an empty tensor (an output may
    not alias an input)."""
    return out, lse, read if _casts(q, bias, rel_index) else q.new_empty(0)


@torch.library.custom_op("beitfast::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
    rel_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output (``[B, H, N, D]``, stored ``[B, N, H, D]``), the base-2 row log-sum-exp, and the dense
    bias in q's dtype when the op made it (else empty), for the backward. With ``rel_index``, ``bias``
    is the ``[R, H]`` table, gathered here straight into q's dtype."""
    return _fwd_outputs(q, bias, rel_index, *_forward(q, k, v, bias, scale, rel_index))


@attention_fwd.register_fake
def _(q, k, v, bias, scale, rel_index=None):
    return _fake_out(q, bias, rel_index)


def _unpack(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("beitfast::attention_packed_fwd", mutates_args=())
def attention_packed_fwd(
    qkv: torch.Tensor, bias: torch.Tensor | None, scale: float, rel_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_fwd` of the q, k, v packed in ``qkv`` ``[B, N, 3, H, D]`` (any strides)."""
    return _fwd_outputs(qkv, bias, rel_index, *_forward(*_unpack(qkv), bias, scale, rel_index))


@attention_packed_fwd.register_fake
def _(qkv, bias, scale, rel_index=None):
    return _fake_out(_unpack(qkv)[0], bias, rel_index)


@torch.library.custom_op("beitfast::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dqkv`` ``[B, N, 3, H, D]`` and the fp32 bias gradient ``[H, P, P]`` (empty without a bias)."""
    return _backward(dout, q, k, v, out, lse, bias, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias, scale):
    B, H, N, D = q.shape
    dbias = q.new_empty(bias.shape[0], padded_size(N), padded_size(N), dtype=torch.float32) if bias is not None \
        else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(B, N, 3, H, D), dbias


def _save(ctx, tensors, bias, output, scale, rel_index):
    """Saves the inputs, the output and the log-sum-exp, and the bias the forward read (the copy it
    made when there is one), so the backward reads the same values without gathering or casting again;
    with a table, its index for the fold."""
    read = output[2] if _casts(output[0], bias, rel_index) else bias
    ctx.save_for_backward(*tensors, output[0], output[1], read, rel_index)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.table_rows = None if rel_index is None else bias.shape[0]
    ctx.scale = scale


def _bias_grad(ctx, dbias, rel_index):
    """The fp32 score gradient as the bias's gradient: folded into the table's rows for a table."""
    if ctx.bias_dtype is None:
        return None
    if ctx.table_rows is not None:
        dbias = fold_bias_grad(dbias, rel_index, ctx.table_rows)
    return dbias.to(ctx.bias_dtype)


def _setup_context(ctx, inputs, output):
    *qkv, bias, scale, rel_index = inputs
    _save(ctx, qkv, bias, output, scale, rel_index)


def _backward_rule(ctx, dout, _dlse, _dbias_read):
    q, k, v, out, lse, bias, rel_index = ctx.saved_tensors
    dqkv, dbias = attention_bwd(dout, q, k, v, out, lse, bias, ctx.scale)
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))
    return dq, dk, dv, _bias_grad(ctx, dbias, rel_index), None, None


def _setup_packed_context(ctx, inputs, output):
    qkv, bias, scale, rel_index = inputs
    _save(ctx, (qkv,), bias, output, scale, rel_index)


def _packed_backward_rule(ctx, dout, _dlse, _dbias_read):
    qkv, out, lse, bias, rel_index = ctx.saved_tensors
    dqkv, dbias = attention_bwd(dout, *_unpack(qkv), out, lse, bias, ctx.scale)
    return dqkv, _bias_grad(ctx, dbias, rel_index), None, None


attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)
attention_packed_fwd.register_autograd(_packed_backward_rule, setup_context=_setup_packed_context)


def _autocast(*tensors):
    """Under autocast q, k and v run in the autocast dtype, as autocast does for PyTorch's own
    attention. The bias stays fp32 outside the op (the launchers cast it for the kernels), so its
    gradient is an fp32 sum."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _padded_bias(bias, N):
    """The bias in the layout the kernels read: ``[H, P, P]`` with unit column stride; a smaller or
    differently laid out one is copied into zero padding (differentiably)."""
    if bias is None:
        return None
    P = padded_size(N)
    if tuple(bias.shape[1:]) == (P, P) and bias.stride(-1) == 1 and bias.dtype == torch.float32:
        return bias
    bias = bias[:, :N, :N].float()
    return torch.nn.functional.pad(bias, (0, P - N, 0, P - N))


def attention(q, k, v, bias, scale: float, rel_index=None) -> torch.Tensor:
    """Differentiable attention of ``[B, H, N, D]`` q, k, v with a dense bias ``[H, >=N, >=N]`` (or
    None), or with ``rel_index`` the ``[R, H]`` table ``bias`` (gathered straight into the compute
    dtype, its gradient folded in fp32); inputs already validated; returns ``[B, H, N, D]`` (a view
    of ``[B, N, H, D]`` storage)."""
    q, k, v = _autocast(q, k, v)
    if rel_index is None:
        bias = _padded_bias(bias, q.shape[2])
    return attention_fwd(q, k, v, bias, scale, rel_index)[0]


def attention_packed(qkv, bias, scale: float, rel_index=None) -> torch.Tensor:
    """:func:`attention` of a packed ``[B, N, 3, H, D]`` qkv; returns ``[B, N, H, D]`` (contiguous),
    and the gradient of ``qkv`` comes back packed."""
    (qkv,) = _autocast(qkv)
    if rel_index is None:
        bias = _padded_bias(bias, qkv.shape[1])
    out = attention_packed_fwd(qkv, bias, scale, rel_index)[0]
    return out.transpose(1, 2)
