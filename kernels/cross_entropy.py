"""Masked-token cross-entropy fused with the LM head (Triton): ``cross_entropy(h @ W.T + b, labels)``
over the selected rows of ``hidden`` without the ``[M, V]`` logits ever existing in memory.

Rows. The caller passes ``row_labels`` ``[R]`` (``ignore_index`` on rows that do not count) and
optionally ``source_rows`` ``[R]``: which row of ``hidden`` (flattened over ``[B, N]``) row ``r`` reads.
With a mask the selection stays on the device (no gathered copy of ``hidden``, no host sync): ``R`` may
be an upper bound whose tail rows are ignored, and row blocks with nothing to count exit at once.

Forward. Programs tile (row block, vocabulary split). Each walks its split in ``BLOCK_V`` tiles, computes
the logits tile with fp32 accumulation (``BLOCK_D`` steps over the hidden dim) and keeps an online
max / sum-of-exp, the argmax and the label's logit. A combine kernel merges the splits into the per-row
loss, log-sum-exp and argmax hit. Splitting the vocabulary keeps the GPU busy when few rows are selected.

Backward: recompute. The gradient needs the log-sum-exp first, so computing it inside the forward pass
(Liger's in-forward gradient) would cost a second sweep over the logits in the forward anyway: the same
four GEMMs of work as recomputing in the backward, while it would also hold the fp32 ``dW`` and
``dhidden`` from forward to backward and waste the work under ``no_grad``. Recompute keeps only the
per-row log-sum-exp (4 bytes a row). Each backward program rebuilds one logits tile, turns it into
``dlogits = (softmax - onehot) * grad_row`` and adds its two products ``dlogits @ W`` and
``dlogits^T @ h`` (and the column sums for the bias) into fp32 buffers with atomic adds.

Precision. The GEMMs run in ``compute_dtype`` (the autocast dtype under autocast, like the eager
``F.linear``; else the input dtype) with fp32 accumulation; the logits stay fp32 (eager rounds them to
``compute_dtype``); fp32 inputs use IEEE fp32 dots unless TF32 matmuls are allowed in torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Vocabulary columns per forward program: enough work per program to amortise reading the row block,
# few enough that a BEiT batch (75 row blocks of 128) still fills the GPU (8 splits of an 8192 vocab).
V_PER_SPLIT = 1024
_COMBINE_BLOCK = 128


def _configs(gpu_configs):
    # The interpreter runs one fixed config (autotuning needs a GPU); large tiles keep it fast.
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for m, v, d, w, s in gpu_configs
    ]


_FWD_CONFIGS = _configs([
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
])
_BWD_CONFIGS = _configs([
    (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3),
])


@triton.jit
def _row_offsets(src_ptr, rows, row_ok, N, stride_hb, stride_hn, HAS_SRC: tl.constexpr):
    """Offsets of the rows in ``hidden`` ``[B, N, D]`` and their flat index ``b * N + n``."""
    if HAS_SRC:
        src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    batch = src // N
    return batch * stride_hb + (src - batch * N) * stride_hn, src


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, h_offsets, row_ok, cols, col_ok, D,
                 stride_hd, stride_wv, stride_wd,
                 HAS_BIAS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``h[rows] @ W[cols].T + b[cols]`` in fp32, operands rounded to the compute dtype."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        dk_ok = dk < D
        h = tl.load(h_ptr + h_offsets[:, None] + dk[None, :] * stride_hd,
                    mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_wv + dk[:, None] * stride_wd,
                      mask=col_ok[None, :] & dk_ok[:, None], other=0.0)
        acc = tl.dot(h.to(COMPUTE_DTYPE), w_t.to(COMPUTE_DTYPE), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
        acc += bias.to(COMPUTE_DTYPE).to(tl.float32)[None, :]
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "V", "COMPUTE_DTYPE", "HAS_BIAS"])
@triton.jit
def _lm_ce_forward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, src_ptr,
    part_max_ptr, part_sum_ptr, part_arg_ptr, label_logit_ptr,
    R, V, D, N, stride_hb, stride_hn, stride_hd, stride_wv, stride_wd, v_per_split, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SRC: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    counted = labels != ignore_index
    # Blocks with no counted row (the tail past the selected rows) do nothing; the combine step never
    # reads their partials.
    if tl.max(counted.to(tl.int32), axis=0) == 0:
        return
    h_offsets, _ = _row_offsets(src_ptr, rows, row_ok, N, stride_hb, stride_hn, HAS_SRC)

    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    label_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, h_offsets, row_ok, cols, col_ok, D,
                              stride_hd, stride_wv, stride_wd, HAS_BIAS, COMPUTE_DTYPE, INPUT_PRECISION,
                              BLOCK_M, BLOCK_V, BLOCK_D)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.argmax(logits, axis=1, tie_break_left=True)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        # Strictly greater: on a tie the earlier column keeps the argmax, as torch.argmax does.
        run_arg = tl.where(tile_max > run_max, v0 + tile_arg, run_arg)
        run_max = new_max
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)

    part = split * R + rows
    tl.store(part_max_ptr + part, run_max, mask=row_ok)
    tl.store(part_sum_ptr + part, run_sum, mask=row_ok)
    tl.store(part_arg_ptr + part, run_arg, mask=row_ok)
    # Only the split holding the label writes its logit.
    tl.store(label_logit_ptr + rows, label_logit, mask=row_ok & (labels >= v_start) & (labels < v_end))


@triton.jit
def _lm_ce_combine_kernel(
    part_max_ptr, part_sum_ptr, part_arg_ptr, label_logit_ptr, labels_ptr,
    loss_ptr, lse_ptr, hit_ptr, R, num_splits, ignore_index, BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < R
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    counted = row_ok & (labels != ignore_index)

    row_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for split in range(0, num_splits):
        part_max = tl.load(part_max_ptr + split * R + rows, mask=counted, other=float("-inf"))
        row_max = tl.maximum(row_max, part_max)
    row_max = tl.where(counted, row_max, 0.0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    best = tl.zeros((BLOCK,), dtype=tl.int32)
    found = tl.zeros((BLOCK,), dtype=tl.int1)
    for split in range(0, num_splits):
        part_max = tl.load(part_max_ptr + split * R + rows, mask=counted, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + split * R + rows, mask=counted, other=0.0)
        part_arg = tl.load(part_arg_ptr + split * R + rows, mask=counted, other=0)
        total += part_sum * tl.exp(part_max - row_max)
        # Splits go in vocabulary order: the first one reaching the maximum holds the first argmax.
        take = (part_max == row_max) & (found == 0)
        best = tl.where(take, part_arg, best)
        found = found | take
    lse = row_max + tl.log(tl.where(counted, total, 1.0))
    label_logit = tl.load(label_logit_ptr + rows, mask=counted, other=0.0)
    tl.store(loss_ptr + rows, tl.where(counted, lse - label_logit, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(counted, lse, 0.0), mask=row_ok)
    tl.store(hit_ptr + rows, counted & (best == labels), mask=row_ok)


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "V", "COMPUTE_DTYPE", "HAS_BIAS"],
                 reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"])
@triton.jit
def _lm_ce_backward_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, src_ptr, lse_ptr, grad_ptr, dh_ptr, dw_ptr, db_ptr,
    R, V, D, N, stride_hb, stride_hn, stride_hd, stride_wv, stride_wd, stride_grad, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SRC: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Vocabulary tiles vary fastest so that neighbouring programs share the row block in L2.
    pid_v = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    counted = row_ok & (labels != ignore_index)
    if tl.max(counted.to(tl.int32), axis=0) == 0:
        return
    h_offsets, src = _row_offsets(src_ptr, rows, row_ok, N, stride_hb, stride_hn, HAS_SRC)
    grad = tl.load(grad_ptr + rows * stride_grad, mask=counted, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=counted, other=0.0)

    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, h_offsets, row_ok, cols, col_ok, D,
                          stride_hd, stride_wv, stride_wd, HAS_BIAS, COMPUTE_DTYPE, INPUT_PRECISION,
                          BLOCK_M, BLOCK_V, BLOCK_D)
    onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
    dlogits = (tl.exp(logits - lse[:, None]) - onehot) * grad[:, None]
    dlogits = tl.where(counted[:, None] & col_ok[None, :], dlogits, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dlogits, axis=0), mask=col_ok, sem="relaxed")
    # The two gradient GEMMs take dlogits in the compute dtype, as the eager linear's backward does.
    dlogits = dlogits.to(COMPUTE_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        dk_ok = dk < D
        w = tl.load(w_ptr + cols[:, None] * stride_wv + dk[None, :] * stride_wd,
                    mask=col_ok[:, None] & dk_ok[None, :], other=0.0)
        dh = tl.dot(dlogits, w.to(COMPUTE_DTYPE), input_precision=INPUT_PRECISION)
        tl.atomic_add(dh_ptr + src[:, None] * D + dk[None, :], dh,
                      mask=counted[:, None] & dk_ok[None, :], sem="relaxed")
        h = tl.load(h_ptr + h_offsets[:, None] + dk[None, :] * stride_hd,
                    mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        dw = tl.dot(tl.trans(dlogits), h.to(COMPUTE_DTYPE), input_precision=INPUT_PRECISION)
        tl.atomic_add(dw_ptr + cols[:, None] * D + dk[None, :], dw,
                      mask=col_ok[:, None] & dk_ok[None, :], sem="relaxed")


def _as_rows3d(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` as ``[B, N, D]`` (an ``[M, D]`` input is one batch of M rows); a view, no copy."""
    return hidden if hidden.dim() == 3 else hidden.unsqueeze(0)


