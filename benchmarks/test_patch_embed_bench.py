"""Masked patch embedding (conv projection, mask token, cls, position embedding): forward, backward and
forward+backward time and peak memory of the triton, cuda, eager and torch.compile'd eager backends.

BEiT-B projection (768 wide, patch 16), batch 128, 224x224 and 384x384 images, 75 blockwise-masked
patches per image. Two precisions: ``autocast`` (float32 images and parameters under bf16 autocast,
as in training) and ``bf16`` (everything bfloat16). Images need no gradient, as in pre-training.
GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch

from beitfast import MaskingGenerator
from beitfast.ops import dispatch
from beitfast.ops.patch_embed import masked_patch_embed, patch_embed_eager

pytestmark = pytest.mark.gpu

BATCH, DIM, PATCH, NUM_MASKED = 128, 768, 16, 75
BACKENDS = ["triton", "cuda", "eager", "eager-compiled"]
def make_inputs(size: int, precision: str) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    grid = size // PATCH
    on = dict(device="cuda", dtype=dtype)
    params = {
        "weight": torch.randn(DIM, 3, PATCH, PATCH, **on) * 0.02,
        "bias": torch.randn(DIM, **on) * 0.02,
        "mask_token": torch.randn(1, 1, DIM, **on) * 0.02,
        "cls_token": torch.randn(1, 1, DIM, **on) * 0.02,
        "pos_embed": torch.randn(1, grid * grid + 1, DIM, **on) * 0.02,
    }
    for t in params.values():
        t.requires_grad_()
    images = torch.randn(BATCH, 3, size, size, **on)
    mask = MaskingGenerator((grid, grid), NUM_MASKED, seed=0).batch(BATCH).cuda()
    return dict(images=images, mask=mask, **params)


def embed_fn(backend: str):
    if backend == "eager-compiled":
        compiled = torch.compile(patch_embed_eager)
        return lambda i: compiled(i["images"], i["weight"], i["bias"], PATCH, i["mask"], i["mask_token"],
                                  i["cls_token"], i["pos_embed"])
    return lambda i: masked_patch_embed(i["images"], i["weight"], i["bias"], PATCH, mask=i["mask"],
                                        mask_token=i["mask_token"], cls_token=i["cls_token"],
                                        pos_embed=i["pos_embed"], backend=backend)


@pytest.mark.parametrize("precision", ["autocast", "bf16"])
@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed(backend, size, precision, record_result, measure, training_modes):
    inputs = make_inputs(size, precision)
    if backend in dispatch.backends("patch_embed"):
        why = dispatch.explain("patch_embed", patch_size=PATCH, **inputs)[backend]
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")
    embed = embed_fn(backend)
    params = [inputs[n] for n in ("weight", "bias", "mask_token", "cls_token", "pos_embed")]

    def forward():
        with torch.autocast("cuda", torch.bfloat16, enabled=precision == "autocast"):
            return embed(inputs)

    rows = {}
    for mode, fn in training_modes(forward, params):
        ms, peak = measure(fn)
        rows[mode] = ms
        record_result("patch_embed", backend=backend, mode=mode, image_size=size, batch=BATCH, dim=DIM,
               precision=precision, num_masked=NUM_MASKED, ms=ms, peak_memory_bytes=peak,
               triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    assert all(ms > 0 for ms in rows.values())
