"""Triton kernels of the masked patch embedding and their launch code.

The projection is a GEMM ``[B*N, C*p*p] @ [C*p*p, D]`` whose A operand is read straight from the
image: row ``m = (b, patch)``, column ``k = (c, ky, kx)``, so pixel ``(b, c, py*p + ky, px*p + kx)``.
The address splits into a per-row part and a per-column part, which makes NCHW and channels-last
images (any strides) cost the same code. No ``[B*N, C*p*p]`` patch matrix is ever materialised, in
either direction.

* forward: one kernel, fp32 accumulation; the epilogue adds the bias, selects the mask token for
  masked rows (their pixels are not even loaded), adds the position embedding and writes the
  ``[B, 1+N, D]`` output once; rows holding an image's first patch also write its cls row.
* backward, weight: ``dW = dY_kept^T @ patches`` reduced over the ``B*N`` rows, split over the rows
  into deterministic fp32 partials (36 output tiles alone would leave most SMs idle); the programs of
  the first K tile also reduce the bias (kept rows) and mask-token (masked rows) gradients from the
  ``dY`` tile they already hold.
* backward, images (only when they need a gradient): ``dY_kept @ W`` stored straight into the image
  layout (patches do not overlap, so col2im is a plain scatter); masked rows get zeros.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(shapes):
    # The interpreter runs one small config (autotuning needs a GPU); on a GPU a few tile shapes compete.
    if _INTERPRETED:
        shapes = (((32, 32, 32), 4, 1),)
    return [
        triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tile)), num_warps=warps, num_stages=stages)
        for tile, warps, stages in shapes
    ]


# ((BLOCK_M, BLOCK_N, BLOCK_K), warps, stages). The compile gate (benchmarks/compile_gate.py) keeps
# this list honest: 128x128x32 w4 and 128x256x64 w8 spilled on sm_90 and were dropped.
_FWD_SHAPES = (((128, 128, 64), 8, 3), ((64, 128, 64), 4, 4), ((128, 64, 64), 4, 4))
# BLOCK_M is the reduction tile here; the row splits are whole multiples of every BLOCK_M listed.
# 32x128x128 w4 spilled on sm_90.
_BWD_WEIGHT_SHAPES = (((64, 128, 128), 8, 3), ((64, 64, 128), 4, 4), ((128, 128, 64), 8, 3))
_SPLIT_ROW_UNIT = 32 if _INTERPRETED else max(tile[0] for tile, _, _ in _BWD_WEIGHT_SHAPES)


@triton.jit
def _patch_rows(offs_m, M, N, GRID_W, s_b, s_h, s_w, P: tl.constexpr):
    """Per-row part of the pixel address (int64) and the (image, patch) of each row."""
    row_ok = offs_m < M
    b = offs_m // N
    t = offs_m % N
    py = t // GRID_W
    px = t % GRID_W
    base = b.to(tl.int64) * s_b + (py * P).to(tl.int64) * s_h + (px * P).to(tl.int64) * s_w
    return row_ok, b, t, base


@triton.jit
def _patch_cols(offs_k, K, s_c, s_h, s_w, P: tl.constexpr):
    """Per-column part of the pixel address: column k is (channel, row in patch, column in patch)."""
    c = offs_k // (P * P)
    r = offs_k % (P * P)
    return offs_k < K, c.to(tl.int64) * s_c + (r // P).to(tl.int64) * s_h + (r % P).to(tl.int64) * s_w


@triton.autotune(configs=_configs(_FWD_SHAPES), key=["D", "K", "HAS_MASK"])
@triton.jit
def _patch_embed_fwd_kernel(
    img, weight, bias, mask, mask_token, cls_token, pos, out,
    M, N, D, K, GRID_W,
    s_ib, s_ic, s_ih, s_iw,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CLS: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # N tiles vary fastest so the programs sharing an A (pixel) tile run together and hit L2.
    num_n = tl.cdiv(D, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    row_ok, b, t, row_base = _patch_rows(offs_m, M, N, GRID_W, s_ib, s_ih, s_iw, P)
    if HAS_MASK:
        masked = tl.load(mask + offs_m, mask=row_ok, other=0) != 0
        keep = row_ok & (masked == 0)
    else:
        keep = row_ok

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok, col_base = _patch_cols(offs_k, K, s_ic, s_ih, s_iw, P)
        # Masked rows are replaced by the mask token: their pixels are never read.
        a = tl.load(img + row_base[:, None] + col_base[None, :], mask=keep[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight + offs_n[None, :] * K + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_MASK:
        token = tl.load(mask_token + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.where(masked[:, None], token[None, :], acc)
    T = N + HAS_CLS
    out_row = b.to(tl.int64) * T + HAS_CLS + t
    if HAS_POS:
        acc += tl.load(pos + (HAS_CLS + t)[:, None] * D + offs_n[None, :],
                       mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out + out_row[:, None] * D + offs_n[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])

    if HAS_CLS:
        # The row of each image's first patch also writes that image's cls row.
        cls_row = tl.load(cls_token + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_POS:
            cls_row += tl.load(pos + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        first = row_ok & (t == 0)
        cls_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + cls_row[None, :]
        tl.store(out + (b.to(tl.int64) * T)[:, None] * D + offs_n[None, :], cls_tile.to(out.dtype.element_ty),
                 mask=first[:, None] & n_ok[None, :])


def _fit_shared_memory(configs, named_args, **_):
    """The weight-gradient configs whose pipelined tiles (``stages`` x (image tile + gradient tile))
    fit the device's shared memory: 128x128x64 with 3 stages fits an H100 (227 KB) but not an A100
    (163 KB) when the images are fp32."""
    if len(configs) == 1:
        return configs
    img, grad = named_args["img"], named_args["grad"]
    limit = torch.cuda.get_device_properties(img.device).shared_memory_per_block_optin

    def tiles(config):
        m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        return config.num_stages * (m * k * img.element_size() + m * n * grad.element_size())

    return [config for config in configs if tiles(config) <= limit] or [min(configs, key=tiles)]


@triton.autotune(configs=_configs(_BWD_WEIGHT_SHAPES), key=["D", "K", "HAS_MASK", "ROWS_PER_SPLIT"],
                 prune_configs_by={"early_config_prune": _fit_shared_memory})
@triton.jit
def _patch_embed_bwd_weight_kernel(
    grad, img, mask, dweight_part, dbias_part, dtoken_part,
    M, N, D, K, GRID_W,
    s_ib, s_ic, s_ih, s_iw,
    ROWS_PER_SPLIT,
    P: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (n tile, k tile, split) owns dW[n tile, k tile] summed over its split's rows.
    num_k = tl.cdiv(K, BLOCK_K)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_n = pid // num_k
    pid_k = pid % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < D
    k_ok, col_base = _patch_cols(offs_k, K, s_ic, s_ih, s_iw, P)
    T = N + HAS_CLS

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dtoken = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_row = split * ROWS_PER_SPLIT
    for m0 in range(first_row, first_row + ROWS_PER_SPLIT, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok, b, t, row_base = _patch_rows(offs_m, M, N, GRID_W, s_ib, s_ih, s_iw, P)
        dy = tl.load(grad + (b.to(tl.int64) * T + HAS_CLS + t)[:, None] * D + offs_n[None, :],
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_MASK:
            masked = tl.load(mask + offs_m, mask=row_ok, other=0) != 0
            keep = row_ok & (masked == 0)
            # Masked rows were replaced: their gradient goes to the mask token, not to W or the bias.
            dtoken += tl.sum(tl.where(masked[:, None], dy, 0.0).to(tl.float32), axis=0)
            dy = tl.where(keep[:, None], dy, 0.0).to(grad.dtype.element_ty)
        else:
            keep = row_ok
        dbias += tl.sum(dy.to(tl.float32), axis=0)
        a = tl.load(img + row_base[:, None] + col_base[None, :], mask=keep[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), a.to(dy.dtype), acc, input_precision="ieee")

    part = split.to(tl.int64) * D * K
    tl.store(dweight_part + part + offs_n[:, None] * K + offs_k[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    # One K tile is enough to hold the row sums; the others computed them in passing.
    sums_ok = n_ok & (pid_k == 0)
    tl.store(dbias_part + split * D + offs_n, dbias, mask=sums_ok)
    if HAS_MASK:
        tl.store(dtoken_part + split * D + offs_n, dtoken, mask=sums_ok)


@triton.autotune(configs=_configs(_FWD_SHAPES), key=["D", "K", "HAS_MASK"])
@triton.jit
def _patch_embed_bwd_images_kernel(
    grad, weight, mask, dimg,
    M, N, D, K, GRID_W,
    s_ib, s_ic, s_ih, s_iw,
    P: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (m tile, k tile) computes dPatches[m tile, k tile] = dY_kept @ W, reducing over D.
    # BLOCK_N tiles the K (pixel) axis here, BLOCK_K the reduction over D.
    num_cols = tl.cdiv(K, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // num_cols
    pid_c = pid % num_cols
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, b, t, row_base = _patch_rows(offs_m, M, N, GRID_W, s_ib, s_ih, s_iw, P)
    c_ok, col_base = _patch_cols(offs_c, K, s_ic, s_ih, s_iw, P)
    if HAS_MASK:
        keep = row_ok & (tl.load(mask + offs_m, mask=row_ok, other=0) == 0)
    else:
        keep = row_ok
    grad_row = b.to(tl.int64) * (N + HAS_CLS) + HAS_CLS + t

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs_d < D
        # Masked rows load zeros, so their pixels get a zero gradient.
        dy = tl.load(grad + grad_row[:, None] * D + offs_d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(weight + offs_d[:, None] * K + offs_c[None, :], mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision="ieee")
    tl.store(dimg + row_base[:, None] + col_base[None, :], acc.to(dimg.dtype.element_ty),
             mask=row_ok[:, None] & c_ok[None, :])


def _geometry(images: torch.Tensor, weight: torch.Tensor, patch_size: int):
    B, C, H, W = images.shape
    N = (H // patch_size) * (W // patch_size)
    return B * N, N, weight.shape[0], C * patch_size * patch_size, W // patch_size


def _mask_bytes(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Triton reads the bool mask as bytes; a dummy pointer stands in when there is none.
    return like if mask is None else mask.reshape(-1).view(torch.uint8)


def patch_embed_forward(images, weight, bias, patch_size, mask, mask_token, cls_token, pos_embed):
    """``[B, (1+)N, D]`` in ``weight``'s dtype; every tensor argument but images/weight may be None."""
    M, N, D, K, grid_w = _geometry(images, weight, patch_size)
    B = images.shape[0]
    has_cls = cls_token is not None
    out = torch.empty((B, N + has_cls, D), device=images.device, dtype=weight.dtype)
    w2d = weight.reshape(D, K).contiguous()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)

    _patch_embed_fwd_kernel[grid](
        images, w2d, w2d if bias is None else bias, _mask_bytes(mask, out),
        w2d if mask_token is None else mask_token.reshape(D),
        w2d if cls_token is None else cls_token.reshape(D),
        w2d if pos_embed is None else pos_embed.reshape(-1, D).contiguous(), out,
        M, N, D, K, grid_w, *images.stride(),
        P=patch_size, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_CLS=has_cls,
        HAS_POS=pos_embed is not None,
    )
    return out