def _input_precision(compute_dtype: torch.dtype) -> str:
    if compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _common_args(hidden, weight, compute_dtype):
    h3 = _as_rows3d(hidden)
    return dict(
        V=weight.shape[0], D=weight.shape[1], N=h3.shape[1],
        stride_hb=h3.stride(0), stride_hn=h3.stride(1), stride_hd=h3.stride(2),
        stride_wv=weight.stride(0), stride_wd=weight.stride(1),
        COMPUTE_DTYPE=_TL_DTYPES[compute_dtype], INPUT_PRECISION=_input_precision(compute_dtype),
    )


@torch.library.custom_op("beitfast::lm_cross_entropy_triton", mutates_args=(), device_types=("cuda", "cpu"))
def lm_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_labels: torch.Tensor,
    source_rows: torch.Tensor | None,
    ignore_index: int,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss ``[R]`` (fp32, 0 on ignored rows), log-sum-exp ``[R]`` and argmax hit ``[R]``."""
    R = row_labels.shape[0]
    loss = torch.empty(R, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    hits = torch.empty(R, device=hidden.device, dtype=torch.bool)
    if R == 0:
        return loss, lse, hits
    V = weight.shape[0]
    num_splits = triton.cdiv(V, V_PER_SPLIT)
    part_max = torch.empty(num_splits, R, device=hidden.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_arg = torch.empty(num_splits, R, device=hidden.device, dtype=torch.int32)
    label_logit = torch.empty_like(loss)
    h3 = _as_rows3d(hidden)

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_M"]), num_splits)

    _lm_ce_forward_kernel[grid](
        h3, weight, bias if bias is not None else weight, row_labels,
        source_rows if source_rows is not None else row_labels,
        part_max, part_sum, part_arg, label_logit,
        R=R, v_per_split=V_PER_SPLIT, ignore_index=ignore_index,
        HAS_BIAS=bias is not None, HAS_SRC=source_rows is not None,
        **_common_args(hidden, weight, compute_dtype),
    )
    _lm_ce_combine_kernel[(triton.cdiv(R, _COMBINE_BLOCK),)](
        part_max, part_sum, part_arg, label_logit, row_labels, loss, lse, hits,
        R, num_splits, ignore_index, BLOCK=_COMBINE_BLOCK,
    )
    return loss, lse, hits


@lm_cross_entropy_forward.register_fake
def _(hidden, weight, bias, row_labels, source_rows, ignore_index, compute_dtype):
    R = row_labels.shape[0]
    loss = hidden.new_empty(R, dtype=torch.float32)
    return loss, torch.empty_like(loss), hidden.new_empty(R, dtype=torch.bool)


@torch.library.custom_op("beitfast::lm_cross_entropy_triton_backward", mutates_args=(),
                         device_types=("cuda", "cpu"))
def lm_cross_entropy_backward(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_labels: torch.Tensor,
    source_rows: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum(grad_rows * loss_rows)`` for hidden (zeros on unselected rows), weight and
    bias (an empty tensor when there is no bias)."""
    R = row_labels.shape[0]
    V, D = weight.shape
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.zeros(V, D, device=weight.device, dtype=torch.float32)
    grad_bias = torch.zeros(V if bias is not None else 1, device=weight.device, dtype=torch.float32)
    if R:
        def grid(meta):
            return (triton.cdiv(V, meta["BLOCK_V"]), triton.cdiv(R, meta["BLOCK_M"]))

        _lm_ce_backward_kernel[grid](
            _as_rows3d(hidden), weight, bias if bias is not None else weight, row_labels,
            source_rows if source_rows is not None else row_labels, lse, grad_rows,
            grad_hidden, grad_weight, grad_bias,
            R=R, stride_grad=grad_rows.stride(0), ignore_index=ignore_index,
            HAS_BIAS=bias is not None, HAS_SRC=source_rows is not None,
            **_common_args(hidden, weight, compute_dtype),
        )
    grad_bias = grad_bias.to(bias.dtype) if bias is not None else grad_bias.new_empty(0)
    return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias


@lm_cross_entropy_backward.register_fake
def _(grad_rows, hidden, weight, bias, row_labels, source_rows, lse, ignore_index, compute_dtype):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, row_labels, source_rows, ignore_index, compute_dtype = inputs
    _, lse, _ = output
    ctx.save_for_backward(hidden, weight, bias, row_labels, source_rows, lse)
    ctx.ignore_index = ignore_index
    ctx.compute_dtype = compute_dtype


def _backward(ctx, grad_loss, grad_lse, grad_hits):
    hidden, weight, bias, row_labels, source_rows, lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = lm_cross_entropy_backward(
        grad_loss, hidden, weight, bias, row_labels, source_rows, lse, ctx.ignore_index, ctx.compute_dtype
    )
    return grad_hidden, grad_weight, grad_bias if bias is not None else None, None, None, None, None


lm_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def lm_cross_entropy(hidden, weight, bias, row_labels, source_rows, ignore_index, compute_dtype):
    """Per-row loss ``[R]`` and argmax hit ``[R]``; differentiable in hidden, weight and bias."""
    loss, _, hits = lm_cross_entropy_forward(
        hidden, weight, bias, row_labels, source_rows, ignore_index, compute_dtype
    )
    return loss, hits
