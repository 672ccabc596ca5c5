"""Masked patch embedding: pixels -> patches -> linear projection -> masked patches replaced by the
mask token -> cls token prepended -> absolute position embedding added.

The eager backend is the definition: conv2d, flatten, the blend ``x * (1 - w) + mask_token * w``,
concatenation of the cls token, addition of the position embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    _validate(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)
    impl = dispatch.select(
        OP, backend, images=images, weight=weight, bias=bias, patch_size=patch_size, mask=mask,
        mask_token=mask_token, cls_token=cls_token, pos_embed=pos_embed,
    )
    return impl.fn(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed)


def _validate(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed) -> None:
    name = "masked_patch_embed"
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: images must be [B, C, H, W], got {got}")
    if images.dtype not in dispatch.FLOAT_DTYPES:
        raise TypeError(f"{name}: images must be a floating-point (float64/32/16, bfloat16), got {images.dtype}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"{name}: patch_size must be a positive int, got {patch_size!r}")
    B, C, H, W = images.shape
    p = patch_size
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (C, p, p):
        raise ValueError(
            f"{name}: weight must be [D, C={C}, {p}, {p}] for {C}-channel images and patch {p}, "
            f"got {tuple(weight.shape)}"
        )
    if H % p or W % p:
        raise ValueError(f"{name}: image size {H}x{W} is not divisible by patch_size {p}")
    D = weight.shape[0]
    N = (H // p) * (W // p)
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"{name}: bias must be [D={D}], got {tuple(bias.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, N):
            raise ValueError(
                f"{name}: mask must be a bool [B, N] = [{B}, {N}] tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        if mask_token is None:
            raise ValueError(f"{name}: a mask needs a mask_token")
    for arg, t in (("mask_token", mask_token), ("cls_token", cls_token)):
        if t is not None and (t.numel() != D or t.shape[-1] != D):
            raise ValueError(f"{name}: {arg} must hold D={D} values ([D] or [1, 1, D]), got {tuple(t.shape)}")
    if pos_embed is not None:
        T = N + (cls_token is not None)
        if pos_embed.shape[-1] != D or pos_embed.numel() != T * D or pos_embed.dim() not in (2, 3):
            raise ValueError(
                f"{name}: pos_embed must be [1, {T}, {D}] (output length x D), got {tuple(pos_embed.shape)}"
            )
    for arg, t in (("weight", weight), ("bias", bias), ("mask", mask), ("mask_token", mask_token),
                   ("cls_token", cls_token), ("pos_embed", pos_embed)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, images on {images.device}")


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
