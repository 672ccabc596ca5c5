"""Attention with BEiT's learnable relative position bias: ``softmax(q k^T * scale + B) v`` where
``B[h, i, j] = bias_table[rel_index[i, j], h]``.

The bias is a dense ``[H, P, P]`` tensor (``P = padded_size(N)``, zero padding) gathered from the
table: in fp32 by :func:`relative_position_bias` for the backends that read a dense bias, and by the
``triton`` launcher straight into the compute dtype when it is given the table (no fp32 copy). The
backward folds the fp32 score gradient into the table with a permutation computed once per index and
cached; a model with a shared table gathers it once per step and passes ``bias=``, so autograd sums
all layers' score gradients before one fold.

The eager backend is the definition. The others: ``blas`` (the CPU default: batched matmuls with the
scale and bias folded in and a hand-written backward), ``triton`` (our flash kernels,
``beitfast/kernels/attention.py``: dense bias tiles in the compute dtype, a backward parallel over key
and query blocks without atomics, the model's packed qkv layout),
``sdpa`` (the bias as ``attn_mask``, what timm and transformers do), ``flex``
(FlexAttention with the bias as a ``score_mod``), ``xformers`` and ``flash`` (flash-attn, calls
without bias only) when those packages are installed.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import dispatch

OP = "attention"
# The dense bias is padded to a multiple of the largest kernel tile, so every tile reads inside it.
LARGEST_TILE = 128


def padded_size(n: int) -> int:
    """``P`` of the dense ``[H, P, P]`` bias for sequences of ``n`` tokens."""
    return -(-n // LARGEST_TILE) * LARGEST_TILE


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    rel_index: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v`` (``[B, H, N, D]``) with the bias ``bias_table[rel_index]``.

    ``bias_table`` is ``[R, H]``, ``rel_index`` an integer ``[N, N]`` tensor with values in
    ``[0, R)``. Instead of them, ``bias`` may give the dense bias: ``[H, N, N]``, or ``[H, M, M]``
    (``M >= N``) whose leading ``[N, N]`` block is used, as :func:`relative_position_bias` returns.
    No bias at all means plain attention. ``scale`` (finite, > 0) defaults to ``D ** -0.5``. Returns
    ``[B, H, N, D]``; differentiable in ``q``, ``k``, ``v`` and the bias (table).
    """
    _validate(q, k, v)
    _check_bias(q, bias_table, rel_index, bias)
    scale = _scale(q, scale)
    impl = _select(backend, q, k, v, bias_table, rel_index, bias, scale)
    if bias_table is not None and impl.name in _TABLE:
        return _TABLE[impl.name](q, k, v, bias_table, rel_index, scale)
    return impl.fn(q, k, v, _dense(bias_table, rel_index, bias), scale)


