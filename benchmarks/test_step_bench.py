"""End-to-end BEiT pre-training step (forward, masked LM loss, backward, AdamW step; tokenizer excluded).

Compared, at BEiT-B and BEiT-L sizes, batch 64/128/256, bf16 autocast: beitfast (auto backends),
beitfast with eager backends, torch.compile'd beitfast, Hugging Face ``BeitForMaskedImageModeling``
(sdpa and eager attention) and a timm-style model (timm's BEiT blocks with an LM head). Reported:
images/s, peak memory and model FLOP utilisation. GPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import beitfast
from beitfast import BEiTConfig, MaskingGenerator, checkpoint

pytestmark = pytest.mark.gpu

# Dense bf16 tensor-core peak, FLOP/s, by GPU name fragment (vendor data sheets, SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
NUM_MASKED = 75


def step_flops(config: BEiTConfig, batch: int, lm_rows_per_image: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), counting matmuls only.

    Per layer and token: qkv 3D^2, proj D^2, MLP 2 * mlp_ratio * D^2 multiply-adds; attention scores
    and values 2 * N * D per token; the patch projection C p^2 D per patch; the LM head D V per
    predicted row (the HF model predicts every patch; ours only the masked ones: each is charged what
    it computes usefully, i.e. the masked rows).
    """
    D, L = config.embed_dim, config.depth
    N = config.num_patches + 1
    per_token = L * ((4 + 2 * config.mlp_ratio) * D * D + 2 * N * D)
    macs = batch * (N * per_token + config.num_patches * config.in_chans * config.patch_size ** 2 * D)
    macs += batch * lm_rows_per_image * D * config.vocab_size
    return 3 * 2 * macs


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class TimmStyleMIM(nn.Module):
    """timm's BEiT blocks under the BEiT pre-training head (mask token, cls, LM head, loss)."""

    def __init__(self, config: BEiTConfig):
        super().__init__()
        import timm

        self.backbone = timm.models.beit.Beit(
            img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
            depth=config.depth, num_heads=config.num_heads, num_classes=0, use_abs_pos_emb=False,
            use_rel_pos_bias=False, use_shared_rel_pos_bias=True, init_values=config.layer_scale_init_value,
            drop_path_rate=config.drop_path_rate,
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size)

    def forward(self, images, mask, labels):
        m = self.backbone
        x = m.patch_embed(images)
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        bias = m.rel_pos_bias()
        for blk in m.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
        x = self.norm(x)[:, 1:]
        return F.cross_entropy(self.lm_head(x[mask]).float(), labels[mask])


def build(variant: str, config: BEiTConfig):
    """A model and a ``loss(images, mask, labels)`` closure for each compared implementation."""
    if variant.startswith("beitfast"):
        kernels = "eager" if variant == "beitfast-eager" else "auto"
        model = beitfast.BEiT(config.replace(kernels=kernels)).cuda()
        run = torch.compile(model) if variant == "beitfast-compiled" else model
        return model, lambda x, m, t: run(x, bool_masked_pos=m, labels=t)
    if variant.startswith("hf"):
        import transformers

        # The same model as ours; hf_config_kwargs turns drop path off (inference), training keeps it.
        hf_kwargs = {**checkpoint.hf_config_kwargs(config, "masked_image_modeling"),
                     "drop_path_rate": config.drop_path_rate}
        hf_config = transformers.BeitConfig(**hf_kwargs, attn_implementation=variant.split("-")[1])
        model = transformers.BeitForMaskedImageModeling(hf_config).cuda()
        return model, lambda x, m, t: model(pixel_values=x, bool_masked_pos=m, labels=t[m]).loss
    if variant == "timm":
        model = TimmStyleMIM(config).cuda()
        return model, model
    raise ValueError(variant)


VARIANTS = ["beitfast", "beitfast-eager", "beitfast-compiled", "hf-sdpa", "hf-eager", "timm"]
SIZES = {"base": BEiTConfig.base, "large": BEiTConfig.large}


def step_closure(loss_fn, model, batch, config):
    """One optimizer step of the recipe on fixed random inputs."""
    gen = MaskingGenerator(config.grid, NUM_MASKED, seed=0)
    images = torch.randn(batch, 3, *config.image_hw, device="cuda")
    masks = gen.batch(batch).cuda()
    labels = torch.randint(0, config.vocab_size, (batch, config.num_patches), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_fn(images, masks, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("batch", [64, 128, 256])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrain_step(variant, size, batch, record_result, measure):
    config = SIZES[size](drop_path_rate=0.1)
    torch.cuda.empty_cache()
    model, loss_fn = build(variant, config)
    try:
        ms, _ = measure(step_closure(loss_fn, model, batch, config), repeats=10, warmup=3)
        peak = torch.cuda.max_memory_allocated()  # the whole step: weights, optimizer state, activations
    except torch.OutOfMemoryError:
        pytest.skip(f"{variant} BEiT-{size} batch {batch} does not fit")
    finally:
        del model
    seconds = ms / 1e3
    peak_fl = peak_flops()
    flops = step_flops(config, batch, NUM_MASKED)
    record_result(
        "pretrain_step", variant=variant, model=f"beit-{size}", batch=batch,
        images_per_s=batch / seconds, step_ms=seconds * 1e3, peak_memory_bytes=peak,
        mfu=(flops / seconds / peak_fl) if peak_fl else None,
    )


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("variant", ["beitfast", "hf-sdpa", "timm"])
def test_largest_batch(variant, size, record_result):
    """The largest batch (powers of two from 64) whose training step fits in GPU memory."""
    config = SIZES[size](drop_path_rate=0.1)
    largest, batch = None, 64
    while batch <= 8192:
        torch.cuda.empty_cache()
        try:
            model, loss_fn = build(variant, config)
            step = step_closure(loss_fn, model, batch, config)
            del model, loss_fn  # the step holds them
            step()
            torch.cuda.synchronize()
            largest = batch
        except torch.OutOfMemoryError:
            break
        finally:
            step = None  # frees the model, its optimizer state and the inputs before the next size
        batch *= 2
    record_result("pretrain_largest_batch", variant=variant, model=f"beit-{size}", largest_batch=largest)
