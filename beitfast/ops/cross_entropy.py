"""Masked-token cross-entropy of BEiT's LM head: ``cross_entropy(hidden[mask] @ weight.T + bias,
labels)`` without the fused backends ever holding the ``[M, V]`` logits.

The eager backend is the definition: gather the counted rows, a linear layer in the input dtype,
cross-entropy in float32 (float64 stays float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch

OP = "cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")


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
    """
    _validate(hidden, weight, bias, labels, mask, ignore_index, reduction)
    impl = dispatch.select(
        OP, backend, hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask,
        ignore_index=ignore_index, reduction=reduction,
    )
    loss, accuracy = impl.fn(hidden, weight, bias, labels, mask, ignore_index, reduction)
    return (loss, accuracy) if return_accuracy else loss


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _validate(hidden, weight, bias, labels, mask, ignore_index, reduction) -> None:
    name = "masked_lm_cross_entropy"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in dispatch.FLOAT_DTYPES:
        got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise TypeError(f"{name}: hidden must be a a floating-point (float64/32/16, bfloat16) tensor, got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [V, D], got {_shape(weight)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"{name}: hidden's last dim must equal weight's D={D}, got hidden {tuple(hidden.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"{name}: bias must be [V={V}], got {_shape(bias)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: labels must be int64 or int32, got {labels.dtype}")
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


def reduce_loss(per_row: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce float32 per-row losses (0 on uncounted rows); the mean of nothing is 0, not NaN."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1)


@dispatch.register(OP, "eager", dispatch.accepts_all)
def cross_entropy_eager(hidden, weight, bias, labels, mask, ignore_index, reduction):
    rows, row_labels = select_rows(hidden, labels, mask)
    logits = F.linear(rows, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
    per_row = F.cross_entropy(logits, row_labels.long(), ignore_index=ignore_index, reduction="none")
    counted = row_labels != ignore_index
    with torch.no_grad():
        hits = (logits.argmax(dim=-1) == row_labels) & counted
        accuracy = hits.sum().float() / counted.sum().clamp(min=1)
    return reduce_loss(per_row, counted, reduction), accuracy