def rel_pos_attention_packed(
    qkv: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    rel_index: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`rel_pos_attention` of q, k, v packed as the model's qkv projection makes them:
    ``qkv`` is ``[B, N, 3, H, D]`` (any strides); returns ``[B, N, H, D]``. The triton backend reads
    ``qkv`` in place, writes the output in this layout and the gradient of ``qkv`` packed (no copies);
    so does blas; the others run on the unpacked views.
    """
    _tensor("rel_pos_attention_packed", "qkv", qkv, "a [B, N, 3, H, D] tensor")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"rel_pos_attention_packed: qkv must be a [B, N, 3, H, D] tensor, got {tuple(qkv.shape)}")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    _validate(q, k, v)
    _check_bias(q, bias_table, rel_index, bias)
    scale = _scale(q, scale)
    impl = _select(backend, q, k, v, bias_table, rel_index, bias, scale)
    if bias_table is not None and impl.name in _TABLE_PACKED:
        return _TABLE_PACKED[impl.name](qkv, bias_table, rel_index, scale)
    bias = _dense(bias_table, rel_index, bias)
    if impl.name in _PACKED:
        return _PACKED[impl.name](qkv, bias, scale)
    return impl.fn(q, k, v, bias, scale).transpose(1, 2)


def _select(backend, q, k, v, bias_table, rel_index, bias, scale):
    return dispatch.select(
        OP, backend, q=q, k=k, v=v, bias_table=bias_table, rel_index=rel_index, bias=bias, scale=scale
    )


def _scale(q, scale):
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"rel_pos_attention: scale must be a number or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"rel_pos_attention: scale must be a finite number > 0, got {scale}")
    return float(scale)


def _validate(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor("rel_pos_attention", name, t, "a [B, H, N, D] tensor")
        if t.dim() != 4:
            raise ValueError(f"rel_pos_attention: {name} must be a [B, H, N, D] tensor, got {tuple(t.shape)}")
        if t.shape[-1] == 0:
            raise ValueError(f"rel_pos_attention: {name} must have a head dim D > 0, got {tuple(t.shape)}")
        if t.dtype not in dispatch.FLOAT_DTYPES:
            raise TypeError(
                f"rel_pos_attention: {name} must be float64/float32/float16/bfloat16, got {t.dtype}"
            )
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "rel_pos_attention: q, k and v must have the same [B, H, N, D] shape, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("rel_pos_attention: q, k and v must share dtype and device")


def _tensor(op: str, name: str, value, expected: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")


def _dense(bias_table, rel_index, bias):
    """The dense bias the backends without a table path read (None for plain attention)."""
    if bias is not None or bias_table is None:
        return bias
    return gather_bias(bias_table, rel_index)  # checked by _check_bias


def _check_bias(q, bias_table, rel_index, bias) -> None:
    """Checks the bias arguments (a dense ``bias``, or ``bias_table`` and ``rel_index``)."""
    _, H, N, _ = q.shape
    if bias is not None:
        if bias_table is not None or rel_index is not None:
            raise ValueError("rel_pos_attention: give bias, or bias_table and rel_index, not both")
        _tensor("rel_pos_attention", "bias", bias, "a [H, M, M] tensor")
        if bias.dim() != 3 or bias.shape[0] != H or bias.shape[1] != bias.shape[2] or bias.shape[1] < N:
            raise ValueError(f"rel_pos_attention: bias must be [H={H}, M, M] with M >= N={N}, got {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"rel_pos_attention: bias must be floating point, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"rel_pos_attention: bias must be on q's device {q.device}, got {bias.device}")
        return
    if (bias_table is None) != (rel_index is None):
        raise ValueError("rel_pos_attention: give both bias_table and rel_index, or neither")
    if bias_table is None:
        return
    _tensor("rel_pos_attention", "bias_table", bias_table, f"an [R, H={H}] tensor")
    _tensor("rel_pos_attention", "rel_index", rel_index, f"an integer [N, N] = [{N}, {N}] tensor")
    if bias_table.dim() != 2 or bias_table.shape[1] != H:
        raise ValueError(f"rel_pos_attention: bias_table must be [R, H={H}], got {tuple(bias_table.shape)}")
    if bias_table.device != q.device:
        raise ValueError(f"rel_pos_attention: bias_table must be on q's device {q.device}, got {bias_table.device}")
    if tuple(rel_index.shape) != (N, N):
        raise ValueError(
            f"rel_pos_attention: rel_index must be [N, N] = [{N}, {N}], got {tuple(rel_index.shape)}"
        )
    _check_table(bias_table, rel_index)


# ---------------------------------------------------------------------------------------------------
# the dense bias: gathered from the table, its gradient folded back with a cached permutation


def relative_position_bias(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """``bias[h, i, j] = bias_table[rel_index[i, j], h]`` as a dense fp32 (float64 for a float64
    table) ``[H, P, P]`` tensor,
    ``P = padded_size(N)``, zero outside ``[N, N]``; differentiable in ``bias_table``.

    Gather it once and pass it as ``bias=`` to every layer that shares the table: autograd then sums
    the layers' gradients before the one fold into the table.
    """
    _check_table(bias_table, rel_index)
    return gather_bias(bias_table, rel_index)


def _check_table(bias_table: torch.Tensor, rel_index: torch.Tensor) -> None:
    _tensor("relative_position_bias", "bias_table", bias_table, "an [R, H] tensor")
    _tensor("relative_position_bias", "rel_index", rel_index, "an integer [N, N] tensor")
    if bias_table.dim() != 2:
        raise ValueError(f"relative_position_bias: bias_table must be [R, H], got {tuple(bias_table.shape)}")
    if not bias_table.dtype.is_floating_point:
        raise TypeError(f"relative_position_bias: bias_table must be floating point, got {bias_table.dtype}")
    if rel_index.dim() != 2 or rel_index.shape[0] != rel_index.shape[1]:
        raise ValueError(f"relative_position_bias: rel_index must be [N, N], got {tuple(rel_index.shape)}")
    if rel_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"relative_position_bias: rel_index must be int32 or int64, got {rel_index.dtype}")
    if rel_index.device != bias_table.device:
        raise ValueError(
            f"relative_position_bias: rel_index must be on bias_table's device {bias_table.device}, "
            f"got {rel_index.device}"
        )
    if dispatch.may_inspect_values(rel_index):
        lo, hi = int(rel_index.min()), int(rel_index.max())
        if lo < 0 or hi >= bias_table.shape[0]:
            raise ValueError(
                f"rel_index values must lie in [0, R={bias_table.shape[0]}), got [{lo}, {hi}]"
            )


class _Plan(NamedTuple):
    """What the gather and the fold need of one index, computed once: ``gather`` maps each of the
    ``P * P`` padded positions to its table row (padding to an extra zero row ``R``), ``rows`` each of
    the ``N * N`` positions; ``order`` lists the padded positions grouped by row, ``offsets`` where
    each row's group starts in it (``[R + 1]``)."""

    gather: torch.Tensor
    rows: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor


# id(index) -> (weak reference, version, num_rows, plan); the model's index is one constant buffer.
_PLANS: dict[int, tuple[weakref.ref, int, int, _Plan]] = {}


def _plan(rel_index: torch.Tensor, num_rows: int) -> _Plan:
    entry = _PLANS.get(id(rel_index))
    if entry is not None and entry[0]() is rel_index and entry[1:3] == (rel_index._version, num_rows):
        return entry[3]
    N, P = rel_index.shape[0], padded_size(rel_index.shape[0])
    gather = F.pad(rel_index.long(), (0, P - N, 0, P - N), value=num_rows).reshape(-1)
    # The padding's row R sorts last; counting by index_add_ needs no host sync (bincount would).
    order = torch.sort(gather, stable=True).indices[: N * N]
    counts = torch.zeros(num_rows + 1, dtype=torch.long, device=gather.device)
    counts.index_add_(0, gather, torch.ones_like(gather))
    offsets = F.pad(counts[:num_rows].cumsum(0), (1, 0))
    plan = _Plan(gather, rel_index.long().reshape(-1), order, offsets)
    key = id(rel_index)
    _PLANS[key] = (weakref.ref(rel_index, lambda _: _PLANS.pop(key, None)), rel_index._version, num_rows, plan)
    return plan


def gathered(bias_table: torch.Tensor, rel_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[H, P, P]`` in ``dtype``: the table's rows read per position straight into that dtype (one
    pass, no fp32 copy for a 16-bit one), zero padding. Not differentiable: the callers fold."""
    R, H = bias_table.shape
    P = padded_size(rel_index.shape[0])
    rows = F.pad(bias_table.t().to(dtype), (0, 1))  # [H, R + 1]: row R is the padding's zero
    return rows.index_select(1, _plan(rel_index, R).gather).view(H, P, P)


@torch.library.custom_op("beitfast::gather_bias", mutates_args=())
def gather_bias(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """The dense padded bias of :func:`relative_position_bias` (arguments already checked)."""
    return gathered(bias_table, rel_index, _bias_dtype(bias_table))


@gather_bias.register_fake
def _(bias_table, rel_index):
    P = padded_size(rel_index.shape[0])
    return bias_table.new_empty(bias_table.shape[1], P, P, dtype=_bias_dtype(bias_table))


def _bias_dtype(bias_table):
    """fp32, or float64 for a float64 table (the reference computations)."""
    return torch.promote_types(bias_table.dtype, torch.float32)


@torch.library.custom_op("beitfast::fold_bias_grad", mutates_args=())
def fold_bias_grad(grad: torch.Tensor, rel_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[R, H]``: ``grad[h, i, j]`` summed over the positions ``(i, j)`` that index each row
    (padding ignored), in fp32 (float64 for a float64 gradient), deterministically.

    CPU: one index_add_ of the ``[N, N]`` corner (sequential, so deterministic). Elsewhere: the
    positions permuted into row order once (cached), then a segmented sum, so no atomics and no sort
    per call.
    """
    plan = _plan(rel_index, num_rows)
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return (_fold_scatter if grad.device.type == "cpu" else _fold_sorted)(grad, plan, num_rows)


def _fold_scatter(grad: torch.Tensor, plan: _Plan, num_rows: int) -> torch.Tensor:
    """index_add_ of the ``N * N`` positions into their rows (measured 3x faster on CPU than adding
    the padded positions into a spare row)."""
    H, N = grad.shape[0], math.isqrt(plan.rows.numel())
    corner = grad[:, :N, :N].reshape(H, N * N)
    return corner.new_zeros(H, num_rows).index_add_(1, plan.rows, corner).t().contiguous()


def _fold_sorted(grad: torch.Tensor, plan: _Plan, num_rows: int) -> torch.Tensor:
    """The padded positions permuted into row order, then one segmented sum per row. By offsets: with
    lengths, ``segment_reduce`` checks them with two host synchronisations per call."""
    flat = grad.reshape(grad.shape[0], -1)
    return torch.segment_reduce(flat.t().index_select(0, plan.order), "sum", offsets=plan.offsets, axis=0)


@fold_bias_grad.register_fake
def _(grad, rel_index, num_rows):
    return grad.new_empty(num_rows, grad.shape[0], dtype=torch.promote_types(grad.dtype, torch.float32))


def _gather_setup(ctx, inputs, output):
    bias_table, rel_index = inputs
    ctx.save_for_backward(rel_index)
    ctx.num_rows, ctx.table_dtype = bias_table.shape[0], bias_table.dtype


def _gather_backward(ctx, grad):
    (rel_index,) = ctx.saved_tensors
    return fold_bias_grad(grad, rel_index, ctx.num_rows).to(ctx.table_dtype), None


gather_bias.register_autograd(_gather_backward, setup_context=_gather_setup)


def _leading(bias: torch.Tensor, N: int) -> torch.Tensor:
    """The ``[1, H, N, N]`` bias the dense backends add to their scores."""
    return bias[:, :N, :N].unsqueeze(0)


# ---------------------------------------------------------------------------------------------------
# eager: the definition


@dispatch.register(OP, "eager", dispatch.accepts_all)
def attention_eager(q, k, v, bias, scale):
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + _leading(bias, q.shape[2]).to(scores.dtype)
    return scores.softmax(dim=-1) @ v


# ---------------------------------------------------------------------------------------------------
# triton: our flash kernels reading dense bias tiles (beitfast/kernels/attention.py)

# Any multiple of 8 up to 128 (the kernels pad D to a power of two); the dot products need >= 16.
TRITON_HEAD_DIMS = tuple(range(16, 129, 8))


def _triton_check(q, **_) -> list[str]:
    device_type = q.device.type
    # Under autocast the kernels run in the autocast dtype (see kernels.attention).
    autocast = torch.is_autocast_enabled(device_type)
    run_dtype = torch.get_autocast_dtype(device_type) if autocast else q.dtype
    reasons = dispatch.triton_device_reasons(q.device, q.dtype, run_dtype)
    if q.dtype not in dispatch.FUSED_DTYPES:
        reasons.append(f"triton takes q, k, v in float32/float16/bfloat16, got {q.dtype}")
    D = q.shape[-1]
    if D not in TRITON_HEAD_DIMS:
        reasons.append(f"triton takes head dims that are multiples of 8 from 16 to 128, got {D}")
    return reasons


@dispatch.register(OP, "triton", _triton_check, dispatch.needs_package("triton"))
def attention_triton(q, k, v, bias, scale):
    # Imported here so `import beitfast` does not load Triton; torch.compile traces this import.
    from ..kernels import attention as kernels

    return kernels.attention(q, k, v, bias, scale)


def attention_triton_packed(qkv, bias, scale):
    from ..kernels import attention as kernels

    return kernels.attention_packed(qkv, bias, scale)


def attention_triton_table(q, k, v, bias_table, rel_index, scale):
    """The triton backend given the table: the launcher gathers it straight into the compute dtype
    (a 16-bit ``[H, P, P]``, no fp32 copy and no cast) and folds the fp32 score gradient into it."""
    from ..kernels import attention as kernels

    return kernels.attention(q, k, v, bias_table, scale, rel_index=rel_index)


def attention_triton_table_packed(qkv, bias_table, rel_index, scale):
    from ..kernels import attention as kernels

    return kernels.attention_packed(qkv, bias_table, scale, rel_index=rel_index)


# ---------------------------------------------------------------------------------------------------
# sdpa: PyTorch's scaled_dot_product_attention fed the dense bias


@dispatch.register(OP, "sdpa", dispatch.accepts_all)
def attention_sdpa(q, k, v, bias, scale):
    mask = None if bias is None else _leading(bias, q.shape[2]).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------------
# blas: batched BLAS matmuls with a hand-written backward (the CPU default)


def _blas_check(q, **_) -> list[str]:
    # 16-bit scores would round before the softmax; sdpa and eager take those.
    if q.dtype not in (torch.float32, torch.float64):
        return [f"blas computes in the inputs' dtype and takes float32/float64, got {q.dtype}"]
    if torch.is_autocast_enabled(q.device.type):
        return ["blas does not run under autocast (its matmuls would be 16-bit)"]
    if torch.compiler.is_compiling():
        return ["blas is for eager code: its per-image matmuls into strided outputs would split a compiled graph"]
    return []


class _BlasAttention(torch.autograd.Function):
    """Attention of ``qkv`` in the model's ``[B, N, 3, H, D]`` layout (any strides with a unit last
    one), out ``[B, N, H, D]``: per image, the scores ``scale q k^T`` from one scaled BLAS call on
    the strided heads, then the ``[H, M, M]`` bias added in place and the softmax for the whole
    batch, the probabilities kept for the backward (as SDPA's math path does). The backward is four
    matmuls per image with ``dS = P (dP - rowsum(dO o))``. Every matmul reads and writes the packed
    layouts in place, so neither direction copies q, k, v, the output or their gradients; against
    SDPA's math path on the CPU it also skips scaling q and k, the checks for fully masked rows and
    the separate softmax backward. First derivatives only: for higher ones, ``backend="sdpa"``."""

    @staticmethod
    def forward(ctx, qkv, bias, scale):
        B, N, _, H, D = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [B, H, N, D] views
        scores = qkv.new_empty(B, H, N, N)
        for b in range(B):  # beta=0: baddbmm only scales the product (its first argument is unused)
            torch.baddbmm(scores[b], q[b], k[b].transpose(1, 2), beta=0, alpha=scale, out=scores[b])
        if bias is not None:
            scores.add_(bias[:, :N, :N])
        probs = torch.softmax(scores, dim=-1)
        out = qkv.new_empty(B, N, H, D)
        for b in range(B):
            torch.bmm(probs[b], v[b], out=out[b].transpose(0, 1))
        ctx.save_for_backward(qkv, probs, out)
        ctx.scale = scale
        ctx.bias_like = None if bias is None else (bias.shape, bias.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # in-place, out= matmuls: no graph through the backward
    def backward(ctx, grad_out):
        qkv, probs, out = ctx.saved_tensors
        B, N, _, H, D = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        grad = torch.empty_like(qkv, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_heads = grad_out.transpose(1, 2)  # [B, H, N, D]
        grad_scores = torch.empty_like(probs)
        for b in range(B):
            torch.bmm(grad_heads[b], v[b].transpose(1, 2), out=grad_scores[b])
        rowsum = (grad_out * out).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, N, 1]
        grad_scores.sub_(rowsum).mul_(probs)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            shape, dtype = ctx.bias_like
            grad_bias = grad_scores.new_zeros(shape, dtype=dtype)
            grad_bias[:, :N, :N] = grad_scores.sum(0)
        if grad is not None:
            grad_q, grad_k, grad_v = grad.permute(2, 0, 3, 1, 4)
            for b in range(B):
                torch.bmm(probs[b].transpose(1, 2), grad_heads[b], out=grad_v[b])
                torch.baddbmm(grad_q[b], grad_scores[b], k[b], beta=0, alpha=ctx.scale, out=grad_q[b])
                torch.baddbmm(grad_k[b], grad_scores[b].transpose(1, 2), q[b], beta=0, alpha=ctx.scale,
                              out=grad_k[b])
        return grad, grad_bias, None


@dispatch.register(OP, "blas", _blas_check)
def attention_blas(q, k, v, bias, scale):
    packed = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4)  # [B, N, 3, H, D] view of one copy
    return _BlasAttention.apply(packed, bias, scale).transpose(1, 2)


def attention_blas_packed(qkv, bias, scale):
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return _BlasAttention.apply(qkv, bias, scale)


# ---------------------------------------------------------------------------------------------------
# flex: FlexAttention, bias as a score_mod, compiled


def _flex_available() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "torch.nn.attention.flex_attention is not available in this torch"
    return None


_flex_available.asked_when_needed = True  # importing flex_attention costs 0.3 s: not at `import beitfast`


def _flex_check(q, **_) -> list[str]:
    if q.device.type != "cuda":
        return ["compiled FlexAttention needs a CUDA device"]
    return []


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")


def bias_score_mod(bias: torch.Tensor):
    """The FlexAttention ``score_mod`` adding ``bias[h, i, j]``; the bias is a captured tensor, so
    FlexAttention differentiates through it."""

    def score_mod(score, b, h, i, j):
        return score + bias[h, i, j].to(score.dtype)

    return score_mod


@dispatch.register(OP, "flex", _flex_check, _flex_available)
def attention_flex(q, k, v, bias, scale):
    score_mod = None if bias is None else bias_score_mod(bias)
    return _compiled_flex()(q, k, v, score_mod=score_mod, scale=scale)


# ---------------------------------------------------------------------------------------------------
# xformers: memory-efficient attention with the dense bias


def _xformers_check(q, **_) -> list[str]:
    reasons = []
    if q.device.type != "cuda":
        reasons.append("xformers needs a CUDA device")
    if q.dtype == torch.float32 and q.shape[-1] > 128:
        reasons.append("xformers takes head dims up to 128 in float32")
    return reasons


@dispatch.register(OP, "xformers", _xformers_check, dispatch.needs_package("xformers"))
def attention_xformers(q, k, v, bias, scale):
    import xformers.ops as xops

    attn_bias = None
    if bias is not None:
        B, H, N, _ = q.shape
        # xformers wants the bias's last dim padded to a multiple of 8 in memory.
        padded = (N + 7) // 8 * 8
        attn_bias = q.new_empty(B, H, N, padded)[..., :N]
        attn_bias.copy_(_leading(bias, N).expand(B, H, N, N))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias, scale=scale
    )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# flash: flash-attn, only for calls without bias


def _flash_check(q, bias=None, bias_table=None, **_) -> list[str]:
    reasons = []
    if bias is not None or bias_table is not None:
        reasons.append("flash-attn has no learnable relative position bias")
    if q.device.type != "cuda":
        reasons.append("flash-attn needs a CUDA device")
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash-attn takes float16/bfloat16, got {q.dtype}")
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        reasons.append(f"flash-attn takes head dims that are multiples of 8 up to 256, got {q.shape[-1]}")
    return reasons


@dispatch.register(OP, "flash", _flash_check, dispatch.needs_package("flash_attn", "flash-attn"))
def attention_flash(q, k, v, bias, scale):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)


# The backends with an entry point of their own for the packed layout.
_PACKED = {"triton": attention_triton_packed, "blas": attention_blas_packed}
# Backends that take the table itself (they gather it in the compute dtype and fold its gradient).
_TABLE = {"triton": attention_triton_table}
_TABLE_PACKED = {"triton": attention_triton_table_packed}
