"""Masked-token cross-entropy fused with the LM head (Triton): the loss, argmax hits and gradients of
``cross_entropy(h @ W.T + b, labels)`` over selected rows of ``hidden``, in row chunks, with the
gradient computed in the forward pass. Three GEMMs, no atomics: deterministic by construction.

Entry point: :func:`lm_cross_entropy_chunked`, the same contract as the CUDA op
``beitfast::lm_cross_entropy_chunked`` (``csrc/cross_entropy_cuda.cu``); autograd lives in
``beitfast/ops/cross_entropy.py``.

Rows. ``row_labels`` ``[R]`` (``ignore_index`` on rows that do not count), optionally ``source_rows``
``[R]`` (the row of ``hidden`` flattened over ``[B, N]`` that row ``r`` reads) and ``row_count``, a
device scalar: only rows ``r < row_count`` exist. ``R`` is then an upper bound (``B`` times the most
masked patches per image when the caller knows it, else ``B * N``), and every kernel reads the count
and leaves at once past it: no host sync.

Chunks. The rows go in as few chunks as the logits buffer allows: a chunk's ``[C, V]`` logits in the
compute dtype take at most ``LOGITS_BUDGET_BYTES``: the caller passes ``chunk_rows``
(``beitfast.ops.cross_entropy.rows_per_chunk``, the rule of both backends). At BEiT-B (128 x 75 rows,
V = 8192) that is one chunk under 16-bit autocast and two in fp32; five launches per chunk. Per chunk:

1. gather: the chunk's rows of ``hidden`` (any strides and dtype) into a ``[C, D]`` buffer in the
   compute dtype, so every GEMM below reads contiguous 16-bit tiles (no cast per tile);
2. logits: ``[C, V] = rows @ W_c.T + b`` into the bounded buffer in the compute dtype (as the eager
   linear rounds its output);
3. row pass: per row the max, log-sum-exp, loss, argmax hit, and (with gradients) the logits
   overwritten in place by ``(softmax - onehot) * row_scale``;
4. weight gradient: ``dW = dlogits.T @ rows``, fp32 accumulation over every row of the chunk, each
   program storing its own ``[V, D]`` tile once (and the programs of the first D tile the bias
   gradient). With one chunk that is one GEMM over all rows, written once; a later chunk, only when
   the budget forces more than one, adds its product to the stored tile (in chunk order:
   deterministic);
5. hidden gradient: ``dlogits @ W_c`` stored straight into the selected rows of a ``[B, N, D]``
   gradient in hidden's dtype (each row is written once); BEiT-B's one chunk of 9,600 rows x 768 gives
   450 tiles of 128 x 128 for 132 SMs.

Why not one kernel that never materialises the logits: the gradient needs the full row's log-sum-exp,
so that design reruns the logits GEMM in the backward (four GEMMs) and adds ``dh`` and ``dW`` from many
programs at once (atomics). A bounded chunk of logits gives three GEMMs and plain stores. The GEMMs are Triton rather than cuBLAS because they read the row count on the device.

Precision: GEMM operands in the compute dtype (the autocast dtype under autocast, else the input
dtype) with fp32 accumulation; the loss in fp32 from the rounded logits; fp32 inputs use IEEE fp32 dots
unless TF32 matmuls are allowed in torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SMEM_BYTES = 160 * 1024  # what a config may use: under sm_80's 163 KB (and sm_90's 227 KB)


def _gemm_configs():
    # The interpreter runs one small config (autotuning needs a GPU), small enough that the tests' odd
    # shapes have several tiles and tails along every axis.
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        # 128 x 128 tiles take 8 warps: with 4, the weight gradient's bias sum spills on sm_90.
        for m, n, k, w, s in [
            (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    ]


def _prune_by_shared_memory(configs, named_args, **kwargs):
    """Configs whose pipelined operand tiles fit the shared memory of sm_80 and sm_90; fp32 operands
    take twice the bytes of 16-bit ones."""
    itemsize = named_args["b_ptr"].element_size()
    keep = [
        c for c in configs
        if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize
        <= _SMEM_BYTES
    ]
    return keep or configs[-1:]


_GEMM_TUNING = dict(configs=_gemm_configs(), prune_configs_by={"early_config_prune": _prune_by_shared_memory})


@triton.jit
def _live_rows(count_ptr, first, chunk_rows):
    """Rows of this chunk below the device-side row count (may be <= 0)."""
    return tl.minimum(tl.load(count_ptr).to(tl.int32) - first, chunk_rows)


@triton.jit
def _source_offsets(src_ptr, rows, row_ok, N, stride_b, stride_n, HAS_SRC: tl.constexpr):
    """Offsets of the chunk's rows in a ``[B, N, D]`` tensor with row strides ``stride_b, stride_n``."""
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    batch = src // N
    return batch * stride_b + (src - batch * N) * stride_n


