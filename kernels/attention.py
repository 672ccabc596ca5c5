"""Flash attention with BEiT's learnable relative position bias, forward and backward, in Triton.

``out = softmax(q k^T * scale + B) v`` with ``B[h, i, j] = bias_table[rel_index[i, j], h]``. The kernels
gather the bias from the table tile by tile, so no ``[B, H, N, N]`` tensor ever exists:

* forward: one program per (query block, batch*head), online softmax in fp32 (base 2), saves the
  row log-sum-exp (base 2) for the backward;
* backward: ``_bwd_dq_kernel`` (per query block: ``delta = rowsum(dO * O)`` and ``dq``), then
  ``_bwd_dkdv_kernel`` (per key block: ``dk``, ``dv``; in the default mode it also adds the score
  gradient ``dS`` into an fp32 ``[H, N, N]`` buffer with atomics, summing over the batch);
* deterministic mode (``BEITFAST_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms``):
  ``_bwd_dbias_kernel`` owns one (query block, key block, head) tile, recomputes ``P`` and ``dP`` for
  every batch element and sums ``dS`` in registers in a fixed order. Instead of the atomics it costs
  a third pass over q, k, v and dO and two more tile matmuls (``QK^T``, ``dO V^T``) on top of the
  seven of the dq and dk/dv kernels, i.e. roughly 2/7 more backward matmul work, with only
  ``blocks^2 * H`` programs (no batch axis) to spread it;
* ``_segment_sum_kernel`` folds the ``[H, N, N]`` buffer into the ``[R, H]`` table gradient by
  summing the entries that share an index, in a fixed order (positions sorted by index).

q, k, v, the output gradient and the table are read through their strides: the model's
``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` views need no copy.

The op is registered as ``beitfast::rel_pos_attention_fwd`` / ``beitfast::rel_pos_attention_bwd`` so
``torch.compile`` keeps it as one node; :func:`rel_pos_attention` is the differentiable entry point.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["rel_pos_attention", "deterministic_mode"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def deterministic_mode() -> bool:
    """Whether the bias-table gradient uses the deterministic (atomic-free) reduction."""
    return os.environ.get("BEITFAST_DETERMINISTIC") == "1" or torch.are_deterministic_algorithms_enabled()


def _tile_configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates on a GPU; one small config under the
    interpreter, where autotuning cannot time anything."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes
    ]


def _prune_by_head_dim_and_dtype(configs, named_args, **kwargs):
    """Candidates that fit: fp32 inputs with D = 128 keep only tiles up to 64 x 64 (bigger ones
    overflow shared memory); 16-bit inputs with small D skip the narrowest tiles."""
    if len(configs) == 1:
        return configs
    block_d, wide = kwargs.get("BLOCK_D", 64), named_args["Q"].element_size() == 4
    if wide and block_d >= 128:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    elif not wide and block_d <= 64:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 64 * 32]
    else:
        keep = configs
    return keep or configs


_FWD_CONFIGS = _tile_configs(
    [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 32, 4, 3)]
)
_BWD_CONFIGS = _tile_configs(
    [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 3), (64, 64, 8, 2)]
)
_TUNE_KEY = ["N", "BLOCK_D", "HAS_BIAS"]
_PRUNE = {"early_config_prune": _prune_by_head_dim_and_dtype}


@triton.jit
def _bias_tile_log2(table_ptr, index_ptr, h, offs_i, offs_j, N, s_ir, s_ic, s_tr, s_th):
    """``bias_table[rel_index[i, j], h]`` in fp32 base-2 units (times log2 e) for a tile; 0 outside
    ``[0, N)^2``."""
    inside = (offs_i < N) & (offs_j < N)
    idx = tl.load(index_ptr + offs_i * s_ir + offs_j * s_ic, mask=inside, other=0)
    return tl.load(table_ptr + idx * s_tr + h * s_th, mask=inside, other=0.0).to(tl.float32) * LOG2E


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _fwd_kernel(
    Q, K, V, TABLE, INDEX, OUT, LSE,
    scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_ir, s_ic, s_tr, s_th,
    H, N, D,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_t = tl.load(
            k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=mask_n[None, :] & mask_d[:, None], other=0.0,
        )
        # Scores in base-2 units: exp2 is the cheap exponential.
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2
        if HAS_BIAS:
            s += _bias_tile_log2(TABLE, INDEX, h, offs_m[:, None], offs_n[None, :], N, s_ir, s_ic, s_tr, s_th)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
        acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, TABLE, INDEX, OUT, DOUT, LSE, DELTA, DQ,
    scale, scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    s_gb, s_gh, s_gn, s_gd,
    s_ir, s_ic, s_tr, s_th,
    H, N, D,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for one query block; also stores ``delta = rowsum(dO * O)``, which the dk/dv pass reads."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_md = mask_m[:, None] & (offs_d < D)[None, :]
    rows, cols = offs_m[:, None], offs_d[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + rows * s_qn + cols * s_qd, mask=mask_md, other=0.0)
    do = tl.load(DOUT + b * s_gb + h * s_gh + rows * s_gn + cols * s_gd, mask=mask_md, other=0.0)
    o = tl.load(OUT + b * s_ob + h * s_oh + rows * s_on + cols * s_od, mask=mask_md, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * N + offs_m
    tl.store(DELTA + row, delta, mask=mask_m)
    lse = tl.load(LSE + row, mask=mask_m, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_nd = (offs_n < N)[:, None] & (offs_d < D)[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=mask_nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_BIAS:
            s += _bias_tile_log2(TABLE, INDEX, h, offs_m[:, None], offs_n[None, :], N, s_ir, s_ic, s_tr, s_th)
        p = tl.where((offs_n < N)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + pid_bh.to(tl.int64) * N * D + rows * D + cols, acc * scale, mask=mask_md)


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE, reset_to_zero=["DBIAS"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, TABLE, INDEX, DOUT, LSE, DELTA, DK, DV, DBIAS,
    scale, scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    s_ir, s_ic, s_tr, s_th,
    H, N, D,
    HAS_BIAS: tl.constexpr, ATOMIC_DBIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv for one key block (transposed tiles: rows are keys); with ATOMIC_DBIAS also adds
    ``dS^T`` into the ``[H, N, N]`` fp32 buffer DBIAS."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & (offs_d < D)[None, :]
    rows, cols = offs_n[:, None], offs_d[None, :]
    k = tl.load(K + b * s_kb + h * s_kh + rows * s_kn + cols * s_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + rows * s_vn + cols * s_vd, mask=mask_nd, other=0.0)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DOUT + b * s_gb + h * s_gh
    row_base = pid_bh.to(tl.int64) * N

    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        mask_md = mask_m[:, None] & (offs_d < D)[None, :]
        q = tl.load(q_base + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd, mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd, mask=mask_md, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2
        if HAS_BIAS:
            s_t += _bias_tile_log2(
                TABLE, INDEX, h, offs_m[None, :], offs_n[:, None], N, s_ir, s_ic, s_tr, s_th
            )
        p_t = tl.where(mask_m[None, :] & mask_n[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        acc_dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        acc_dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if ATOMIC_DBIAS:
            tl.atomic_add(
                DBIAS + h * N * N + offs_m[None, :] * N + offs_n[:, None], ds_t,
                mask=mask_m[None, :] & mask_n[:, None], sem="relaxed",
            )

    out = pid_bh.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, acc_dk * scale, mask=mask_nd)
    tl.store(DV + out, acc_dv, mask=mask_nd)


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "BLOCK_D"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dbias_kernel(
    Q, K, V, TABLE, INDEX, DOUT, LSE, DELTA, DBIAS,
    scale_log2,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gn, s_gd,
    s_ir, s_ic, s_tr, s_th,
    B, H, N, D,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic ``sum_b dS[b, h]`` for one (query block, key block, head) tile of DBIAS."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_n = offs_n < N
    mask_md = mask_m[:, None] & (offs_d < D)[None, :]
    mask_nd = mask_n[:, None] & (offs_d < D)[None, :]
    bias = _bias_tile_log2(TABLE, INDEX, h, offs_m[:, None], offs_n[None, :], N, s_ir, s_ic, s_tr, s_th)

    q_ptrs = Q + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd
    do_ptrs = DOUT + h * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd
    k_ptrs = K + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    v_ptrs = V + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd
    row_ptrs = h * N + offs_m
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, B):
        q = tl.load(q_ptrs, mask=mask_md, other=0.0)
        do = tl.load(do_ptrs, mask=mask_md, other=0.0)
        k = tl.load(k_ptrs, mask=mask_nd, other=0.0)
        v = tl.load(v_ptrs, mask=mask_nd, other=0.0)
        lse = tl.load(LSE + row_ptrs, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_ptrs, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2 + bias
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc += p * (dp - delta[:, None])
        # Advancing pointers (64-bit) rather than b * stride keeps large batches from overflowing.
        q_ptrs += s_qb
        do_ptrs += s_gb
        k_ptrs += s_kb
        v_ptrs += s_vb
        LSE += H * N
        DELTA += H * N

    tl.store(
        DBIAS + h * N * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :]
    )


@triton.jit
def _segment_sum_kernel(
    DENSE, ORDER, STARTS, DTABLE, NN, H, s_tr, s_th,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``dtable[r, :] = sum of DENSE[:, p]`` over the flat positions ``p`` whose index is ``r``:
    ``ORDER[STARTS[r]:STARTS[r + 1]]``, summed in that (fixed) order."""
    r = tl.program_id(0)
    start = tl.load(STARTS + r)
    end = tl.load(STARTS + r + 1)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    acc = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
    for first in range(start, end, BLOCK_S):
        offs = first + tl.arange(0, BLOCK_S)
        mask = offs < end
        pos = tl.load(ORDER + offs, mask=mask, other=0)
        in_segment = mask[:, None] & mask_h[None, :]
        acc += tl.load(DENSE + offs_h[None, :] * NN + pos[:, None], mask=in_segment, other=0.0)
    total = tl.sum(acc, 0)
    tl.store(DTABLE + r * s_tr + offs_h * s_th, total.to(DTABLE.dtype.element_ty), mask=mask_h)