def _row_splits(M: int, D: int, K: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, rows per split) of the weight-gradient reduction over the B*N rows, sized so
    that the programs fill the GPU about twice."""
    units = triton.cdiv(M, _SPLIT_ROW_UNIT)
    if _INTERPRETED:
        # Two splits, so that the tests exercise the partial sums.
        wanted = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(1, 2 * sms // (triton.cdiv(D, 128) * triton.cdiv(K, 128)))
    units_per_split = triton.cdiv(units, min(units, wanted))
    return triton.cdiv(units, units_per_split), units_per_split * _SPLIT_ROW_UNIT


def patch_embed_backward(grad, images, weight, patch_size, mask, has_cls, need_images):
    """Gradients ``(images or None, weight, bias, mask_token or None)``; bias and mask token in fp32.

    ``grad`` is the output gradient ``[B, (1+)N, D]`` (contiguous). The position-embedding and cls
    gradients are plain batch sums of ``grad``; the caller takes them.
    """
    M, N, D, K, grid_w = _geometry(images, weight, patch_size)
    splits, rows_per_split = _row_splits(M, D, K, images.device)
    f32 = dict(device=grad.device, dtype=torch.float32)
    dweight_part = torch.empty((splits, D, K), **f32)
    dbias_part = torch.empty((splits, D), **f32)
    dtoken_part = torch.empty((splits, D), **f32) if mask is not None else dbias_part
    mask_arg = _mask_bytes(mask, grad)

    def weight_grid(meta):
        return (triton.cdiv(D, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), splits)

    _patch_embed_bwd_weight_kernel[weight_grid](
        grad, images, mask_arg, dweight_part, dbias_part, dtoken_part,
        M, N, D, K, grid_w, *images.stride(), rows_per_split,
        P=patch_size, HAS_MASK=mask is not None, HAS_CLS=has_cls,
    )
    dweight = dweight_part.sum(0).to(weight.dtype).reshape(weight.shape)
    dbias = dbias_part.sum(0)
    dtoken = dtoken_part.sum(0) if mask is not None else None

    dimages = None
    if need_images:
        dimages = torch.empty_like(images)
        w2d = weight.reshape(D, K).contiguous()

        def images_grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)

        _patch_embed_bwd_images_kernel[images_grid](
            grad, w2d, mask_arg, dimages, M, N, D, K, grid_w, *dimages.stride(),
            P=patch_size, HAS_MASK=mask is not None, HAS_CLS=has_cls,
        )
    return dimages, dweight, dbias, dtoken