@triton.jit
def _gather_rows_kernel(
    h_ptr, src_ptr, count_ptr, out_ptr, first, chunk_rows, D, N, stride_hb, stride_hn, stride_hd,
    HAS_SRC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    live = _live_rows(count_ptr, first, chunk_rows)
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(0) * BLOCK_R >= live:
        return
    row_ok = local < live
    offsets = _source_offsets(src_ptr, first + local, row_ok, N, stride_hb, stride_hn, HAS_SRC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (d < D)[None, :]
        x = tl.load(h_ptr + offsets[:, None] + d[None, :] * stride_hd, mask=ok)
        tl.store(out_ptr + local[:, None] * D + d[None, :], x.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_tile_product(a_ptr, b_ptr, rows, row_ok, cols, col_ok, K, s_bk, s_bn,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """``a[rows, :K] @ b[:K, cols]`` in fp32: ``a`` is row-major with rows of ``K``, ``b`` is read
    through its strides (the weight's transpose costs nothing)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * s_bk + cols[None, :] * s_bn, mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(key=["V", "D"], **_GEMM_TUNING)
@triton.jit
def _logits_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, count_ptr, first, chunk_rows, V, D,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[C, V] = a[C, D] @ b[V, D].T + bias`` for the live rows."""
    # Vocabulary tiles vary fastest, so programs running together share the rows tile in L2.
    pid_v = tl.program_id(0)
    pid_m = tl.program_id(1)
    live = _live_rows(count_ptr, first, chunk_rows)
    if pid_m * BLOCK_M >= live:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < live
    col_ok = cols < V
    acc = _row_tile_product(a_ptr, b_ptr, rows, row_ok, cols, col_ok, D, 1, D,  # b = weight.T
                            INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _row_pass_kernel(
    logits_ptr, labels_ptr, scale_ptr, count_ptr, loss_ptr, hit_ptr, first, chunk_rows, V, scale_stride,
    ignore_index, WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: loss, hit and, WITH_GRAD, the row's logits -> (softmax - onehot) * scale.
    Rows past the count get loss 0 and no hit; their logits are never read."""
    local = tl.program_id(0)
    row = first + local
    if local >= _live_rows(count_ptr, first, chunk_rows):
        tl.store(loss_ptr + row, 0.0)
        tl.store(hit_ptr + row, 0)
        return
    label = tl.load(labels_ptr + row)
    # A label outside [0, V) counts as ignored: never an out-of-bounds read (the op layer counts them).
    counted = (label != ignore_index) & (label >= 0) & (label < V)
    x_ptr = logits_ptr + local.to(tl.int64) * V

    run_max = float("-inf")
    run_sum = 0.0
    run_arg = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        tile_max = tl.max(x, axis=0)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        # Strictly greater: on a tie the earlier column keeps the argmax, as torch.argmax does.
        run_arg = tl.where(tile_max > run_max, v0 + tl.argmax(x, axis=0, tie_break_left=True), run_arg)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    label_logit = tl.load(x_ptr + label, mask=counted, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - label_logit, 0.0))
    tl.store(hit_ptr + row, (counted & (run_arg == label)).to(tl.int8))
    if WITH_GRAD:
        scale = tl.where(counted, tl.load(scale_ptr + row * scale_stride), 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - (cols == label).to(tl.float32)) * scale
            tl.store(x_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=col_ok)


@triton.autotune(key=["V", "D"], restore_value=["dw_ptr", "db_ptr"], **_GEMM_TUNING)
@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, dw_ptr, db_ptr, count_ptr, first, chunk_rows, V, D,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dw[V, D] = a[C, V].T @ b[C, D]`` (fp32) over the live rows, ``db[V] = a.sum(0)``; ACCUMULATE
    (chunks after the first) adds to what is stored instead. Without ACCUMULATE every tile is written,
    zeros when no row is live."""
    pid_d = tl.program_id(0)
    pid_v = tl.program_id(1)
    live = tl.maximum(_live_rows(count_ptr, first, chunk_rows), 0)
    if ACCUMULATE and live == 0:
        return
    vs = pid_v * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    v_ok = vs < V
    d_ok = ds < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, live, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < live
        a_t = tl.load(a_ptr + k[None, :] * V + vs[:, None], mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a_t, b, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(a_t.to(tl.float32), axis=1)
    tile = dw_ptr + vs[:, None] * D + ds[None, :]
    tile_ok = v_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(tile, mask=tile_ok)
    tl.store(tile, acc, mask=tile_ok)
    if HAS_BIAS:
        bias_ok = v_ok & (pid_d == 0)
        if ACCUMULATE:
            bias_acc += tl.load(db_ptr + vs, mask=bias_ok)
        tl.store(db_ptr + vs, bias_acc, mask=bias_ok)


@triton.autotune(key=["V", "D"], **_GEMM_TUNING)
@triton.jit
def _hidden_grad_kernel(
    a_ptr, b_ptr, out_ptr, src_ptr, count_ptr, first, chunk_rows, V, D, N, stride_ob, stride_on,
    HAS_SRC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row ``r`` of ``a[C, V] @ b[V, D]`` into row ``source_rows[first + r]`` of ``out`` ``[B, N, D]``."""
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    live = _live_rows(count_ptr, first, chunk_rows)
    if pid_m * BLOCK_M >= live:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < live
    d_ok = ds < D
    acc = _row_tile_product(a_ptr, b_ptr, rows, row_ok, ds, d_ok, V, D, 1,
                            INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    offsets = _source_offsets(src_ptr, first + rows, row_ok, N, stride_ob, stride_on, HAS_SRC)
    tl.store(out_ptr + offsets[:, None] + ds[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _tiles(m: int, n: int):
    """The grid of a GEMM with an ``[m, n]`` output: output-column tiles vary fastest."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))


def _input_precision(compute_dtype: torch.dtype) -> str:
    if compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def lm_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_labels: torch.Tensor,
    source_rows: torch.Tensor | None,
    row_count: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    ignore_index: int,
    compute_dtype: torch.dtype,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss ``[R]`` (fp32, 0 on uncounted rows) and argmax hit ``[R]`` (bool); with ``row_scale``
    (fp32, one value or ``[R]``) also the gradients of ``sum(row_scale * loss)`` for hidden (``[B, N, D]``,
    zeros on unselected rows), weight and bias (empty tensors without ``row_scale``, or without bias).

    ``hidden`` is ``[B, N, D]`` (any strides); ``weight`` ``[V, D]``; ``row_labels`` int64 ``[R]``;
    ``source_rows`` int64 ``[R]`` or None (row ``r`` of hidden flattened); ``row_count`` a one-element
    integer tensor or None (all ``R`` rows); ``chunk_rows`` the rows of one chunk (its ``[C, V]``
    logits buffer). Launches kernels only: never reads device values.
    """
    device = hidden.device
    R = row_labels.shape[0]
    V, D = weight.shape
    B, N, _ = hidden.shape
    with_grad = row_scale is not None
    loss = torch.empty(R, device=device, dtype=torch.float32)
    hits = torch.empty(R, device=device, dtype=torch.bool)
    empty = hidden.new_empty(0)
    grad_hidden = torch.zeros(B, N, D, device=device, dtype=hidden.dtype) if with_grad else empty
    # fp32, written whole by the first chunk's weight-gradient GEMM; for fp32 parameters they are the
    # gradients themselves.
    new = torch.zeros if R == 0 else torch.empty
    grad_weight = new(V, D, device=device, dtype=torch.float32) if with_grad else empty
    with_bias_grad = with_grad and bias is not None
    grad_bias = new(V, device=device, dtype=torch.float32) if with_bias_grad else empty
    if R == 0:
        return loss, hits, grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(_dtype_of(bias))

    # Cast once per call (no copy when already in the compute dtype and contiguous).
    weight_c = weight.to(compute_dtype).contiguous()
    bias_c = bias.to(compute_dtype).contiguous() if bias is not None else None
    count = row_count.reshape(1) if row_count is not None else torch.full((1,), R, device=device)
    labels = row_labels.contiguous()
    source = source_rows.contiguous() if source_rows is not None else labels
    scale = row_scale.contiguous() if with_grad else loss
    scale_stride = 1 if with_grad and row_scale.numel() > 1 else 0
    chunk = max(1, min(chunk_rows, R))
    rows = torch.empty(chunk, D, device=device, dtype=compute_dtype)
    logits = torch.empty(chunk, V, device=device, dtype=compute_dtype)
    precision = _input_precision(compute_dtype)
    block_v = min(triton.next_power_of_2(V), 2048)
    stride_hb, stride_hn, stride_hd = hidden.stride()

    for first in range(0, R, chunk):
        rows_here = min(chunk, R - first)
        _gather_rows_kernel[(triton.cdiv(rows_here, 32),)](
            hidden, source, count, rows, first, rows_here, D, N, stride_hb, stride_hn, stride_hd,
            HAS_SRC=source_rows is not None, BLOCK_R=32, BLOCK_D=min(triton.next_power_of_2(D), 128),
        )
        _logits_kernel[_tiles(rows_here, V)](
            rows, weight_c, bias_c if bias_c is not None else weight_c, logits, count, first, rows_here, V, D,
            HAS_BIAS=bias is not None, INPUT_PRECISION=precision,
        )
        _row_pass_kernel[(rows_here,)](
            logits, labels, scale, count, loss, hits, first, rows_here, V, scale_stride, ignore_index,
            WITH_GRAD=with_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
        if not with_grad:
            continue
        _weight_grad_kernel[_tiles(V, D)](
            logits, rows, grad_weight, grad_bias if bias is not None else grad_weight, count, first,
            rows_here, V, D, HAS_BIAS=bias is not None, ACCUMULATE=first > 0, INPUT_PRECISION=precision,
        )
        _hidden_grad_kernel[_tiles(rows_here, D)](
            logits, weight_c, grad_hidden, source, count, first, rows_here, V, D, N,
            grad_hidden.stride(0), grad_hidden.stride(1),
            HAS_SRC=source_rows is not None, INPUT_PRECISION=precision,
        )
    if with_grad:
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(_dtype_of(bias))
    return loss, hits, grad_hidden, grad_weight, grad_bias


def _dtype_of(t: torch.Tensor | None) -> torch.dtype:
    return t.dtype if t is not None else torch.float32