# ---------------------------------------------------------------------------------------------------
# launch code


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products, as PyTorch's fp32 matmul does by default (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_buffer(like: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer the kernels fully overwrite comes from here (tests poison it with NaN)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


def _bias_args(bias_table, rel_index):
    """Pointers and strides of the table and index, or dummies when there is no bias."""
    if bias_table is None:
        return None, None, (0, 0, 0, 0)
    return bias_table, rel_index, (*rel_index.stride(), *bias_table.stride())


def _forward(q, k, v, bias_table, rel_index, scale):
    B, H, N, D = q.shape
    out = _new_buffer(q, (B, H, N, D))
    lse = _new_buffer(q, (B, H, N), torch.float32)
    table, index, bias_strides = _bias_args(bias_table, rel_index)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, table, index, out, lse,
        scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *bias_strides,
        H, N, D,
        HAS_BIAS=bias_table is not None, PRECISION=_precision(q.dtype), BLOCK_D=_block_d(D),
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, bias_table, rel_index, scale, deterministic):
    B, H, N, D = q.shape
    has_bias = bias_table is not None
    table, index, bias_strides = _bias_args(bias_table, rel_index)
    tile = dict(PRECISION=_precision(q.dtype), BLOCK_D=_block_d(D))
    dq, dk, dv = (_new_buffer(q, (B, H, N, D)) for _ in range(3))
    delta = _new_buffer(q, (B, H, N), torch.float32)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, table, index, out, dout, lse, delta, dq,
        scale, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *dout.stride(), *bias_strides,
        H, N, D, HAS_BIAS=has_bias, **tile,
    )
    atomic = has_bias and not deterministic
    # Autotuning zeroes this buffer between trials; without atomics it is an empty placeholder.
    dense = torch.zeros(H, N, N if atomic else 0, device=q.device, dtype=torch.float32)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, table, index, dout, lse, delta, dk, dv, dense,
        scale, scale * LOG2E.value,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *bias_strides,
        H, N, D, HAS_BIAS=has_bias, ATOMIC_DBIAS=atomic, **tile,
    )
    if not has_bias:
        return dq, dk, dv, q.new_empty(0)
    if deterministic:
        dense = _new_buffer(q, (H, N, N), torch.float32)
        _bwd_dbias_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), H)](
            q, k, v, table, index, dout, lse, delta, dense,
            scale * LOG2E.value,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *bias_strides,
            B, H, N, D, **tile,
        )
    return dq, dk, dv, _fold_into_table(dense, bias_table, rel_index)


