"""Masked-token cross-entropy of BEiT's LM head: ``cross_entropy(hidden[mask] @ weight.T + bias,
labels)`` without the fused backends ever holding the ``[M, V]`` logits.

The eager backend is the definition: gather the counted rows, a linear layer in the input dtype
(the autocast dtype under autocast), cross-entropy in float32 (float64 stays float64).

Fused backends (``triton``: ``beitfast.kernels.cross_entropy``; ``cuda``: ``csrc/cross_entropy_cuda.cu``)
share one design, one chunk rule (:func:`rows_per_chunk`) and one autograd wrapper here; only
``lm_cross_entropy_chunked`` differs. Rows go in chunks of at most ``LOGITS_BUDGET_BYTES`` of logits: per
chunk one GEMM into a bounded logits buffer, one fused row pass (max, log-sum-exp, loss,
argmax hit, the logits turned in place into their gradient), then an fp32 ``dW`` GEMM and ``dh`` written
straight into the selected rows of a ``[B, N, D]`` gradient. No atomics: deterministic by construction.
For mean and sum the gradient is computed in the forward (three GEMMs, no recompute) for
``grad_output = 1`` and scaled in place in the backward; ``reduction="none"`` reruns the op in the
backward with the per-row upstream gradients.

Rows are selected on the device (:class:`RowPlan`): no gathered copy of hidden and no host sync for
mean and sum (``reduction="none"`` with ``[B, N]`` labels reads the row count: the output shape
depends on it). With a mask, the planned rows are an upper bound: ``B * max_masked_per_image`` when the
caller knows the most masked patches per image (the trainer passes its masking's
``num_masking_patches``), else ``B * N``. The triton backend reads the true count on the device and
leaves at once past it; the cuda backend's cuBLAS GEMMs take host sizes, so it covers the whole bound.
A mask selecting more rows than the bound is a user error: ValueError where values may be read (CPU,
``BEITFAST_CHECKS=1``), else a NaN loss (the trainer stops on it).

Invalid labels. A counted label outside ``[0, V)`` is a user error. On CPU, or with
``BEITFAST_CHECKS=1`` on a GPU (a host sync), the call raises ValueError. Otherwise nothing is read on
the host: the fused backends treat such rows as ignored (no loss, no gradient, not in the mean's
count) and add them to a device-side counter, :func:`invalid_label_count`, for the trainer to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import dispatch

OP = "cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")
# The most bytes a fused backend's chunk of logits ([C, V] in the compute dtype) may take. BEiT-B
# pre-training's 128 x 75 masked rows at V = 8192 take 150 MiB in 16-bit: one chunk (two in fp32), so the
# weight gradient is one GEMM over every row and the Triton loss five launches. Bigger problems get more
# chunks of at most this size, so the buffer falls under a tenth of the fp32 logits once those pass 10x
# the budget.
LOGITS_BUDGET_BYTES = 160 * 2**20
# Smallest chunk, in rows: one GEMM tile row at least; chunks are whole multiples of it.
MIN_CHUNK_ROWS = 64


def rows_per_chunk(rows: int, vocab: int, itemsize: int, budget: int | None = None) -> int:
    """Rows per chunk of both fused backends: as few chunks as ``budget`` bytes (default
    ``LOGITS_BUDGET_BYTES``) of ``[C, vocab]`` logits allow, of equal size (whole ``MIN_CHUNK_ROWS``
    tiles), so the last one is no sliver."""
    budget = LOGITS_BUDGET_BYTES if budget is None else budget
    largest = max(MIN_CHUNK_ROWS, budget // (vocab * itemsize) // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)
    chunks = -(-rows // largest)
    per_chunk = -(-rows // max(1, chunks))
    return max(1, min(rows, -(-per_chunk // MIN_CHUNK_ROWS) * MIN_CHUNK_ROWS))


def masked_lm_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    return_accuracy: bool = False,
    max_masked_per_image: int | None = None,
):
    """Cross-entropy of the LM head over the counted rows.

    ``hidden`` is ``[B, N, D]`` with ``mask`` a ``[B, N]`` bool tensor selecting the rows (batch-major,
    then position order, as ``hidden[mask]``), or ``[M, D]`` with ``mask=None``. ``labels`` is
    ``[B, N]`` (a label per position; only selected ones count) or ``[M]`` (one per selected row).
    ``weight`` is ``[V, D]``, ``bias`` ``[V]`` or None. Rows whose label is ``ignore_index`` do not
    count. ``reduction``: ``"mean"`` (over counted rows; 0 when none count), ``"sum"`` or ``"none"``
    (a float32 ``[M]`` loss per selected row, 0 for ignored rows).

    With ``return_accuracy=True`` returns ``(loss, accuracy)``, ``accuracy`` being the float32 fraction
    of counted rows whose argmax logit is the label (0 when none count).

    ``max_masked_per_image``: the most rows ``mask`` selects in any image, when the caller knows it
    (BEiT's masking generator never masks more than its ``num_masking_patches``); the fused backends
    then plan ``B * max_masked_per_image`` rows instead of ``B * N``. None: unknown.
    """
    _validate(hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image)
    impl = dispatch.select(
        OP, backend, hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask,
        ignore_index=ignore_index, reduction=reduction,
    )
    loss, accuracy = impl.fn(hidden, weight, bias, labels, mask, ignore_index, reduction,
                             max_masked_per_image)
    return (loss, accuracy) if return_accuracy else loss


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image) -> None:
    name = "masked_lm_cross_entropy"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    bound = max_masked_per_image
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
        raise ValueError(f"{name}: max_masked_per_image must be an int >= 0 or None, got {bound!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in dispatch.FLOAT_DTYPES:
        got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise TypeError(
            f"{name}: hidden must be a floating-point (float64/32/16, bfloat16) tensor, got {got}"
        )
    for arg, value in (("weight", weight), ("bias", bias)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(value).__name__}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"{name}: weight must be [V, D] with V, D > 0, got {_shape(weight)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"{name}: hidden's last dim must equal weight's D={D}, got hidden {tuple(hidden.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{name}: bias must be [V={V}], got {_shape(bias)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"{name}: labels must be an int64 or int32 tensor, got {got}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: mask must be a bool tensor or None, got {type(mask).__name__}")
    for arg, t in (("weight", weight), ("bias", bias), ("labels", labels), ("mask", mask)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {arg} must be on hidden's device {hidden.device}, got {t.device}")
    # The linear layer needs one dtype, unless autocast picks it (as in F.linear).
    if not torch.is_autocast_enabled(hidden.device.type):
        for arg, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != hidden.dtype:
                raise TypeError(
                    f"{name}: {arg} must have hidden's dtype {hidden.dtype} outside autocast, got {t.dtype}"
                )
    if mask is None:
        if hidden.dim() != 2:
            raise ValueError(f"{name}: without mask, hidden must be [M, D], got {tuple(hidden.shape)}")
        if tuple(labels.shape) != (hidden.shape[0],):
            raise ValueError(
                f"{name}: labels must be [M={hidden.shape[0]}] to match hidden, got {tuple(labels.shape)}"
            )
    else:
        if hidden.dim() != 3:
            raise ValueError(f"{name}: with mask, hidden must be [B, N, D], got {tuple(hidden.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"{name}: mask must be a bool [B, N] = {list(hidden.shape[:2])} tensor, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if labels.dim() == 2 and tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"{name}: labels must be [B, N] = {list(hidden.shape[:2])} or [num_masked], "
                f"got {tuple(labels.shape)}"
            )
        if labels.dim() not in (1, 2):
            raise ValueError(f"{name}: labels must be [B, N] or [num_masked], got {tuple(labels.shape)}")
        if labels.dim() == 1 and dispatch.may_inspect_values(mask) and labels.shape[0] != int(mask.sum()):
            raise ValueError(
                f"{name}: labels has {labels.shape[0]} entries but mask selects {int(mask.sum())} rows"
            )
        if bound is not None and dispatch.may_inspect_values(mask):
            most = int(mask.sum(1).max())
            if most > bound:
                raise ValueError(
                    f"{name}: max_masked_per_image={bound}, but mask selects {most} rows in one image"
                )
    if dispatch.may_inspect_values(labels):
        keep = labels != ignore_index
        if mask is not None and labels.dim() == 2:
            keep = keep & mask
        counted = labels[keep]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= V):
            raise ValueError(
                f"{name}: labels must lie in [0, V={V}) (or be ignore_index), "
                f"got values in [{int(counted.min())}, {int(counted.max())}]"
            )


def select_rows(hidden, labels, mask):
    """The counted rows ``[M, D]`` and their labels ``[M]`` (the gather the eager backend does)."""
    if mask is None:
        return hidden, labels
    rows = hidden[mask]
    return rows, (labels[mask] if labels.dim() == 2 else labels)


def hit_rate(hits: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """float32 fraction of counted rows whose argmax is the label; 0 when none count."""
    return hits.sum().float() / counted.sum().clamp(min=1)


def reduce_loss(per_row: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce float32 per-row losses (0 on uncounted rows); the mean of nothing is 0, not NaN."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1)


@dispatch.register(OP, "eager", dispatch.accepts_all)
def cross_entropy_eager(hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image):
    rows, row_labels = select_rows(hidden, labels, mask)
    logits = F.linear(rows, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
    per_row = F.cross_entropy(logits, row_labels.long(), ignore_index=ignore_index, reduction="none")
    counted = row_labels != ignore_index
    with torch.no_grad():
        accuracy = hit_rate((logits.argmax(dim=-1) == row_labels) & counted, counted)
    return reduce_loss(per_row, counted, reduction), accuracy


# ---------------------------------------------------------------------------------------------------
# fused backends: row bookkeeping, invalid labels


@dataclass(frozen=True)
class RowPlan:
    """The rows a fused backend computes, selected on the device without a gathered copy.

    ``row_labels`` ``[R]`` int64 holds ``ignore_index`` on rows that do not exist; ``source_rows``
    ``[R]`` is the row of ``hidden`` (flattened over ``[B, N]``) that row ``r`` reads, None when row ``r``
    is row ``r`` of an ``[M, D]`` hidden. With a mask and ``[B, N]`` labels the number of selected rows
    is only known on the device: ``R`` is an upper bound (``B * max_masked_per_image``, else ``B * N``),
    ``row_count`` the true count, and the rows past it carry ``ignore_index``. ``counted`` marks the rows
    that count (label in ``[0, V)``). ``bounded``: ``R`` is under ``B * N``, so a mask selecting more rows
    than the caller's bound loses rows (:func:`_flag_dropped_rows`).
    """

    row_labels: Tensor
    source_rows: Tensor | None
    counted: Tensor
    row_count: Tensor | None
    bounded: bool = False


def counted_labels(labels: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """Which labels count: not ``ignore_index`` and inside ``[0, vocab)`` (the fused kernels' rule)."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def plan_rows(labels: Tensor, mask: Tensor | None, ignore_index: int, vocab: int,
              max_masked_per_image: int | None = None) -> RowPlan:
    if mask is None:
        row_labels = labels.long()
        return RowPlan(row_labels, None, counted_labels(row_labels, ignore_index, vocab), None)
    selected = mask.reshape(-1)
    # Selected rows first, in hidden[mask] order (stable sort of "not selected").
    order = torch.argsort(~selected, stable=True)
    if labels.dim() == 1:
        row_labels = labels.long()
        counted = counted_labels(row_labels, ignore_index, vocab)
        return RowPlan(row_labels, order[: labels.shape[0]], counted, None)
    batch, positions = mask.shape
    per_image = positions if max_masked_per_image is None else min(max_masked_per_image, positions)
    order = order[: batch * per_image]  # the most rows the mask may select
    row_count = selected.sum()
    live = torch.arange(order.shape[0], device=order.device) < row_count
    row_labels = torch.where(live, labels.reshape(-1)[order].long(), ignore_index)
    counted = counted_labels(row_labels, ignore_index, vocab)
    return RowPlan(row_labels, order, counted, row_count, bounded=per_image < positions)


_INVALID_LABELS: dict[torch.device, Tensor] = {}


def _counter_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def invalid_label_count(device: torch.device | str = "cuda") -> Tensor:
    """Rows the fused backends treated as ignored because their label lay outside ``[0, V)``, since
    the last :func:`reset_invalid_label_count`: an int64 scalar on ``device``, updated without host
    syncs (reading it syncs). A trainer reads it when it logs and warns when it is not zero."""
    device = _counter_device(device)
    if device not in _INVALID_LABELS:
        _INVALID_LABELS[device] = torch.zeros((), dtype=torch.int64, device=device)
    return _INVALID_LABELS[device]


def reset_invalid_label_count() -> None:
    for counter in _INVALID_LABELS.values():
        counter.zero_()


def _count_invalid_labels(row_labels: Tensor, ignore_index: int, vocab: int) -> None:
    invalid = (row_labels != ignore_index) & ~counted_labels(row_labels, ignore_index, vocab)
    invalid_label_count(row_labels.device).add_(invalid.sum())


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype of the LM head's GEMM: the autocast dtype under autocast (as in F.linear), else
    hidden's dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _flag_dropped_rows(loss: Tensor, plan: RowPlan) -> Tensor:
    """NaN when the mask selected more rows than the plan's bound (rows were dropped), without a host
    sync: the trainer stops on a non-finite loss."""
    if not plan.bounded:
        return loss
    return torch.where(plan.row_count > plan.row_labels.shape[0], float("nan"), loss)


def _finish(loss_rows: Tensor, hits: Tensor, plan: RowPlan, reduction: str):
    accuracy = hit_rate(hits, plan.counted)
    if reduction != "none":
        return _flag_dropped_rows(reduce_loss(loss_rows, plan.counted, reduction), plan), accuracy
    if plan.row_count is not None:
        # The [num_masked] shape depends on the mask: this is the one path that reads the count on
        # the host (mean and sum never do).
        count = int(plan.row_count)
        if count > loss_rows.shape[0]:
            raise ValueError(f"masked_lm_cross_entropy: mask selects {count} rows, more than "
                             f"max_masked_per_image allows ({loss_rows.shape[0]} in all)")
        loss_rows = loss_rows[:count]
    return loss_rows, accuracy


# ---------------------------------------------------------------------------------------------------
# fused backends: two implementations of lm_cross_entropy_chunked under two custom ops.
#
# `lm_cross_entropy_reduced` (mean/sum with gradients): the chunked op computes the gradient of the
# reduced loss in the forward, for grad_output = 1; the backward scales it in place. The scale of a row
# (1 / count for mean) is a device tensor, so no sync either.
# `lm_cross_entropy_rows` (reduction "none", or no gradient needed): forward only; its backward reruns
# the chunked op with the incoming per-row gradients as the row scales.


def _chunked(backend, hidden, weight, bias, row_labels, source_rows, row_count, row_scale, ignore_index,
             dtype):
    """``lm_cross_entropy_chunked`` of ``backend`` on an ``[M, D]`` or ``[B, N, D]`` hidden: per-row loss
    and hits, and with ``row_scale`` the gradients of ``sum(row_scale * loss_rows)`` (else empty)."""
    h3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    if backend == "triton":
        # Imported here so `import beitfast` does not load Triton.
        from ..kernels.cross_entropy import lm_cross_entropy_chunked
    else:
        lm_cross_entropy_chunked = torch.ops.beitfast.lm_cross_entropy_chunked
    chunk = rows_per_chunk(row_labels.shape[0], weight.shape[0], dtype.itemsize)
    loss_rows, hits, grad_hidden, grad_weight, grad_bias = lm_cross_entropy_chunked(
        h3, weight, bias, row_labels, source_rows, row_count, row_scale, ignore_index, dtype, chunk
    )
    if row_scale is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    return loss_rows, hits, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("beitfast::lm_cross_entropy_reduced", mutates_args=())
def _fused_reduced(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], row_labels: Tensor, source_rows: Optional[Tensor],
    row_count: Optional[Tensor], row_scale: Tensor, ignore_index: int, dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(sum(row_scale * loss_rows), hits, dloss/dhidden, dloss/dweight, dloss/dbias)``."""
    _count_invalid_labels(row_labels, ignore_index, weight.shape[0])
    loss_rows, hits, grad_hidden, grad_weight, grad_bias = _chunked(
        backend, hidden, weight, bias, row_labels, source_rows, row_count, row_scale, ignore_index, dtype
    )
    return loss_rows.sum() * row_scale, hits, grad_hidden, grad_weight, grad_bias


@_fused_reduced.register_fake
def _(hidden, weight, bias, row_labels, source_rows, row_count, row_scale, ignore_index, dtype, backend):
    grad_bias = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0, dtype=torch.float32)
    return (
        hidden.new_empty((), dtype=torch.float32), row_labels.new_empty(row_labels.shape, dtype=torch.bool),
        hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias,
    )


def _reduced_setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.scaled = False
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])
    # The gradient outputs get no gradient: no [B, N, D] and [V, D] zeros for them in the backward.
    ctx.set_materialize_grads(False)


def _reduced_backward(ctx, grad_loss, *_):
    # In place: a copy of dhidden ([B, N, D]) and dweight would double the gradients' memory.
    if ctx.scaled:
        raise RuntimeError(
            "masked_lm_cross_entropy: the fused backends scale their saved gradient in place, so their "
            "graph cannot be backpropagated twice (retain_graph); use backend='eager' for that"
        )
    ctx.scaled = True
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    grad_hidden.mul_(grad_loss)
    grad_weight.mul_(grad_loss)
    if ctx.has_bias:
        grad_bias.mul_(grad_loss)
    return (
        grad_hidden, grad_weight, grad_bias if ctx.has_bias else None,
        None, None, None, None, None, None, None,
    )


_fused_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)


@torch.library.custom_op("beitfast::lm_cross_entropy_rows", mutates_args=())
def _fused_rows(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], row_labels: Tensor, source_rows: Optional[Tensor],
    row_count: Optional[Tensor], ignore_index: int, dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor]:
    """Per-row loss ``[R]`` and argmax hit ``[R]``, no gradient work."""
    _count_invalid_labels(row_labels, ignore_index, weight.shape[0])
    loss_rows, hits, *_ = _chunked(
        backend, hidden, weight, bias, row_labels, source_rows, row_count, None, ignore_index, dtype
    )
    return loss_rows, hits


@_fused_rows.register_fake
def _(hidden, weight, bias, row_labels, source_rows, row_count, ignore_index, dtype, backend):
    loss_rows = hidden.new_empty(row_labels.shape, dtype=torch.float32)
    return loss_rows, row_labels.new_empty(row_labels.shape, dtype=torch.bool)


def _rows_setup_context(ctx, inputs, output):
    hidden, weight, bias, row_labels, source_rows, row_count, ignore_index, dtype, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, row_labels, source_rows, row_count)
    ctx.ignore_index, ctx.dtype, ctx.backend = ignore_index, dtype, backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _rows_backward(ctx, grad_rows, _):
    hidden, weight, bias, row_labels, source_rows, row_count = ctx.saved_tensors
    _, _, grad_hidden, grad_weight, grad_bias = _chunked(
        ctx.backend, hidden, weight, bias, row_labels, source_rows, row_count, grad_rows.float().contiguous(),
        ctx.ignore_index, ctx.dtype,
    )
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None,
            None, None, None, None, None, None)


_fused_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


def _fused(backend, hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image):
    plan = plan_rows(labels, mask, ignore_index, weight.shape[0], max_masked_per_image)
    dtype = compute_dtype(hidden)
    args = (hidden, weight, bias, plan.row_labels, plan.source_rows, plan.row_count)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if reduction == "none" or not needs_grad:
        loss_rows, hits = _fused_rows(*args, ignore_index, dtype, backend)
        return _finish(loss_rows, hits, plan, reduction)
    if reduction == "mean":
        row_scale = plan.counted.sum().clamp(min=1).float().reciprocal()
    else:
        row_scale = torch.ones((), device=hidden.device)
    loss, hits, *_ = _fused_reduced(*args, row_scale, ignore_index, dtype, backend)
    return _flag_dropped_rows(loss, plan), hit_rate(hits, plan.counted)


def _triton_check(hidden, weight, bias, **_) -> list[str]:
    return (dispatch.unsupported_dtypes(hidden=hidden, weight=weight, bias=bias)
            + dispatch.triton_device_reasons(hidden.device, compute_dtype(hidden)))


@dispatch.register(OP, "triton", _triton_check, dispatch.needs_package("triton"))
def cross_entropy_triton(hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image):
    return _fused("triton", hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image)


def _cuda_check(hidden, weight, bias, **_) -> list[str]:
    reasons = dispatch.unsupported_dtypes(hidden=hidden, weight=weight, bias=bias)
    if hidden.device.type != "cuda":
        reasons.append(f"needs CUDA tensors, got {hidden.device}")
    return reasons


@dispatch.register(OP, "cuda", _cuda_check, _ext.available("lm_cross_entropy_chunked", "cuda"))
def cross_entropy_cuda(hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image):
    return _fused("cuda", hidden, weight, bias, labels, mask, ignore_index, reduction, max_masked_per_image)
