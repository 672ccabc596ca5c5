"""Masked patch embedding: pixels -> patches -> linear projection -> masked patches replaced by the
mask token -> cls token prepended -> absolute position embedding added.

The eager backend is the definition: conv2d, flatten, the blend ``x * (1 - w) + mask_token * w``,
concatenation of the cls token, addition of the position embedding.

The fused backends (``triton``: ``beitfast/kernels/patch_embed.py``; ``cuda``:
``csrc/patch_embed_cuda.cu``) are ``torch.library`` custom ops, forward and backward each, so
``torch.compile`` keeps them as single nodes. They compute in ``weight``'s dtype, or in the autocast
dtype when autocast is on (as the eager conv2d does): the wrapper casts the small parameters, the
kernels convert the pixels as they load them.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..config import check_int
from . import dispatch

OP = "patch_embed"


def masked_patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Embed ``images`` ``[B, C, H, W]`` with the conv-layout ``weight`` ``[D, C, p, p]``.

    ``mask`` (bool ``[B, N]``, ``N = (H/p)(W/p)`` in row-major patch order) marks patches replaced by
    ``mask_token`` (``[D]``, ``[1, D]`` or ``[1, 1, D]``). ``cls_token`` (same shapes) is prepended;
    ``pos_embed`` (``[1, T, D]`` or ``[T, D]`` with ``T`` the output length) is added last. Returns
    ``[B, N, D]``, or ``[B, 1 + N, D]`` with a cls token, in ``weight``'s dtype.
    """
    patch_size = _validate(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)
    impl = dispatch.select(
        OP, backend, images=images, weight=weight, bias=bias, patch_size=patch_size, mask=mask,
        mask_token=mask_token, cls_token=cls_token, pos_embed=pos_embed,
    )
    return impl.fn(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)


