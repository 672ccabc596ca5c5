"""Flash attention with a dense additive bias for BEiT's short sequences, forward and backward, in Triton.

``out = softmax(q k^T * scale + bias[h, :N, :N]) v``. The bias is BEiT's relative position bias already
gathered from its table (``beitfast.ops.relative_position_bias``): a dense fp32 ``[H, P, P]`` tensor
padded to ``P = padded_size(N)`` (a multiple of the largest tile), identical for every image, about
3 MB at BEiT-B, so it stays in L2. The kernels read it as affine tiles without bounds masks and never
see the relative-position index.

* N and the head dim are compile-time constants (one compile per sequence length). A sequence is cut
  into full tiles, read without masks, and one tail tile of the smallest power of two >= 16 that
  covers the rest, the only tile that masks: at N = 197, 64-wide tiles execute 208 rows, not 256.
* forward: one program per (image, head) walks every query block; online softmax in fp32, base 2;
  saves the row log-sum-exp (base 2) for the backward.
* backward: one pass, one program per (head, group of images): for each image it computes
  ``delta = rowsum(dO * O)``, then for each key block and each query block rebuilds ``P`` once and runs
  five matmuls (``S = Q K^T``, ``dV += P^T dO``, ``dP = dO V^T``, ``dK += dS^T Q``, ``dQ += dS K``).
  dQ and the score gradient ``dS`` are summed in scratch rows that belong to the program alone, so
  there are no atomics: ``dS`` is summed over the group's images in place and the groups' partial sums
  are added in a fixed order by the launcher. For a given tile configuration, results repeat bit
  for bit.

q, k and v are read through their strides (the model's packed ``[B, N, 3, H, D]`` qkv needs no copy);
the output is written ``[B, N, H, D]`` (returned as a ``[B, H, N, D]`` view, so the projection reads
it without a copy); the backward writes dq, dk and dv packed as one ``[B, N, 3, H, D]`` tensor, the
gradient of the model's qkv.

Ops: ``beitfast::attention_fwd`` / ``beitfast::attention_packed_fwd`` (q, k, v apart or packed) and
``beitfast::attention_bwd``, registered with ``torch.library`` so ``torch.compile`` keeps each as one
node. Entry points: :func:`attention` and :func:`attention_packed`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.attention import padded_size

__all__ = ["attention", "attention_packed", "group_size"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The backward sums the score gradient over at most this many groups of images (one scratch
# [H, P, P] fp32 slice each, all under _SCRATCH_BYTES): more groups spread the work, fewer use less
# memory and traffic.
_MAX_GROUPS = 16
_SCRATCH_BYTES = 1 << 26


def group_size(batch: int, heads: int, padded: int) -> int:
    """Images per backward program."""
    groups = max(1, min(batch, _MAX_GROUPS, _SCRATCH_BYTES // (heads * padded * padded * 4)))
    return triton.cdiv(batch, groups)


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


def _prune(configs, named_args, **kwargs):
    """Candidates that fit: fp32 inputs and head dims above 64 keep the tiles up to 64 x 64 (bigger
    ones spill or overflow shared memory)."""
    if len(configs) == 1:
        return configs
    wide = named_args["Q"].element_size() == 4 or kwargs.get("BLOCK_D", 64) > 64
    keep = [c for c in configs if not wide or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return keep or configs


# 32 x 64 with 4 warps left an 8-byte stack frame without a bias on sm_90 with triton 3.6 (compile gate).
_FWD_TILES = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)]
_FWD_CONFIGS = _tile_configs(_FWD_TILES)
# The backward keeps more live than the forward (dK, dV, k, v, five score-sized tiles, the scratch
# updates): at D = 64 only 16-row tiles compile without spills on sm_90 with and without a bias
# (compile gate; 32 x 32 and larger spill with 4 or 8 warps, 32 x 16 without a bias).
_BWD_TILES = [(16, 64, 4, 1), (16, 32, 4, 1)]
_BWD_CONFIGS = _tile_configs(_BWD_TILES)
_HEURISTICS = {
    "TAIL_M": lambda args: _tail(args["N"], args["BLOCK_M"]),
    "TAIL_N": lambda args: _tail(args["N"], args["BLOCK_N"]),
}


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
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
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
    _store_rows(OUT, acc / l_i[:, None], rows, offs_d, s_on, s_od, N, D, MASK_ROWS)
    # LSE rows are padded like the bias: the tail's extra rows are written too, never read as valid.
    tl.store(LSE + rows, m_i + tl.log2(l_i))


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "D", "HAS_BIAS"], prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(_HEURISTICS)
@triton.jit
def _fwd_kernel(
    Q, K, V, BIAS, OUT, LSE,
    scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_bh, s_bi,
    H,
    N: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """One program per (image, head): every query block of the sequence."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    OUT += b * s_ob + h * s_oh
    if HAS_BIAS:
        BIAS += h * s_bh
    LSE += pid.to(tl.int64) * P
    for start_m in range(0, N // BLOCK_M * BLOCK_M, BLOCK_M):
        _fwd_query_block(
            Q, K, V, BIAS, OUT, LSE, start_m, scale_log2,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_bi,
            N, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, TAIL_N, False,
        )
    if TAIL_M > 0:
        _fwd_query_block(
            Q, K, V, BIAS, OUT, LSE, N // BLOCK_M * BLOCK_M, scale_log2,
            s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_on, s_od, s_bi,
            N, D, HAS_BIAS, PRECISION, TAIL_M, BLOCK_N, BLOCK_D, TAIL_N, True,
        )
    # The padding rows no tile covers: defined values, so the output is a function of the inputs.
    for start in range(N // BLOCK_M * BLOCK_M + TAIL_M, P, 16):
        tl.store(LSE + start + tl.arange(0, 16), tl.zeros([16], tl.float32))


@triton.jit
def _bwd_tile(
    dk, dv, k, v, Q, DOUT, LSE, DELTA, DQ_ACC, BIAS, DBIAS, rows, cols, offs_d, scale_log2,
    s_qn, s_qd, s_gn, s_gd, s_bi, P,
    N: tl.constexpr, D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
):
    """One (query block, key block) tile of one image: P rebuilt once, five matmuls; dQ and the score
    gradient are added into this program's own scratch rows (no other program touches them)."""
    q = _load_rows(Q, rows, offs_d, s_qn, s_qd, N, D, MASK_ROWS)
    do = _load_rows(DOUT, rows, offs_d, s_gn, s_gd, N, D, MASK_ROWS)
    lse = tl.load(LSE + rows)
    delta = tl.load(DELTA + rows)
    # Transposed tiles (rows are keys): only dS^T is transposed in registers, for dQ.
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
    dq_ptrs = DQ_ACC + rows[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(dq_ptrs, tl.load(dq_ptrs) + tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION))
    if HAS_BIAS:
        ds_ptrs = DBIAS + rows[None, :] * P + cols[:, None]
        tl.store(ds_ptrs, tl.load(ds_ptrs) + ds_t)
    return dk, dv


@triton.jit
def _bwd_key_block(
    Q, K, V, DOUT, DK, DV, LSE, DELTA, DQ_ACC, BIAS, DBIAS, start_n, scale, scale_log2,
    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_dkn, s_dkd, s_dvn, s_dvd, s_bi, P,
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
    # The last iteration takes the tail tile (masked, narrower).
    for start_m in range(0, N, BLOCK_M):
        if TAIL_M == 0 or start_m + BLOCK_M <= N:
            dk, dv = _bwd_tile(
                dk, dv, k, v, Q, DOUT, LSE, DELTA, DQ_ACC, BIAS, DBIAS, start_m + tl.arange(0, BLOCK_M), cols,
                offs_d, scale_log2, s_qn, s_qd, s_gn, s_gd, s_bi, P, N, D, HAS_BIAS, PRECISION, BLOCK_D, False,
                MASK_COLS,
            )
        else:
            dk, dv = _bwd_tile(
                dk, dv, k, v, Q, DOUT, LSE, DELTA, DQ_ACC, BIAS, DBIAS, start_m + tl.arange(0, TAIL_M), cols,
                offs_d, scale_log2, s_qn, s_qd, s_gn, s_gd, s_bi, P, N, D, HAS_BIAS, PRECISION, BLOCK_D, True,
                MASK_COLS,
            )
    _store_rows(DK, dk * scale, cols, offs_d, s_dkn, s_dkd, N, D, MASK_COLS)
    _store_rows(DV, dv, cols, offs_d, s_dvn, s_dvd, N, D, MASK_COLS)


@triton.jit
def _bwd_rows(
    OUT, DOUT, DQ, DELTA, DQ_ACC, rows, scale, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd,
    N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, FINISH: tl.constexpr,
):
    """Before the key blocks: ``delta = rowsum(dO * O)`` and a zeroed dQ sum; after: dQ out."""
    offs_d = tl.arange(0, BLOCK_D)
    acc_ptrs = DQ_ACC + rows[:, None] * BLOCK_D + offs_d[None, :]
    if FINISH:
        _store_rows(DQ, tl.load(acc_ptrs) * scale, rows, offs_d, s_dqn, s_dqd, N, D, MASK_ROWS)
    else:
        do = _load_rows(DOUT, rows, offs_d, s_gn, s_gd, N, D, MASK_ROWS).to(tl.float32)
        o = _load_rows(OUT, rows, offs_d, s_on, s_od, N, D, MASK_ROWS).to(tl.float32)
        tl.store(DELTA + rows, tl.sum(do * o, 1))
        tl.store(acc_ptrs, tl.zeros([rows.shape[0], BLOCK_D], tl.float32))


@triton.jit
def _bwd_all_rows(
    OUT, DOUT, DQ, DELTA, DQ_ACC, scale, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd,
    N: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_M: tl.constexpr,
    FINISH: tl.constexpr,
):
    for start_m in range(0, N // BLOCK_M * BLOCK_M, BLOCK_M):
        _bwd_rows(OUT, DOUT, DQ, DELTA, DQ_ACC, start_m + tl.arange(0, BLOCK_M), scale, s_on, s_od, s_gn, s_gd,
                  s_dqn, s_dqd, N, D, BLOCK_D, False, FINISH)
    if TAIL_M > 0:
        _bwd_rows(OUT, DOUT, DQ, DELTA, DQ_ACC, N // BLOCK_M * BLOCK_M + tl.arange(0, TAIL_M), scale, s_on, s_od,
                  s_gn, s_gd, s_dqn, s_dqd, N, D, BLOCK_D, True, FINISH)
    # The next pass reads what this one wrote, possibly from other threads of the program.
    tl.debug_barrier()


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "D", "HAS_BIAS"], prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["DBIAS"])
@triton.heuristics(_HEURISTICS)
@triton.jit
def _bwd_kernel(
    Q, K, V, BIAS, OUT, DOUT, LSE, DQ, DK, DV, DELTA, DQ_ACC, DBIAS,
    scale, scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_gb, s_gh, s_gn, s_gd,
    s_dqb, s_dqh, s_dqn, s_dqd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    s_bh, s_bi,
    B, H, P, GROUP,
    N: tl.constexpr, D: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
):
    """One program per (head, group of GROUP images). Scratch of its own: DELTA and DQ_ACC rows (one
    image at a time) and the ``[P, P]`` slice of DBIAS where the group's score gradients add up."""
    h = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    slot = g * H + h
    DELTA += slot * P
    DQ_ACC += slot * P * BLOCK_D
    DBIAS += slot * P * P
    if HAS_BIAS:
        BIAS += h * s_bh
    # g is int64, so the image index and its offsets are too (large batches).
    for b in range(g * GROUP, tl.minimum(g * GROUP + GROUP, B)):
        q, k, v = Q + b * s_qb + h * s_qh, K + b * s_kb + h * s_kh, V + b * s_vb + h * s_vh
        out, dout, lse = OUT + b * s_ob + h * s_oh, DOUT + b * s_gb + h * s_gh, LSE + (b * H + h) * P
        dq, dk, dv = DQ + b * s_dqb + h * s_dqh, DK + b * s_dkb + h * s_dkh, DV + b * s_dvb + h * s_dvh
        _bwd_all_rows(out, dout, dq, DELTA, DQ_ACC, scale, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd,
                      N, D, BLOCK_M, BLOCK_D, TAIL_M, False)
        for start_n in range(0, N, BLOCK_N):
            if TAIL_N == 0 or start_n + BLOCK_N <= N:
                _bwd_key_block(
                    q, k, v, dout, dk, dv, lse, DELTA, DQ_ACC, BIAS, DBIAS, start_n, scale, scale_log2,
                    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_dkn, s_dkd, s_dvn, s_dvd, s_bi, P,
                    N, D, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, TAIL_M, False,
                )
            else:
                _bwd_key_block(
                    q, k, v, dout, dk, dv, lse, DELTA, DQ_ACC, BIAS, DBIAS, start_n, scale, scale_log2,
                    s_qn, s_qd, s_kn, s_kd, s_vn, s_vd, s_gn, s_gd, s_dkn, s_dkd, s_dvn, s_dvd, s_bi, P,
                    N, D, HAS_BIAS, PRECISION, BLOCK_M, TAIL_N, BLOCK_D, TAIL_M, True,
                )
        tl.debug_barrier()
        _bwd_all_rows(out, dout, dq, DELTA, DQ_ACC, scale, s_on, s_od, s_gn, s_gd, s_dqn, s_dqd,
                      N, D, BLOCK_M, BLOCK_D, TAIL_M, True)


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


def _bias_args(bias):
    """The bias and its head and row strides, or a dummy without one."""
    if bias is None:
        return None, (0, 0)
    return bias, (bias.stride(0), bias.stride(1))


def _forward(q, k, v, bias, scale):
    """``out`` (a ``[B, H, N, D]`` view of ``[B, N, H, D]`` storage) and the base-2 log-sum-exp
    ``[B, H, P]`` (fp32, rows padded like the bias)."""
    B, H, N, D = q.shape
    P = padded_size(N)
    out = _new_buffer(q, (B, N, H, D)).transpose(1, 2)
    lse = _new_buffer(q, (B, H, P), torch.float32)
    bias, bias_strides = _bias_args(bias)
    _fwd_kernel[(B * H,)](
        q, k, v, bias, out, lse,
        scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias_strides,
        H, N=N, D=D, P=P,
        HAS_BIAS=bias is not None, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(D),
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, bias, scale):
    """``dqkv`` (``[B, N, 3, H, D]``: dq, dk, dv packed like the model's qkv) and the bias gradient
    (fp32 ``[H, P, P]``, summed over the batch; empty without a bias)."""
    B, H, N, D = q.shape
    P = padded_size(N)
    group = group_size(B, H, P)
    groups = triton.cdiv(B, group)
    block_d = _block_d(D)
    dqkv = _new_buffer(q, (B, N, 3, H, D))
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))
    delta = _new_buffer(q, (groups * H, P), torch.float32)
    dq_sum = _new_buffer(q, (groups * H, P, block_d), torch.float32)
    # Each group's score-gradient sum starts at zero; the groups are added in a fixed order below.
    partial = torch.zeros((groups, H, P, P) if bias is not None else (0,), device=q.device, dtype=torch.float32)
    bias, bias_strides = _bias_args(bias)
    _bwd_kernel[(H, groups)](
        q, k, v, bias, out, dout, lse, dq, dk, dv, delta, dq_sum, partial,
        scale, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(), *bias_strides,
        B, H, P, group, N=N, D=D,
        HAS_BIAS=bias is not None, PRECISION=_precision(q.dtype), BLOCK_D=block_d,
    )
    return dqkv, partial.sum(0) if bias is not None else partial


