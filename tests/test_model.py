"""The eager BEiT model: shapes, the forward contract, the semantics of each piece, bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beitfast import BEiT, BEiTConfig, MaskingGenerator
from beitfast.model import relative_position_index


def small_config(**overrides):
    values = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, vocab_size=50,
                  drop_path_rate=0.0, kernels="eager")
    values.update(overrides)
    return BEiTConfig(**values)


def random_masks(batch, grid, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    order = torch.rand(batch, n, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    return mask


def randomise(model):
    """Non-trivial values everywhere (zero tables and unit norms hide bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_presets():
    for preset, dims in [(BEiTConfig.tiny, (192, 12, 3)), (BEiTConfig.small, (384, 12, 6)),
                         (BEiTConfig.base, (768, 12, 12)), (BEiTConfig.large, (1024, 24, 16))]:
        c = preset()
        assert (c.embed_dim, c.depth, c.num_heads) == dims
        assert c.vocab_size == 8192 and c.mlp_ratio == 4.0 and c.patch_size == 16
    assert BEiTConfig.base().layer_scale_init_value == 0.1
    assert BEiTConfig.large().layer_scale_init_value == 1e-5
    assert BEiTConfig.base(num_classes=10).num_classes == 10


def test_config_errors():
    with pytest.raises(ValueError, match="img_size must be a multiple of patch_size: 225x225 is not divisible by"):
        BEiTConfig(img_size=225)
    with pytest.raises(ValueError, match="embed_dim must be a multiple of num_heads: 100 is not divisible by 3"):
        BEiTConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="exclude each other: they must not both be True"):
        BEiTConfig(use_rel_pos_bias=True, use_shared_rel_pos_bias=True)
    with pytest.raises(ValueError, match="unknown fields"):
        BEiTConfig.from_dict({"embed_dim": 8, "bogus": 1})


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        # the values of the issue, each accepted before and failing deep in torch or giving constant weights
        ("img_size", 0, ValueError, r"img_size must be an int >= 1 or a \(height, width\) pair of ints >= 1, got 0"),
        ("depth", 2.5, TypeError, r"depth must be an int >= 1, got 2.5 \(float\)"),
        ("mlp_ratio", -1, ValueError, r"mlp_ratio must be a number > 0, got -1"),
        ("in_chans", 0, ValueError, r"in_chans must be an int >= 1, got 0"),
        ("init_std", -0.02, ValueError, r"init_std must be a number > 0, got -0.02"),
        ("init_std", 0.0, ValueError, r"init_std must be a number > 0, got 0.0"),
        # and the other fields
        ("img_size", (224,), ValueError, r"img_size must be .* pair of ints >= 1, got \(224,\)"),
        ("img_size", (224, 224.5), TypeError, r"img_size must be .*, got \(224, 224.5\)"),
        ("img_size", "224", TypeError, r"img_size must be an int >= 1 or .*, got '224'"),
        ("patch_size", 16.0, TypeError, r"patch_size must be an int >= 1, got 16.0"),
        ("patch_size", True, TypeError, r"patch_size must be an int >= 1, got True"),
        ("embed_dim", -12, ValueError, r"embed_dim must be an int >= 1, got -12"),
        ("num_heads", 0, ValueError, r"num_heads must be an int >= 1, got 0"),
        ("vocab_size", -1, ValueError, r"vocab_size must be an int >= 0, got -1"),
        ("num_classes", 1.5, TypeError, r"num_classes must be an int >= 0, got 1.5"),
        ("mlp_ratio", float("nan"), ValueError, r"mlp_ratio must be a number > 0, got nan"),
        ("mlp_ratio", "4", TypeError, r"mlp_ratio must be a number > 0, got '4' \(str\)"),
        ("mlp_ratio", 0.001, ValueError, r"embed_dim \* mlp_ratio must give the MLP at least one unit"),
        ("use_abs_pos_emb", "no", TypeError, r"use_abs_pos_emb must be True or False, got 'no'"),
        ("use_mean_pooling", 1, TypeError, r"use_mean_pooling must be True or False, got 1"),
        ("layer_scale_init_value", -0.1, ValueError, r"layer_scale_init_value must be a number >= 0, got -0.1"),
        ("drop_path_rate", 1.0, ValueError, r"drop_path_rate must be a number in \[0, 1\), got 1.0"),
        ("init_scale", float("inf"), ValueError, r"init_scale must be a number >= 0, got inf"),
        ("layer_norm_eps", 0, ValueError, r"layer_norm_eps must be a number > 0, got 0"),
        ("kernels", "trtion", ValueError, r"kernels must be one of \['auto', .*'eager'.*'triton'.*\], got 'trtion'"),
        ("kernels", None, TypeError, r"kernels must be one of .*, got None"),
    ],
)
def test_config_rejects_each_bad_field(field, value, error, message):
    with pytest.raises(error, match=f"^BEiTConfig: {message}"):
        BEiTConfig(**{field: value})
    with pytest.raises(error, match=f"^BEiTConfig: {message}"):
        BEiT(small_config(), **{field: value})


