"""Masked patch embedding (conv projection, mask token, cls, position embedding): forward, backward and
forward+backward time and peak memory of the triton, cuda, eager and torch.compile'd eager backends.

BEiT-B projection (768 wide, patch 16), batch 128, 224x224 and 384x384 images, 75 blockwise-masked
patches per image. Two precisions: ``autocast`` (float32 images and parameters under bf16 autocast,
as in training) and ``bf16`` (everything bfloat16). Images need no gradient, as in pre-training.
On a GPU; ``--smoke`` runs tiny shapes on the CPU (no timing claims).
"""

from __future__ import annotations

import os

import pytest
import torch

from beitfast import MaskingGenerator
from beitfast.ops import dispatch
from beitfast.ops.patch_embed import masked_patch_embed, patch_embed_eager

SHAPES = {"full": dict(batch=128, dim=768, patch=16, num_masked=75),
          "smoke": dict(batch=2, dim=32, patch=8, num_masked=3)}
BACKENDS = ["triton", "cuda", "eager", "eager-compiled"]


def make_inputs(size: int, precision: str, device: torch.device, shape: dict) -> dict:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dim, patch = shape["dim"], shape["patch"]
    grid = size // patch
    on = dict(device=device, dtype=dtype)
    params = {
        "weight": torch.randn(dim, 3, patch, patch, **on) * 0.02,
        "bias": torch.randn(dim, **on) * 0.02,
        "mask_token": torch.randn(1, 1, dim, **on) * 0.02,
        "cls_token": torch.randn(1, 1, dim, **on) * 0.02,
        "pos_embed": torch.randn(1, grid * grid + 1, dim, **on) * 0.02,
    }
    for t in params.values():
        t.requires_grad_()
    images = torch.randn(shape["batch"], 3, size, size, **on)
    mask = MaskingGenerator((grid, grid), shape["num_masked"], seed=0).batch(shape["batch"]).to(device)
    return dict(images=images, mask=mask, **params)


def embed_fn(backend: str, patch: int, smoke: bool):
    if backend == "eager-compiled":
        compiled = torch.compile(patch_embed_eager, **({"backend": "eager"} if smoke else {}))
        return lambda i: compiled(i["images"], i["weight"], i["bias"], patch, i["mask"], i["mask_token"],
                                  i["cls_token"], i["pos_embed"])
    return lambda i: masked_patch_embed(i["images"], i["weight"], i["bias"], patch, mask=i["mask"],
                                        mask_token=i["mask_token"], cls_token=i["cls_token"],
                                        pos_embed=i["pos_embed"], backend=backend)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
@pytest.mark.parametrize("size", [224, 384])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed(backend, size, precision, mode, bench_device, smoke, record_result, measure,
                     training_modes):
    if smoke and (size, precision) != (224, "autocast"):
        pytest.skip("smoke mode runs one tiny configuration per backend")
    shape = SHAPES["smoke" if smoke else "full"]
    image_size = 32 if smoke else size
    inputs = make_inputs(image_size, precision, bench_device, shape)
    if backend in dispatch.backends("patch_embed"):
        why = dispatch.explain("patch_embed", patch_size=shape["patch"], **inputs)[backend]
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")
    embed = embed_fn(backend, shape["patch"], smoke)
    params = [inputs[n] for n in ("weight", "bias", "mask_token", "cls_token", "pos_embed")]

    def forward():
        with torch.autocast(bench_device.type, torch.bfloat16, enabled=precision == "autocast"):
            return embed(inputs)

    ms, peak = measure(dict(training_modes(forward, params))[mode])
    record_result("patch_embed", backend=backend, mode=mode, image_size=image_size, batch=shape["batch"],
                  dim=shape["dim"], precision=precision, num_masked=shape["num_masked"], ms=ms,
                  peak_memory_bytes=peak, triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    assert ms > 0