def _fold_into_table(dense, bias_table, rel_index):
    """Sum the ``[H, N, N]`` score gradient into ``[R, H]`` by index, deterministically."""
    R, H = bias_table.shape
    flat = rel_index.reshape(-1)
    sorted_index, order = torch.sort(flat, stable=True)
    # starts[r] = first sorted position holding index r; no host sync (searchsorted stays on device).
    starts = torch.searchsorted(sorted_index, torch.arange(R + 1, device=flat.device, dtype=flat.dtype))
    dtable = _new_buffer(bias_table, (R, H))
    _segment_sum_kernel[(R,)](
        dense, order, starts, dtable, flat.numel(), H, *dtable.stride(),
        BLOCK_S=64, BLOCK_H=triton.next_power_of_2(H),
    )
    return dtable


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


# ---------------------------------------------------------------------------------------------------
# torch.library registration and autograd


@torch.library.custom_op("beitfast::rel_pos_attention_fwd", mutates_args=())
def rel_pos_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    bias_table: torch.Tensor | None, rel_index: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, N, D]`` and the base-2 row log-sum-exp ``[B, H, N]`` (fp32)."""
    return _forward(q, k, v, bias_table, rel_index, scale)


@rel_pos_attention_fwd.register_fake
def _(q, k, v, bias_table, rel_index, scale):
    B, H, N, D = q.shape
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("beitfast::rel_pos_attention_bwd", mutates_args=())
def rel_pos_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias_table: torch.Tensor | None, rel_index: torch.Tensor | None, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (contiguous ``[B, H, N, D]``) and the table gradient (empty without a bias)."""
    return _backward(dout, q, k, v, out, lse, bias_table, rel_index, scale, deterministic)