def test_config_accepts_numpy_scalars_as_plain_python_values():
    config = BEiTConfig(img_size=(np.int64(32), np.int32(48)), patch_size=np.int64(16), depth=np.uint8(2),
                        mlp_ratio=np.float32(2.0), use_abs_pos_emb=np.bool_(True), drop_path_rate=np.float64(0))
    assert config.to_dict() == BEiTConfig(img_size=(32, 48), patch_size=16, depth=2, mlp_ratio=2.0,
                                          use_abs_pos_emb=True, drop_path_rate=0.0).to_dict()
    assert type(config.patch_size) is int and type(config.mlp_ratio) is float and type(config.img_size[0]) is int
    json.dumps(config.to_dict())  # a checkpoint's model_config is JSON


def test_config_changed_after_construction_is_checked_by_the_model():
    config = small_config()
    config.depth = 2.5
    with pytest.raises(TypeError, match="BEiTConfig: depth must be an int >= 1, got 2.5"):
        BEiT(config)
    with pytest.raises(TypeError, match="BEiT: config must be a BEiTConfig or None, got dict"):
        BEiT({"depth": 2})
    with pytest.raises(ValueError, match=r"BEiTConfig.replace: unknown fields \['dpeth'\]; known: \['img_size'"):
        BEiT(small_config(), dpeth=2)


def test_base_parameter_count():
    # BEiT-B with the 8192-token LM head and a shared 732x12 table: 86.5M backbone + 6.3M head.
    model = BEiT(BEiTConfig.base())
    n = sum(p.numel() for p in model.parameters())
    backbone = n - model.lm_head.weight.numel() - model.lm_head.bias.numel()
    assert 85e6 < backbone < 87.5e6
    assert model.rel_pos_bias.relative_position_bias_table.shape == (732, 12)


def test_relative_position_index_matches_definition():
    wh, ww = 3, 4
    index = relative_position_index((wh, ww))
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    n = wh * ww
    assert index.shape == (n + 1, n + 1)
    assert index[0, 0] == rows - 1 and (index[0, 1:] == rows - 3).all() and (index[1:, 0] == rows - 2).all()
    for a in range(n):
        for b in range(n):
            dy = a // ww - b // ww + wh - 1
            dx = a % ww - b % ww + ww - 1
            assert index[1 + a, 1 + b] == dy * (2 * ww - 1) + dx
    # every relative offset is used, and only those
    assert set(index[1:, 1:].flatten().tolist()) == set(range(rows - 3))