# ---------------------------------------------------------------------------------------------------
# torch.library registration and autograd


def _fake_out(q):
    B, H, N, D = q.shape
    return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty(B, H, padded_size(N), dtype=torch.float32)


@torch.library.custom_op("beitfast::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (``[B, H, N, D]``, stored ``[B, N, H, D]``) and the base-2 row log-sum-exp."""
    return _forward(q, k, v, bias, scale)


@attention_fwd.register_fake
def _(q, k, v, bias, scale):
    return _fake_out(q)


def _unpack(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("beitfast::attention_packed_fwd", mutates_args=())
def attention_packed_fwd(qkv: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_fwd` of the q, k, v packed in ``qkv`` ``[B, N, 3, H, D]`` (any strides)."""
    return _forward(*_unpack(qkv), bias, scale)


@attention_packed_fwd.register_fake
def _(qkv, bias, scale):
    return _fake_out(_unpack(qkv)[0])


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


def _bias_grad(bias, dbias):
    return None if bias is None else dbias.to(bias.dtype)


def _setup_context(ctx, inputs, output):
    *qkv, bias, scale = inputs
    ctx.save_for_backward(*qkv, output[0], output[1], bias)
    ctx.scale = scale


def _backward_rule(ctx, dout, _dlse):
    q, k, v, out, lse, bias = ctx.saved_tensors
    dqkv, dbias = attention_bwd(dout, q, k, v, out, lse, bias, ctx.scale)
    dq, dk, dv = (dqkv[:, :, i].transpose(1, 2) for i in range(3))
    return dq, dk, dv, _bias_grad(bias, dbias), None


def _setup_packed_context(ctx, inputs, output):
    qkv, bias, scale = inputs
    ctx.save_for_backward(qkv, output[0], output[1], bias)
    ctx.scale = scale


def _packed_backward_rule(ctx, dout, _dlse):
    qkv, out, lse, bias = ctx.saved_tensors
    dqkv, dbias = attention_bwd(dout, *_unpack(qkv), out, lse, bias, ctx.scale)
    return dqkv, _bias_grad(bias, dbias), None


attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)
attention_packed_fwd.register_autograd(_packed_backward_rule, setup_context=_setup_packed_context)


def _autocast(*tensors):
    """Under autocast q, k and v run in the autocast dtype (the bias stays as it is: the kernels
    read it in fp32), as autocast does for PyTorch's own attention."""
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


def attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """Differentiable attention of ``[B, H, N, D]`` q, k, v with a dense bias ``[H, >=N, >=N]`` (or
    None), inputs already validated; returns ``[B, H, N, D]`` (a view of ``[B, N, H, D]`` storage)."""
    q, k, v = _autocast(q, k, v)
    return attention_fwd(q, k, v, _padded_bias(bias, q.shape[2]), scale)[0]


def attention_packed(qkv, bias, scale: float) -> torch.Tensor:
    """:func:`attention` of a packed ``[B, N, 3, H, D]`` qkv; returns ``[B, N, H, D]`` (contiguous),
    and the gradient of ``qkv`` comes back packed."""
    (qkv,) = _autocast(qkv)
    out = attention_packed_fwd(qkv, _padded_bias(bias, qkv.shape[1]), scale)[0]
    return out.transpose(1, 2)
