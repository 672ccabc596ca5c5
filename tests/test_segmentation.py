"""beitfast.segmentation: the official UPerNet model (a float64 transcription of the official backbone,
neck, mmseg heads and loss), transformers' BeitForSemanticSegmentation on the same weights, checkpoints
of every format both ways, resizing, and bad input.

Every parameter and BatchNorm statistic is randomised, so a wrongly mapped tensor cannot hide."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from beitfast import BEiT, BEiTConfig, checkpoint
from beitfast.segmentation import (
    BEiTBackbone, BEiTForSegmentation, FCNHead, MultiScaleNeck, SegmentationConfig, UPerHead,
)
from beitfast.segmentation import checkpoint as seg_checkpoint

CLASSES = 5


def backbone_config(**overrides) -> BEiTConfig:
    # 4x4 patches of 16 pixels (N = 17), the official fine-tuning layout: a bias table per layer.
    values = dict(img_size=64, patch_size=16, embed_dim=64, depth=5, num_heads=2, vocab_size=0,
                  use_shared_rel_pos_bias=False, use_rel_pos_bias=True, drop_path_rate=0.0, kernels="eager")
    return BEiTConfig(**{**values, **overrides})


def seg_config(**overrides) -> SegmentationConfig:
    values = dict(num_classes=CLASSES, out_indices=(0, 1, 2, 3), auxiliary_channels=16)
    return SegmentationConfig(**{**values, **overrides})


def randomise_(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(seed)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * 0.3)
    return model.eval()


def random_model(config=None, segmentation=None, **overrides) -> BEiTForSegmentation:
    model = BEiTForSegmentation(config or backbone_config(), segmentation or seg_config(**overrides))
    return randomise_(model.double())


def images_and_labels(config: BEiTConfig, batch: int = 2, label_size=None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *config.image_hw, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (batch, *(label_size or config.image_hw)), generator=generator)
    labels[:, :5, :7] = 255  # ignored pixels
    return images, labels


def assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -- a literal float64 transcription of the official code, on an mmseg state dict ------------------


def official_relative_position_index(wh: int, ww: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    rows = (2 * wh - 1) * (2 * ww - 1) + 3
    index = torch.zeros(wh * ww + 1, wh * ww + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = rows - 3
    index[0:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def official_backbone(sd, images, patch, heads, out_indices, eps=1e-6):
    """unilm beit/semantic_segmentation/backbone/beit.py: BEiT.forward_features, fpn1..fpn4 included."""
    proj = "backbone.patch_embed.proj"
    x = F.conv2d(images, sd[f"{proj}.weight"], sd[f"{proj}.bias"], stride=patch)
    B, D, Hp, Wp = x.shape
    x = torch.cat([sd["backbone.cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    if "backbone.pos_embed" in sd:
        x = x + sd["backbone.pos_embed"]
    index = official_relative_position_index(Hp, Wp)
    features, depth = [], 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.blocks."))
    for i in range(depth):
        p = lambda name: sd[f"backbone.blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps)
        qkv_bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        qkv = F.linear(h, p("attn.qkv.weight"), qkv_bias)
        q, k, v = qkv.reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
        bias = p("attn.relative_position_bias_table")[index.view(-1)].view(index.shape[0], index.shape[0], -1)
        attn = (attn + bias.permute(2, 0, 1).unsqueeze(0)).softmax(dim=-1)
        o = F.linear((attn @ v).transpose(1, 2).reshape(B, -1, D), p("attn.proj.weight"), p("attn.proj.bias"))
        x = x + p("gamma_1") * o
        h = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps)
        m = F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
        m = F.linear(m, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + p("gamma_2") * m
        if i in out_indices:
            features.append(x[:, 1:, :].permute(0, 2, 1).reshape(B, -1, Hp, Wp).contiguous())

    def bn(t, name):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.1, 1e-5)

    def up(t, name):
        return F.conv_transpose2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=2)

    fpn1 = up(F.gelu(bn(up(features[0], "backbone.fpn1.0"), "backbone.fpn1.1")), "backbone.fpn1.3")
    return [fpn1, up(features[1], "backbone.fpn2.0"), features[2], F.max_pool2d(features[3], 2, 2)]


def conv_module(sd, name, t):
    """mmcv ConvModule: conv (no bias), BatchNorm (eval), ReLU."""
    w = sd[f"{name}.conv.weight"]
    t = F.conv2d(t, w, None, padding=w.shape[-1] // 2)
    t = F.batch_norm(t, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                     sd[f"{name}.bn.bias"], False, 0.1, 1e-5)
    return F.relu(t)


def resize(t, size):
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def official_uper_head(sd, inputs, pool_scales=(1, 2, 3, 6)):
    """mmseg 0.11 UPerHead.forward (eval: dropout off), then cls_seg."""
    x = inputs[-1]
    psp_outs = [x] + [resize(conv_module(sd, f"decode_head.psp_modules.{i}.1", F.adaptive_avg_pool2d(x, s)),
                             x.shape[2:]) for i, s in enumerate(pool_scales)]
    laterals = [conv_module(sd, f"decode_head.lateral_convs.{i}", inputs[i]) for i in range(3)]
    laterals.append(conv_module(sd, "decode_head.bottleneck", torch.cat(psp_outs, dim=1)))
    for i in range(3, 0, -1):
        # mmseg adds in place (+=); out of place here so that autograd can differentiate the reference.
        laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
    fpn_outs = [conv_module(sd, f"decode_head.fpn_convs.{i}", laterals[i]) for i in range(3)] + [laterals[-1]]
    for i in range(3, 0, -1):
        fpn_outs[i] = resize(fpn_outs[i], fpn_outs[0].shape[2:])
    out = conv_module(sd, "decode_head.fpn_bottleneck", torch.cat(fpn_outs, dim=1))
    return F.conv2d(out, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])


def official_fcn_head(sd, inputs):
    out = conv_module(sd, "auxiliary_head.convs.0", inputs[2])
    return F.conv2d(out, sd["auxiliary_head.conv_seg.weight"], sd["auxiliary_head.conv_seg.bias"])


def mmseg_loss(logits, labels, weight):
    """mmseg 0.11 BaseDecodeHead.losses + CrossEntropyLoss: mean over all pixels (ignored ones are 0)."""
    loss = F.cross_entropy(resize(logits, labels.shape[1:]), labels, ignore_index=255, reduction="none")
    return weight * loss.mean()


@pytest.mark.parametrize("variant", ["per-layer", "absolute", "rectangular"])
def test_matches_official_transcription(variant):
    overrides = {"per-layer": {}, "absolute": dict(use_abs_pos_emb=True),
                 "rectangular": dict(img_size=(48, 80))}
    model = random_model(backbone_config(**overrides[variant]))
    images, labels = images_and_labels(model.config)
    sd = model.to_mmseg_state_dict()
    features = official_backbone(sd, images, 16, 2, out_indices=[0, 1, 2, 3])  # block 4 runs, untapped
    expected = official_uper_head(sd, features)
    with torch.no_grad():
        logits = model(images)
        assert logits.shape == (2, CLASSES, model.config.image_hw[0] // 4, model.config.image_hw[1] // 4)
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
        loss = mmseg_loss(expected, labels, 1.0) + mmseg_loss(official_fcn_head(sd, features), labels, 0.4)
        torch.testing.assert_close(model(images, labels), loss, rtol=1e-10, atol=1e-10)


def test_gradients_match_official_transcription():
    model = random_model(out_indices=(0, 1, 2, 4))  # every block feeds the heads
    images, labels = images_and_labels(model.config)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    sd = {k: v.detach().clone().requires_grad_(not k.endswith(statistics))
          for k, v in model.to_mmseg_state_dict().items()}
    features = official_backbone(sd, images, 16, 2, out_indices=[0, 1, 2, 4])
    loss = (mmseg_loss(official_uper_head(sd, features), labels, 1.0)
            + mmseg_loss(official_fcn_head(sd, features), labels, 0.4))
    loss.backward()
    model(images, labels).backward()
    for name, parameter in model.named_parameters():
        expected = sd[re.sub(r"^neck\.", "backbone.", name)].grad
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-9, atol=1e-10, msg=name)


# -- transformers' BeitForSemanticSegmentation ------------------------------------------------------


def hf_peer(model: BEiTForSegmentation, **config_changes):
    transformers = pytest.importorskip("transformers")
    # sdpa: its eager attention takes the softmax in float32 even for float64 inputs.
    config = transformers.BeitConfig(**{**model.to_hf_config(), **config_changes}, attn_implementation="sdpa")
    peer = transformers.BeitForSemanticSegmentation(config).to(next(model.parameters()).dtype)
    peer.load_state_dict(model.to_hf_state_dict(), strict=True)
    return peer.eval()


def hf_loss(model, peer, images, labels):
    """Ours with transformers' loss average (the same weights), and transformers' loss."""
    labelled = model.segmentation_config.replace(loss_average="labelled_pixels")
    twin = BEiTForSegmentation(model.config, labelled)
    twin.to(torch.float64).load_state_dict(model.state_dict())
    return twin.eval()(images, labels), peer(pixel_values=images, labels=labels).loss


def test_hf_taps_equal_ours_with_huggingface_taps():
    # transformers reads hidden_states[i - 1], hidden_states[0] being the embeddings: for out_indices
    # (0, 1, 2, 4) the last block's output (hidden_states[-1]), the embeddings and blocks 0 and 2.
    model = random_model(taps="huggingface", out_indices=(0, 1, 2, 4))
    peer = hf_peer(model)
    assert peer.config.out_indices == [0, 1, 2, 4]
    images, labels = images_and_labels(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(images), peer(pixel_values=images).logits, rtol=1e-10, atol=1e-10)
        ours, theirs = hf_loss(model, peer, images, labels)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_official_taps_exported_to_hf_read_the_same_blocks():
    # transformers' reading of out_indices is shifted by two blocks from the official one: the official
    # (3, 5, 7, 11) of BEiT-B are blocks 1, 3, 5, 9 there. The export gives it (i + 2) so that both
    # compute the official model; with the indices unchanged the outputs differ.
    model = random_model(backbone_config(depth=6), out_indices=(0, 1, 2, 4))
    peer = hf_peer(model)
    assert peer.config.out_indices == [2, 3, 4, 6]
    images, labels = images_and_labels(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(images), peer(pixel_values=images).logits, rtol=1e-10, atol=1e-10)
        shifted = hf_peer(model, out_indices=[1, 2, 3, 5])
        assert (model(images) - shifted(pixel_values=images).logits).abs().max() > 1e-3
        ours, theirs = hf_loss(model, peer, images, labels)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_loss_averages_differ_only_by_ignored_pixels():
    model = random_model()
    images, labels = images_and_labels(model.config)
    with torch.no_grad():
        all_pixels = model(images, labels)
        labelled = hf_loss(model, hf_peer(model), images, labels)[0]
    torch.testing.assert_close(all_pixels, labelled * (labels != 255).double().mean(), rtol=1e-12, atol=1e-12)


# -- checkpoints ----------------------------------------------------------------------------------


def float_model(**overrides) -> BEiTForSegmentation:
    return random_model(**overrides).float()


def test_round_trips_ours_mmseg_hf_exact():
    model = float_model()
    ours = model.state_dict()
    exports = [(ours, "beitfast"), (model.to_mmseg_state_dict(), "mmseg"),
               (model.to_hf_state_dict(version=4), "hf-v4"), (model.to_hf_state_dict(version=5), "hf-v5")]
    for exported, fmt in exports:
        assert seg_checkpoint.detect_format(exported) == fmt
        back = BEiTForSegmentation.from_state_dict(exported, kernels="eager", drop_path_rate=0.0,
                                                   out_indices=(0, 1, 2, 3))
        assert back.segmentation_config == model.segmentation_config
        # Without a config, transformers' weights get its LayerNorm eps (1e-12).
        eps = 1e-12 if fmt.startswith("hf") else 1e-6
        assert back.config == model.config.replace(layer_norm_eps=eps)
        assert_state_equal(back.state_dict(), ours)
    assert "backbone.fpn1.1.running_var" in model.to_mmseg_state_dict()
    assert "decode_head.conv_seg.weight" in model.to_mmseg_state_dict()


def test_hf_model_loads_name_for_name_and_back():
    model = float_model()
    peer = hf_peer(model)
    assert_state_equal(peer.state_dict(), model.to_hf_state_dict())
    back = BEiTForSegmentation.from_state_dict(peer.state_dict(), kernels="eager", out_indices=(0, 1, 2, 3))
    assert_state_equal(back.state_dict(), model.state_dict())


def test_hf_v4_names_load_through_transformers_conversion(tmp_path):
    """transformers 5.x renames 4.x checkpoints on load with its own table: our 4.x export must come
    out as the same model."""
    transformers = pytest.importorskip("transformers")
    import safetensors.torch

    model = float_model()
    config = transformers.BeitConfig(**model.to_hf_config(), architectures=["BeitForSemanticSegmentation"])
    config.save_pretrained(tmp_path)
    safetensors.torch.save_file(model.to_hf_state_dict(version=4), tmp_path / "model.safetensors")
    peer = transformers.BeitForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation="eager")
    assert_state_equal(peer.state_dict(), model.to_hf_state_dict(version=5))


def test_shared_table_checkpoint_and_other_image_size():
    # A 64-px checkpoint loaded at 96 px: each block's table is the official resize of its own.
    model = float_model()
    bigger = BEiTForSegmentation.from_state_dict(model.to_mmseg_state_dict(), backbone_config(img_size=96),
                                                 out_indices=(0, 1, 2, 3))
    for old, new in zip(model.backbone.blocks, bigger.backbone.blocks):
        resized = checkpoint.resize_rel_pos_bias_table(old.attn.relative_position_bias_table.detach(), (6, 6))
        assert torch.equal(new.attn.relative_position_bias_table.detach(), resized)
    images, labels = images_and_labels(bigger.config)
    with torch.no_grad():
        assert bigger.eval()(images.float()).shape == (2, CLASSES, 24, 24)
    wide = model.resized((64, 128))
    assert wide.config.image_hw == (64, 128) and wide.segmentation_config == model.segmentation_config
    assert wide.backbone.blocks[0].attn.relative_position_bias_table.shape == (7 * 15 + 3, 2)
    assert wide.eval()(torch.randn(1, 3, 64, 128)).shape == (1, CLASSES, 16, 32)


def test_from_backbone_of_a_pretrained_model(tmp_path):
    # Pre-training checkpoint (shared table, LM head, 48 px) -> segmentation at 64 px, per-layer tables.
    pretrained = BEiT(backbone_config(img_size=48, vocab_size=11, use_shared_rel_pos_bias=True,
                                      use_rel_pos_bias=False))
    randomise_(pretrained)
    model = BEiTForSegmentation.from_backbone(pretrained.state_dict(), backbone_config(), seg_config())
    shared = pretrained.rel_pos_bias.relative_position_bias_table.detach()
    for block in model.backbone.blocks:
        expected = checkpoint.resize_rel_pos_bias_table(shared, (4, 4))
        assert torch.equal(block.attn.relative_position_bias_table.detach(), expected)
    torch.testing.assert_close(model.backbone.blocks[1].mlp.fc1.weight, pretrained.blocks[1].mlp.fc1.weight)
    pretrained.save(tmp_path / "pretrained.safetensors")
    for source in (pretrained, tmp_path / "pretrained.safetensors"):
        again = BEiTForSegmentation.from_backbone(source, backbone_config(), seg_config())
        assert_state_equal(again.backbone.state_dict(), model.backbone.state_dict())
    with pytest.raises(ValueError, match=r"not a segmentation checkpoint: a BEiT state dict \(official"):
        BEiTForSegmentation.from_state_dict(pretrained.state_dict())


# -- the rooms alone, training, and bad input -----------------------------------------------------


def test_rooms_alone():
    config = backbone_config(img_size=(32, 48))
    backbone = BEiTBackbone(config, out_indices=(3, 1, 0, 2))
    assert backbone.lm_head is None and backbone.head is None and backbone.fc_norm is None
    features = backbone(torch.randn(2, 3, 32, 48))
    assert [tuple(f.shape) for f in features] == [(2, 64, 2, 3)] * 4
    pyramid = MultiScaleNeck(64)(features)
    assert [tuple(f.shape[2:]) for f in pyramid] == [(8, 12), (4, 6), (2, 3), (1, 1)]
    logits = UPerHead(64, 32, CLASSES).eval()(pyramid)
    assert logits.shape == (2, CLASSES, 8, 12)
    assert FCNHead(64, 16, CLASSES).eval()(pyramid).shape == (2, CLASSES, 2, 3)
    labels = torch.full((2, 32, 48), 255)
    labels[:, 0, 0] = 1
    head = UPerHead(64, 32, CLASSES, loss_average="labelled_pixels").eval()
    torch.testing.assert_close(head.loss(logits, labels),
                               F.cross_entropy(resize(logits, (32, 48))[:, :, 0, 0], labels[:, 0, 0]))


def test_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    model = BEiTForSegmentation(backbone_config(drop_path_rate=0.1), seg_config(out_indices=(0, 1, 2, 4)))
    model.train()
    images, labels = images_and_labels(model.config, batch=2)
    loss = model(images.float(), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_step_reads_nothing_on_the_host(monkeypatch):
    # What a GPU step does (values not inspected without BEITFAST_CHECKS): the label check is skipped, so
    # the forward and backward read nothing on the host, and Dynamo traces the loss as one graph.
    from beitfast.ops import dispatch
    from beitfast.testing import HostReads

    torch.manual_seed(0)
    model = BEiTForSegmentation(backbone_config(drop_path_rate=0.0), seg_config(out_indices=(0, 1, 2, 4)))
    images, labels = images_and_labels(model.config, batch=2)
    images = images.float()
    with HostReads() as mode:
        model(images, labels)
    assert mode.reads, "on CPU the labels are checked (a boolean index)"
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    with HostReads() as mode:
        model(images, labels).backward()
    assert mode.reads == [], mode.reads
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    torch.compile(model, backend="eager", fullgraph=True)(images, labels).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_default_model_is_the_official_recipe():
    with torch.device("meta"):
        model = BEiTForSegmentation()
    seg = model.segmentation_config
    assert seg.out_indices == (3, 5, 7, 11) and seg.channels == 768 and seg.pool_scales == (1, 2, 3, 6)
    assert model.config.image_hw == (512, 512) and model.config.use_rel_pos_bias
    assert model.auxiliary_head.convs[0].conv.out_channels == 256 and model.auxiliary_head.loss_weight == 0.4
    with torch.device("meta"):
        large = BEiTForSegmentation(BEiTConfig.large(use_shared_rel_pos_bias=False, use_rel_pos_bias=True))
    assert large.segmentation_config.out_indices == (7, 11, 15, 23)
    assert large.segmentation_config.channels == 1024


def test_bad_input():
    model = float_model()
    images, labels = images_and_labels(model.config)
    images = images.float()
    with pytest.raises(ValueError, match="img_size must be a multiple of patch_size: 72x72"):
        backbone_config(img_size=72)
    with pytest.raises(ValueError, match=r"images must be .*\[B, 3, 64, 64\].*got \(2, 3, 80, 80\)"):
        model(torch.randn(2, 3, 80, 80))
    bad = labels.clone()
    bad[0, 3, 3] = CLASSES
    bad[1, 0, 0] = -1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\) or ignore_index 255, got \[-1, 5\]"):
        model(images, bad)
    with pytest.raises(ValueError, match="training needs at least 2 images per batch"):
        model.train()(images[:1], labels[:1])
    model.eval()
    with pytest.raises(TypeError, match="labels must be an integer"):
        model(images, labels.float())
    with pytest.raises(ValueError, match=r"an integer \[B, H, W\] tensor with B = 2, got \(2, 1, 64, 64\)"):
        model(images, labels[:, None])
    with pytest.raises(ValueError, match="out_indices must be 4 block indices"):
        seg_config(out_indices=(0, 1, 2))
    with pytest.raises(ValueError, match=r"out_indices with taps='official' must be in \[0, 4\]"):
        BEiTForSegmentation(backbone_config(), seg_config(out_indices=(0, 1, 2, 5)))
    with pytest.raises(ValueError, match=r"transformers cannot tap the blocks \[1, 2, 3, 4\] of 5"):
        BEiTForSegmentation(backbone_config(), seg_config(out_indices=(1, 2, 3, 4))).to_hf_config()
    with pytest.raises(ValueError, match="official defaults for depth 12 and 24 only"):
        BEiTForSegmentation(backbone_config(), seg_config(out_indices=None))
    with pytest.raises(ValueError, match="taps must be one of"):
        seg_config(taps="hf")
    with pytest.raises(ValueError, match="not a BEiT segmentation state dict"):
        BEiTForSegmentation.from_state_dict({"decode_head.x": torch.zeros(1), "other.y": torch.zeros(1)})
    state = model.state_dict()
    del state["auxiliary_head.conv_seg.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['auxiliary_head.conv_seg.bias'\]"):
        BEiTForSegmentation.from_state_dict(state, out_indices=(0, 1, 2, 3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_and_load_files(tmp_path, suffix):
    model = float_model(taps="huggingface", out_indices=(1, 2, 3, 5), loss_average="labelled_pixels")
    model.save(tmp_path / f"model{suffix}")
    back = BEiTForSegmentation.from_file(tmp_path / f"model{suffix}")
    assert back.config == model.config and back.segmentation_config == model.segmentation_config
    assert_state_equal(back.state_dict(), model.state_dict())
    # An official/mmseg training checkpoint: {"meta": ..., "state_dict": ...}.
    torch.save({"meta": {"iter": 160000}, "state_dict": model.to_mmseg_state_dict()}, tmp_path / "mmseg.pth")
    official = BEiTForSegmentation.from_file(tmp_path / "mmseg.pth", out_indices=(0, 1, 2, 4))
    assert_state_equal(official.state_dict(), model.state_dict())
    (tmp_path / f"model{suffix}").write_bytes((tmp_path / f"model{suffix}").read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"model{suffix}"):
        BEiTForSegmentation.from_file(tmp_path / f"model{suffix}")


def test_load_hf_folder(tmp_path):
    model = float_model()
    peer = hf_peer(model)
    peer.save_pretrained(tmp_path)
    back = BEiTForSegmentation.from_file(tmp_path, kernels="eager")
    assert back.segmentation_config == model.segmentation_config  # the taps recorded in config.json
    assert_state_equal(back.state_dict(), model.state_dict())
    # A folder of transformers' own (no beitfast_* entries): out_indices keep their numbers, read the
    # official way; taps="huggingface" computes what transformers does.
    config = json.loads((tmp_path / "config.json").read_text())
    del config["beitfast_out_indices"], config["beitfast_taps"]
    config["out_indices"] = [1, 2, 3, 4]
    (tmp_path / "config.json").write_text(json.dumps(config))
    official = BEiTForSegmentation.from_file(tmp_path, kernels="eager")
    assert official.segmentation_config.out_indices == (1, 2, 3, 4)
    assert official.segmentation_config.taps == "official"
    same = BEiTForSegmentation.from_file(tmp_path, kernels="eager", taps="huggingface").double().eval()
    peer = hf_peer(model.double(), out_indices=[1, 2, 3, 4])
    images, _ = images_and_labels(model.config)
    with torch.no_grad():
        torch.testing.assert_close(same(images), peer(pixel_values=images).logits, rtol=1e-6, atol=1e-6)