def reference_forward_features(model, images, mask):
    """A separate, literal transcription of the official forward for the comparison."""
    c = model.config
    x = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=c.patch_size)
    x = x.flatten(2).transpose(1, 2)
    B, N, D = x.shape
    if mask is not None:
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + model.mask_token.expand(B, N, -1) * w
    x = torch.cat([model.cls_token.expand(B, -1, -1), x], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    H = c.num_heads
    for blk in model.blocks:
        table = (blk.attn.relative_position_bias_table if blk.attn.relative_position_bias_table is not None
                 else model.rel_pos_bias.relative_position_bias_table if model.rel_pos_bias is not None else None)
        h = blk.norm1(x)
        qkv = h @ blk.attn.qkv.weight.T + torch.cat([blk.attn.q_bias, torch.zeros_like(blk.attn.q_bias), blk.attn.v_bias])
        q, k, v = qkv.reshape(B, N + 1, 3, H, D // H).permute(2, 0, 3, 1, 4)
        attn = (q * (D // H) ** -0.5) @ k.transpose(-2, -1)
        if table is not None:
            attn = attn + table[model.rel_pos_index.view(-1)].view(N + 1, N + 1, H).permute(2, 0, 1)
        o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N + 1, D)
        o = blk.attn.proj(o)
        x = x + (blk.gamma_1 * o if blk.gamma_1 is not None else o)
        m = blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        x = x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
    return model.norm(x)


@pytest.mark.parametrize("overrides", [
    {},
    {"use_abs_pos_emb": True},
    {"use_shared_rel_pos_bias": False, "use_rel_pos_bias": True},
    {"use_shared_rel_pos_bias": False, "use_abs_pos_emb": True, "layer_scale_init_value": 0.0},
    {"img_size": (24, 40)},
])
def test_forward_matches_reference(overrides):
    model = randomise(BEiT(small_config(**overrides)).double()).eval()
    c = model.config
    images = torch.randn(3, 3, *c.image_hw, dtype=torch.float64)
    mask = random_masks(3, c.grid, 5)
    for m in (None, mask):
        got = model.forward_features(images, m)
        want = reference_forward_features(model, images, m)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mim_logits_are_in_masked_order():
    model = randomise(BEiT(small_config())).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = random_masks(2, model.config.grid, 6)
    mask[1, :3] = True  # different counts per image are fine for logits
    logits = model(images, bool_masked_pos=mask)
    hidden = model.forward_features(images, mask)[:, 1:]
    assert logits.shape == (int(mask.sum()), 50)
    torch.testing.assert_close(logits, model.lm_head(hidden[mask]))


@pytest.mark.parametrize("label_shape", ["full", "selected"])
def test_mim_loss_and_accuracy(label_shape):
    model = randomise(BEiT(small_config())).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = random_masks(2, model.config.grid, 7)
    tokens = torch.randint(0, 50, (2, 16))
    labels = tokens if label_shape == "full" else tokens[mask]
    loss, acc = model(images, bool_masked_pos=mask, labels=labels, return_accuracy=True)
    logits = model(images, bool_masked_pos=mask)
    torch.testing.assert_close(loss, F.cross_entropy(logits, tokens[mask]))
    torch.testing.assert_close(acc, (logits.argmax(-1) == tokens[mask]).float().mean())
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0


def test_classifier_mean_pooling_and_cls():
    model = randomise(BEiT(small_config(vocab_size=0, num_classes=7))).double().eval()
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm is not None and model.mask_token is None
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    hidden = model.forward_features(images)
    torch.testing.assert_close(model(images), model.head(model.fc_norm(hidden[:, 1:].mean(1))))
    cls_model = randomise(BEiT(small_config(vocab_size=0, num_classes=7, use_mean_pooling=False))).double()
    assert cls_model.fc_norm is None
    hidden = cls_model.forward_features(images)
    torch.testing.assert_close(cls_model(images), cls_model.head(hidden[:, 0]))
    features = BEiT(small_config(vocab_size=0))(images.float())
    assert features.shape == (2, 48)


def test_official_initialisation():
    torch.manual_seed(0)
    model = BEiT(small_config(depth=4, embed_dim=96, num_classes=5, vocab_size=0))
    std = model.config.init_std
    w = model.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= std + 1e-7 and 0.5 * std < w.std() < std
    for layer_id, blk in enumerate(model.blocks, start=1):
        bound = std / math.sqrt(2 * layer_id)
        assert blk.attn.proj.weight.abs().max() <= bound + 1e-7
        assert blk.mlp.fc2.weight.abs().max() <= bound + 1e-7
        assert torch.equal(blk.gamma_1, torch.full((96,), 0.1))
        assert blk.attn.q_bias.abs().sum() == 0 and blk.attn.qkv.bias is None
    assert model.head.weight.abs().max() <= std * model.config.init_scale + 1e-9


def test_drop_path_is_stochastic_in_training_only():
    model = randomise(BEiT(small_config(drop_path_rate=0.5))).train()
    images = torch.randn(4, 3, 32, 32)
    a, b = model.forward_features(images), model.forward_features(images)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.forward_features(images), model.forward_features(images))
    assert [blk.drop_path_rate for blk in model.blocks] == [0.0, 0.5]


def test_masking_generator_feeds_the_model():
    model = BEiT(small_config(img_size=64))
    masks = MaskingGenerator(model.config.grid, num_masking_patches=25, min_num_patches=4, seed=1).batch(3)
    assert masks.shape == (3, 64) and masks.dtype == torch.bool
    loss = model(torch.randn(3, 3, 64, 64), bool_masked_pos=masks, labels=torch.randint(0, 50, (3, 64)))
    assert torch.isfinite(loss)


def test_bad_input_errors():
    model = BEiT(small_config())
    images = torch.randn(2, 3, 32, 32)
    mask = random_masks(2, model.config.grid, 4)
    form = r"images must be a floating-point \[B, 3, 32, 32\] tensor, got"
    with pytest.raises(ValueError, match=rf"BEiT: {form} \(2, 3, 40, 40\)"):
        model(torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match=rf"BEiT: {form} \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match=rf"BEiT: {form} list"):
        model(images.tolist())
    with pytest.raises(TypeError, match=rf"BEiT: {form} torch.uint8"):
        model(images.to(torch.uint8))
    with pytest.raises(TypeError, match=rf"BEiT: {form} list"):
        model.forward_features(images.tolist())
    mask_form = r"bool_masked_pos must be a bool \[B, N\] = \[2, 16\] tensor, got"
    with pytest.raises(ValueError, match=rf"BEiT: {mask_form} \(2, 10\)"):
        model(images, bool_masked_pos=mask[:, :10])
    with pytest.raises(TypeError, match=rf"BEiT: {mask_form} torch.int64"):
        model(images, bool_masked_pos=mask.long())
    with pytest.raises(TypeError, match=rf"BEiT: {mask_form} list"):
        model(images, bool_masked_pos=mask.tolist())
    with pytest.raises(TypeError, match="labels must be an int64 or int32 tensor, got list"):
        model(images, bool_masked_pos=mask, labels=torch.zeros(2, 16, dtype=torch.long).tolist())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=50\)"):
        model(images, bool_masked_pos=mask, labels=torch.full((2, 16), 50))
    with pytest.raises(ValueError, match="labels has 3 entries but mask selects 8 rows"):
        model(images, bool_masked_pos=mask, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="need bool_masked_pos"):
        model(images, labels=torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size=0"):
        BEiT(small_config(vocab_size=0))(images, bool_masked_pos=mask)


@pytest.mark.parametrize("with_pos_embed", [False, True])
def test_model_on_triton_kernels_matches_eager(with_pos_embed):
    """The three fused ops together (Triton interpreter on CPU): loss, accuracy and every gradient."""
    config = small_config(use_abs_pos_emb=with_pos_embed)
    reference = randomise(BEiT(config))
    fused = BEiT(config.replace(kernels="triton"))
    fused.load_state_dict(reference.state_dict())
    images = torch.randn(3, 3, 32, 32)
    mask = random_masks(3, config.grid, 6)
    tokens = torch.randint(0, 50, (3, 16))
    results = []
    for model in (reference, fused):
        loss, accuracy = model(images, bool_masked_pos=mask, labels=tokens, return_accuracy=True)
        loss.backward()
        results.append((loss, accuracy))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(reference.named_parameters(), fused.named_parameters()):
        assert b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5 * a.grad.abs().max().item(), msg=name)


def test_whole_model_compiles_as_one_graph():
    """torch.compile(fullgraph=True) traces the model with its fused ops as single nodes (no graph
    breaks, no host syncs), forward and backward."""
    config = small_config(kernels="triton", drop_path_rate=0.1)
    model = randomise(BEiT(config)).eval()
    images = torch.randn(3, 3, 32, 32)
    mask = random_masks(3, config.grid, 6)
    tokens = torch.randint(0, 50, (3, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(images, bool_masked_pos=mask, labels=tokens)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = model(images, bool_masked_pos=mask, labels=tokens)
    want.backward()
    torch.testing.assert_close(loss, want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_blocks", ["auto", "off"])
def test_pretraining_forward_and_backward_on_the_gpu_do_not_synchronise(fuse_blocks):
    """The model's masked-image-modeling forward and backward with the automatic kernels under bf16
    autocast (patch embedding with the mask, the bias gather, attention, the LM loss and their
    backward passes) issue no host synchronisation once warm (the trainer's one per step is its own)."""
    config = small_config(img_size=64, vocab_size=512, kernels="auto", fuse_blocks=fuse_blocks, drop_path_rate=0.1)
    model = randomise(BEiT(config)).cuda()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    masks = random_masks(4, config.grid, 24).cuda()
    labels = torch.randint(0, 512, (4, config.grid[0] * config.grid[1]), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, accuracy = model(images, bool_masked_pos=masks, labels=labels, return_accuracy=True)
        loss.backward()
        return loss, accuracy

    step()  # compiles and autotunes (those synchronise), plans the bias fold
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, accuracy = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(loss.item()) and 0 <= accuracy.item() <= 1
