"""Attention with BEiT's learnable relative position bias: ``softmax(q k^T * scale + B) v`` where
``B[h, i, j] = bias_table[rel_index[i, j], h]``.

The eager backend is the definition. The others: ``triton`` (our flash kernel that reads the bias
from the table and learns it, ``beitfast/kernels/attention.py``; its table gradient is deterministic
with ``BEITFAST_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``), ``sdpa`` (the
gathered bias as ``attn_mask``, what timm and transformers do), ``flex`` (FlexAttention with the
bias as a ``score_mod``), ``xformers`` and ``flash`` (flash-attn, calls without bias only) when those
packages are installed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import dispatch

OP = "attention"


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    rel_index: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v`` (``[B, H, N, D]``) with the bias ``bias_table[rel_index]``.

    ``bias_table`` is ``[R, H]``, ``rel_index`` an integer ``[N, N]`` tensor with values in
    ``[0, R)``; both None means plain attention. ``scale`` defaults to ``D ** -0.5``. Returns
    ``[B, H, N, D]``; differentiable in ``q``, ``k``, ``v`` and ``bias_table``.
    """
    _validate(q, k, v, bias_table, rel_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = dispatch.select(
        OP, backend, q=q, k=k, v=v, bias_table=bias_table, rel_index=rel_index, scale=scale
    )
    return impl.fn(q, k, v, bias_table, rel_index, scale)


def _validate(q, k, v, bias_table, rel_index) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rel_pos_attention: {name} must be a [B, H, N, D] tensor, got {got}")
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
    if (bias_table is None) != (rel_index is None):
        raise ValueError("rel_pos_attention: give both bias_table and rel_index, or neither")
    if bias_table is None:
        return
    _, H, N, _ = q.shape
    if bias_table.dim() != 2 or bias_table.shape[1] != H:
        raise ValueError(
            f"rel_pos_attention: bias_table must be [R, H={H}], got {tuple(bias_table.shape)}"
        )
    if not bias_table.dtype.is_floating_point:
        raise TypeError(f"rel_pos_attention: bias_table must be floating point, got {bias_table.dtype}")
    if tuple(rel_index.shape) != (N, N):
        raise ValueError(
            f"rel_pos_attention: rel_index must be [N, N] = [{N}, {N}], got {tuple(rel_index.shape)}"
        )
    if rel_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rel_pos_attention: rel_index must be int32 or int64, got {rel_index.dtype}")
    if bias_table.device != q.device or rel_index.device != q.device:
        raise ValueError("rel_pos_attention: bias_table and rel_index must be on q's device")
    if dispatch.may_inspect_values(rel_index):
        lo, hi = int(rel_index.min()), int(rel_index.max())
        if lo < 0 or hi >= bias_table.shape[0]:
            raise ValueError(
                f"rel_pos_attention: rel_index values must lie in [0, R={bias_table.shape[0]}), "
                f"got [{lo}, {hi}]"
            )


def gathered_bias(bias_table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """The dense ``[H, N, N]`` bias the eager and sdpa backends use."""
    return bias_table[rel_index].permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------------
# eager: the definition


@dispatch.register(OP, "eager", dispatch.accepts_all)
def attention_eager(q, k, v, bias_table, rel_index, scale):
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias_table is not None:
        scores = scores + gathered_bias(bias_table, rel_index).unsqueeze(0).to(scores.dtype)
    return scores.softmax(dim=-1) @ v


# ---------------------------------------------------------------------------------------------------
# triton: our flash kernel reading the bias from the table (beitfast/kernels/attention.py)

# Any multiple of 8 up to 128 (the kernels pad D to a power of two); the dot products need >= 16.
TRITON_HEAD_DIMS = tuple(range(16, 129, 8))
# Batch * heads is the second grid axis, which CUDA limits to 65535.
_TRITON_MAX_BATCH_HEADS = 65535


def _triton_check(q, bias_table, **_) -> list[str]:
    device_type = q.device.type
    # Under autocast the kernels run in the autocast dtype (see kernels.attention.rel_pos_attention).
    autocast = torch.is_autocast_enabled(device_type)
    run_dtype = torch.get_autocast_dtype(device_type) if autocast else q.dtype
    reasons = dispatch.triton_device_reasons(q.device, q.dtype, run_dtype)
    if q.dtype not in dispatch.FUSED_DTYPES:
        reasons.append(f"triton takes q, k, v in float32/float16/bfloat16, got {q.dtype}")
    B, H, _, D = q.shape
    if D not in TRITON_HEAD_DIMS:
        reasons.append(f"triton takes head dims that are multiples of 8 from 16 to 128, got {D}")
    if B * H > _TRITON_MAX_BATCH_HEADS:
        reasons.append(f"triton takes batch * heads up to {_TRITON_MAX_BATCH_HEADS}, got {B * H}")
    return reasons


@dispatch.register(OP, "triton", _triton_check, dispatch.needs_package("triton"))
def attention_triton(q, k, v, bias_table, rel_index, scale):
    # Imported here so `import beitfast` does not load Triton; torch.compile traces this import.
    from ..kernels import attention as kernels

    return kernels.rel_pos_attention(q, k, v, bias_table, rel_index, scale)


# ---------------------------------------------------------------------------------------------------
# sdpa: PyTorch's scaled_dot_product_attention fed the gathered bias


@dispatch.register(OP, "sdpa", dispatch.accepts_all)
def attention_sdpa(q, k, v, bias_table, rel_index, scale):
    mask = None
    if bias_table is not None:
        mask = gathered_bias(bias_table, rel_index).unsqueeze(0).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------------------------------------------
# flex: FlexAttention, bias as a score_mod, compiled


def _flex_available() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return "torch.nn.attention.flex_attention is not available in this torch"
    return None


def _flex_check(q, **_) -> list[str]:
    if q.device.type != "cuda":
        return ["compiled FlexAttention needs a CUDA device"]
    return []


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def bias_score_mod(bias_table: torch.Tensor, rel_index: torch.Tensor):
    """The FlexAttention ``score_mod`` adding ``bias_table[rel_index[i, j], h]``; the table is a
    captured tensor, so FlexAttention differentiates through it."""

    def score_mod(score, b, h, i, j):
        return score + bias_table[rel_index[i, j], h].to(score.dtype)

    return score_mod


@dispatch.register(OP, "flex", _flex_check, _flex_available)
def attention_flex(q, k, v, bias_table, rel_index, scale):
    score_mod = None if bias_table is None else bias_score_mod(bias_table, rel_index)
    return _compiled_flex()(q, k, v, score_mod=score_mod, scale=scale)


# ---------------------------------------------------------------------------------------------------
# xformers: memory-efficient attention with the gathered bias


def _xformers_check(q, **_) -> list[str]:
    reasons = []
    if q.device.type != "cuda":
        reasons.append("xformers needs a CUDA device")
    if q.dtype == torch.float32 and q.shape[-1] > 128:
        reasons.append("xformers takes head dims up to 128 in float32")
    return reasons


@dispatch.register(OP, "xformers", _xformers_check, dispatch.needs_package("xformers"))
def attention_xformers(q, k, v, bias_table, rel_index, scale):
    import xformers.ops as xops

    bias = None
    if bias_table is not None:
        B, H, N, _ = q.shape
        # xformers wants the bias's last dim padded to a multiple of 8 in memory.
        padded = (N + 7) // 8 * 8
        storage = q.new_empty(B, H, N, padded)
        bias = storage[..., :N]
        bias.copy_(gathered_bias(bias_table, rel_index).unsqueeze(0).expand(B, H, N, N))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------
# flash: flash-attn, only for calls without bias


def _flash_check(q, bias_table, **_) -> list[str]:
    reasons = []
    if bias_table is not None:
        reasons.append("flash-attn has no learnable relative position bias")
    if q.device.type != "cuda":
        reasons.append("flash-attn needs a CUDA device")
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"flash-attn takes float16/bfloat16, got {q.dtype}")
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        reasons.append(f"flash-attn takes head dims that are multiples of 8 up to 256, got {q.shape[-1]}")
    return reasons


@dispatch.register(OP, "flash", _flash_check, dispatch.needs_package("flash_attn", "flash-attn"))
def attention_flash(q, k, v, bias_table, rel_index, scale):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    return out.transpose(1, 2)