def _validate(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed) -> int:
    """Raise TypeError (not a tensor, wrong dtype) or ValueError (shape, device) naming the argument
    and the expected form; return ``patch_size`` as a Python int (NumPy integers are accepted)."""
    name = "masked_patch_embed"
    floats = "float64/float32/float16/bfloat16"
    for arg, t, optional in (("images", images, False), ("weight", weight, False), ("bias", bias, True),
                             ("mask", mask, True), ("mask_token", mask_token, True),
                             ("cls_token", cls_token, True), ("pos_embed", pos_embed, True)):
        if t is None and optional:
            continue
        wanted = "a bool tensor" if arg == "mask" else f"a {floats} tensor"
        wanted += " or None" if optional else ""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be {wanted}, got {type(t).__name__}")
        if not (t.dtype == torch.bool if arg == "mask" else t.dtype in dispatch.FLOAT_DTYPES):
            raise TypeError(f"{name}: {arg} must be {wanted}, got {t.dtype}")
        if t.device != images.device:
            raise ValueError(f"{name}: {arg} must be on images' device {images.device}, got {t.device}")
    p = check_int(name, "patch_size", patch_size, 1)
    if images.dim() != 4:
        raise ValueError(f"{name}: images must be [B, C, H, W], got {tuple(images.shape)}")
    B, C, H, W = images.shape
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (C, p, p) or weight.shape[0] == 0:
        raise ValueError(
            f"{name}: weight must be [D, C={C}, {p}, {p}] (D >= 1) for {C}-channel images and patch {p}, "
            f"got {tuple(weight.shape)}"
        )
    if H < p or W < p or H % p or W % p:
        raise ValueError(f"{name}: images must be [B, C, H, W] with H and W positive multiples of patch_size; "
                         f"image size {H}x{W} is not divisible by patch_size {p}")
    D = weight.shape[0]
    N = (H // p) * (W // p)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"{name}: bias must be [D={D}], got {tuple(bias.shape)}")
    if mask is not None:
        if tuple(mask.shape) != (B, N):
            raise ValueError(
                f"{name}: mask must be a bool [B, N] = [{B}, {N}] tensor, got {tuple(mask.shape)}")
        if mask_token is None:
            raise ValueError(f"{name}: a mask needs a mask_token")
    for arg, t in (("mask_token", mask_token), ("cls_token", cls_token)):
        if t is not None and tuple(t.shape) not in ((D,), (1, D), (1, 1, D)):
            raise ValueError(
                f"{name}: {arg} must hold D={D} values ([D], [1, D] or [1, 1, D]), got {tuple(t.shape)}")
    if pos_embed is not None:
        T = N + (1 if cls_token is not None else 0)
        if tuple(pos_embed.shape) not in ((1, T, D), (T, D)):
            raise ValueError(
                f"{name}: pos_embed must be [1, {T}, {D}] or [{T}, {D}] (output length x D), "
                f"got {tuple(pos_embed.shape)}"
            )
    return p


@dispatch.register(OP, "eager", dispatch.accepts_all)
def patch_embed_eager(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed):
    D = weight.shape[0]
    x = F.conv2d(images.to(weight.dtype), weight, bias, stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    if mask is not None:
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + mask_token.reshape(1, 1, D).to(x.dtype) * w
    if cls_token is not None:
        x = torch.cat([cls_token.reshape(1, 1, D).to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, -1, D).to(x.dtype)
    return x


# -- fused backends ---------------------------------------------------------------------------------

def _compute_dtype(images: Tensor, weight: Tensor) -> torch.dtype:
    device_type = images.device.type
    if weight.dtype in dispatch.FUSED_DTYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _define_fused(name: str, forward: Callable, backward: Callable) -> Callable:
    """The custom ops ``beitfast::{name}`` and ``beitfast::{name}_backward`` and the backend function.

    ``forward(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)`` returns the
    output; ``backward(grad, images, weight, patch_size, mask, has_cls, need_images)`` returns
    ``(d_images, d_weight, d_bias, d_mask_token)`` with empty tensors for what was not asked for.
    """

    @torch.library.custom_op(f"beitfast::{name}_backward", mutates_args=())
    def backward_op(
        grad: Tensor, images: Tensor, weight: Tensor, patch_size: int, mask: Optional[Tensor],
        has_cls: bool, need_images: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return backward(grad, images, weight, patch_size, mask, has_cls, need_images)

    @backward_op.register_fake
    def _(grad, images, weight, patch_size, mask, has_cls, need_images):
        D = weight.shape[0]
        return (
            torch.empty_like(images) if need_images else images.new_empty(0),
            torch.empty_like(weight),
            weight.new_empty(D, dtype=torch.float32),
            weight.new_empty(D if mask is not None else 0, dtype=torch.float32),
        )

    @torch.library.custom_op(f"beitfast::{name}", mutates_args=())
    def op(
        images: Tensor, weight: Tensor, bias: Optional[Tensor], patch_size: int, mask: Optional[Tensor],
        mask_token: Optional[Tensor], cls_token: Optional[Tensor], pos_embed: Optional[Tensor],
    ) -> Tensor:
        return forward(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)

    @op.register_fake
    def _(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed):
        B, _, H, W = images.shape
        N = (H // patch_size) * (W // patch_size)
        # An int, not a bool: torch 2.11 cannot add a bool to a symbolic size.
        return weight.new_empty((B, N + (1 if cls_token is not None else 0), weight.shape[0]))

    def setup_context(ctx, inputs, output):
        images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed = inputs
        ctx.save_for_backward(images, weight, mask)
        ctx.patch_size = patch_size
        ctx.has_cls = cls_token is not None
        ctx.token_shapes = [None if t is None else t.shape for t in (mask_token, cls_token, pos_embed)]

    def backward_fn(ctx, grad):
        images, weight, mask = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        d_images, d_weight, d_bias, d_token = backward_op(
            grad, images, weight, ctx.patch_size, mask, ctx.has_cls, need[0]
        )
        mask_token_shape, cls_shape, pos_shape = ctx.token_shapes
        dtype = weight.dtype
        d_mask_token = d_token.to(dtype).reshape(mask_token_shape) if need[5] else None
        d_cls = grad[:, 0].sum(0).reshape(cls_shape) if need[6] else None
        d_pos = grad.sum(0).reshape(pos_shape) if need[7] else None
        return (
            d_images if need[0] else None, d_weight if need[1] else None,
            d_bias.to(dtype) if need[2] else None, None, None, d_mask_token, d_cls, d_pos,
        )

    op.register_autograd(backward_fn, setup_context=setup_context)

    def run(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed):
        dtype = _compute_dtype(images, weight)
        cast = [None if t is None else t.to(dtype) for t in (weight, bias, mask_token, cls_token, pos_embed)]
        # The kernels index the small tensors as dense arrays (no-ops for parameters and masks).
        weight, bias, mask_token, cls_token, pos_embed = [None if t is None else t.contiguous() for t in cast]
        mask = None if mask is None else mask.contiguous()
        return op(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)

    return run


def _triton_check(images, weight, **_) -> list[str]:
    return (dispatch.unsupported_dtypes(images=images, weight=weight)
            + dispatch.triton_device_reasons(images.device, images.dtype, _compute_dtype(images, weight)))


@functools.cache
def _triton_kernels():
    return importlib.import_module("beitfast.kernels.patch_embed")


def _triton_forward(*args):
    return _triton_kernels().patch_embed_forward(*args)


def _triton_backward(grad, images, weight, patch_size, mask, has_cls, need_images):
    d_images, d_weight, d_bias, d_token = _triton_kernels().patch_embed_backward(
        grad, images, weight, patch_size, mask, has_cls, need_images
    )
    empty = grad.new_empty(0, dtype=torch.float32)
    return (
        images.new_empty(0) if d_images is None else d_images, d_weight, d_bias,
        empty if d_token is None else d_token,
    )


dispatch.register(OP, "triton", _triton_check, dispatch.needs_package("triton"))(
    _define_fused("patch_embed_triton", _triton_forward, _triton_backward)
)


def _cuda_check(images, weight, **_) -> list[str]:
    reasons = dispatch.unsupported_dtypes(images=images, weight=weight)
    if images.device.type != "cuda":
        reasons.append(f"needs CUDA tensors, got {images.device}")
    return reasons


def _cuda_forward(*args):
    return torch.ops.beitfast.patch_embed_fwd_cuda(*args)


def _cuda_backward(*args):
    return tuple(torch.ops.beitfast.patch_embed_bwd_cuda(*args))


dispatch.register(OP, "cuda", _cuda_check, _ext.available("patch_embed_fwd_cuda", "cuda"))(
    _define_fused("patch_embed_cuda", _cuda_forward, _cuda_backward)
)