@rel_pos_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias_table, rel_index, scale, deterministic):
    B, H, N, D = q.shape
    dtable = bias_table.new_empty(bias_table.shape) if bias_table is not None else q.new_empty(0)
    return q.new_empty(B, H, N, D), q.new_empty(B, H, N, D), q.new_empty(B, H, N, D), dtable


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, rel_index, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias_table, rel_index)
    ctx.scale = scale
    ctx.deterministic = deterministic_mode()


def _backward_rule(ctx, dout, _dlse):
    q, k, v, out, lse, bias_table, rel_index = ctx.saved_tensors
    dq, dk, dv, dtable = rel_pos_attention_bwd(
        dout, q, k, v, out, lse, bias_table, rel_index, ctx.scale, ctx.deterministic
    )
    return dq, dk, dv, dtable if bias_table is not None else None, None, None


rel_pos_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def rel_pos_attention(q, k, v, bias_table, rel_index, scale: float) -> torch.Tensor:
    """Differentiable Triton attention with the relative position bias (inputs already validated).

    Under autocast, q, k and v are cast to the autocast dtype first (the table stays as it is: the
    kernels read it in fp32), as autocast does for PyTorch's own attention.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out, _ = rel_pos_attention_fwd(q, k, v, bias_table, rel_index, scale)
    return out
