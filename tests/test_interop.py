"""Weights move between beitfast, Hugging Face transformers and timm with the same outputs.

Peers are built with random weights (no downloads); every parameter is randomised, bias tables,
layer scales and biases included, so a wrongly mapped tensor cannot hide behind a zero init.
"""

import pytest
import torch

from beitfast import BEiT, BEiTConfig, checkpoint

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

RTOL = 1e-5  # fp32, relative to the largest output magnitude


def randomise_(module: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= RTOL * scale, f"max error {error:.3g} > {RTOL} x {scale:.3g}"


def assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def small_config(**overrides) -> BEiTConfig:
    # 6x6 patches of 8 pixels: N = 37 tokens, a non-power-of-two sequence.
    values = dict(img_size=48, patch_size=8, embed_dim=96, depth=2, num_heads=3, vocab_size=101,
                  drop_path_rate=0.0, kernels="eager")
    return BEiTConfig(**{**values, **overrides})


def hf_peer(model: BEiT):
    """The transformers model of the same task (LM head: masked image modeling) with our weights."""
    config = transformers.BeitConfig(**model.to_hf_config(), attn_implementation="eager")
    if model.lm_head is not None:
        peer = transformers.BeitForMaskedImageModeling(config)
    else:
        peer = transformers.BeitForImageClassification(config)
    peer.load_state_dict(model.to_hf_state_dict(), strict=True)
    return peer.eval()


def inputs(config: BEiTConfig, batch: int = 3):
    images = torch.randn(batch, config.in_chans, *config.image_hw)
    mask = torch.rand(batch, config.num_patches) < 0.4
    mask[0, 0] = True
    return images, mask


MIM_BIASES = {
    "shared": dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False),
    "per-layer": dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True),
    # No bias table: the head count is inferred from the default head dim 64.
    "absolute": dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=False, use_abs_pos_emb=True,
                     embed_dim=128, num_heads=2),
}


@pytest.mark.parametrize("bias", list(MIM_BIASES))
def test_hf_masked_image_modeling_from_ours(bias):
    model = randomise_(BEiT(small_config(**MIM_BIASES[bias])))
    peer = hf_peer(model)
    images, mask = inputs(model.config)
    with torch.no_grad():
        expected = peer(pixel_values=images, bool_masked_pos=mask).logits[mask]
        assert_close(model(images, bool_masked_pos=mask), expected)


@pytest.mark.parametrize("bias", ["shared", "per-layer"])
def test_hf_masked_image_modeling_to_ours(bias):
    config = transformers.BeitConfig(**checkpoint.hf_config_kwargs(small_config(**MIM_BIASES[bias])))
    peer = randomise_(transformers.BeitForMaskedImageModeling(config))
    model = BEiT.from_state_dict(peer.state_dict(), kernels="eager", layer_norm_eps=config.layer_norm_eps)
    model.eval()
    assert model.config.use_rel_pos_bias == (bias == "per-layer")
    images, mask = inputs(model.config)
    with torch.no_grad():
        expected = peer(pixel_values=images, bool_masked_pos=mask).logits[mask]
        assert_close(model(images, bool_masked_pos=mask), expected)


@pytest.mark.parametrize("mean_pooling", [True, False])
def test_hf_image_classification_both_ways(mean_pooling):
    model = randomise_(BEiT(small_config(
        vocab_size=0, num_classes=7, use_mean_pooling=mean_pooling, use_shared_rel_pos_bias=False,
        use_rel_pos_bias=True,
    )))
    peer = hf_peer(model)
    images, _ = inputs(model.config)
    with torch.no_grad():
        assert_close(model(images), peer(pixel_values=images).logits)
        back = BEiT.from_state_dict(peer.state_dict(), kernels="eager")
        assert back.config.use_mean_pooling == mean_pooling and back.config.num_classes == 7
        assert_close(back.eval()(images), peer(pixel_values=images).logits)


@pytest.mark.parametrize("bias", list(MIM_BIASES))
def test_hf_v4_names_load_through_transformers_conversion(tmp_path, bias):
    """transformers 5.x converts 4.x checkpoints on load with its own rename table: our 4.x export
    must come out as the same model. Its save_pretrained output must load back into ours exactly."""
    import safetensors.torch

    model = randomise_(BEiT(small_config(**MIM_BIASES[bias])))
    hf_config = transformers.BeitConfig(**model.to_hf_config(), architectures=["BeitForMaskedImageModeling"])
    hf_config.save_pretrained(tmp_path)
    safetensors.torch.save_file(model.to_hf_state_dict(version=4), tmp_path / "model.safetensors")
    peer = transformers.BeitForMaskedImageModeling.from_pretrained(tmp_path, attn_implementation="eager")
    assert_state_equal(peer.state_dict(), model.to_hf_state_dict(version=5))

    peer.save_pretrained(tmp_path / "saved")
    back = BEiT.from_file(tmp_path / "saved", kernels="eager", drop_path_rate=0.0)
    assert back.config.layer_norm_eps == model.config.layer_norm_eps and back.config.vocab_size == 101
    assert_state_equal(back.state_dict(), model.state_dict())


@pytest.mark.parametrize("bias", list(MIM_BIASES))
def test_round_trip_through_hf_exact(bias):
    model = randomise_(BEiT(small_config(**MIM_BIASES[bias])))
    # A state dict does not carry the LayerNorm eps: without it, Hugging Face names get Hugging Face's.
    back = BEiT.from_state_dict(hf_peer(model).state_dict(), kernels="eager", drop_path_rate=0.0,
                                layer_norm_eps=model.config.layer_norm_eps)
    assert back.config == model.config
    assert_state_equal(back.state_dict(), model.state_dict())
    for version in (4, 5):
        direct = BEiT.from_state_dict(model.to_hf_state_dict(version), kernels="eager", drop_path_rate=0.0)
        assert_state_equal(direct.state_dict(), model.state_dict())


TIMM_MODELS = ["beit_base_patch16_224", "beitv2_base_patch16_224"]


def timm_peer(name: str, **kwargs):
    # Small overrides of the registered architectures: 2 blocks, 64 pixels (4x4 patches), dim 192.
    return timm.create_model(name, pretrained=False, depth=2, img_size=64, embed_dim=192, num_heads=3,
                             num_classes=10, **kwargs)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_to_ours(name):
    peer = randomise_(timm_peer(name))
    model = BEiT.from_state_dict(peer.state_dict(), kernels="eager").eval()
    c = model.config
    shape = (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.num_classes)
    assert shape == (64, 16, 192, 2, 3, 10)
    assert c.use_rel_pos_bias and not c.use_shared_rel_pos_bias and c.use_mean_pooling
    images, _ = inputs(c)
    with torch.no_grad():
        assert_close(model(images), peer(images))


@pytest.mark.parametrize("mean_pooling", [True, False])
@pytest.mark.parametrize("bias", list(MIM_BIASES))
def test_ours_to_timm(bias, mean_pooling):
    model = randomise_(BEiT(small_config(
        vocab_size=0, num_classes=5, use_mean_pooling=mean_pooling, layer_norm_eps=1e-5, **MIM_BIASES[bias]
    )))
    peer = timm.models.beit.Beit(**model.timm_kwargs()).eval()
    peer.load_state_dict(model.to_timm_state_dict(), strict=True)
    images, _ = inputs(model.config)
    with torch.no_grad():
        assert_close(model(images), peer(images))


def test_pretraining_model_to_timm_features():
    """An LM-head model exports its backbone (no mask token, no LM head) with the same pooling."""
    model = randomise_(BEiT(small_config(num_classes=4)))
    peer = timm.models.beit.Beit(**model.timm_kwargs()).eval()
    peer.load_state_dict(model.to_timm_state_dict(), strict=True)
    images, _ = inputs(model.config)
    with torch.no_grad():
        assert_close(model(images), peer(images))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_round_trip_through_timm_exact(name):
    model = BEiT.from_state_dict(timm_peer(name).state_dict(), kernels="eager", drop_path_rate=0.0)
    randomise_(model)
    peer = timm.models.beit.Beit(**model.timm_kwargs())
    peer.load_state_dict(model.to_timm_state_dict(), strict=True)
    back = BEiT.from_state_dict(peer.state_dict(), kernels="eager", drop_path_rate=0.0)
    assert back.config == model.config
    assert_state_equal(back.state_dict(), model.state_dict())


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("task", ["masked_image_modeling", "image_classification"])
def test_hf_weights_without_a_config_take_the_hf_layer_norm_eps(tmp_path, version, task):
    """transformers' BeitConfig has layer_norm_eps 1e-12, ours (the official code's) 1e-6: weights in
    Hugging Face names loaded without a config (a state dict, or a file without config.json) get its
    eps, and its outputs in float64."""
    import safetensors.torch

    classify = task == "image_classification"
    hf_config = transformers.BeitConfig(**checkpoint.hf_config_kwargs(small_config(
        vocab_size=0 if classify else 101, num_classes=5 if classify else 0), task), attn_implementation="eager")
    del hf_config.layer_norm_eps  # the Hugging Face default
    assert transformers.BeitConfig().layer_norm_eps == 1e-12
    peer_class = transformers.BeitForImageClassification if classify else transformers.BeitForMaskedImageModeling
    peer = randomise_(peer_class(transformers.BeitConfig(**hf_config.to_dict()))).double()
    assert peer.config.layer_norm_eps == 1e-12
    state = BEiT.from_state_dict(peer.state_dict(), kernels="eager").to_hf_state_dict(version, task)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")  # no config.json beside it
    images, mask = inputs(small_config())
    images = images.double()
    with torch.no_grad():
        expected = peer(pixel_values=images, bool_masked_pos=None if classify else mask).logits
        expected = expected if classify else expected[mask]
        for model in (BEiT.from_state_dict(state, kernels="eager"),
                      BEiT.from_file(tmp_path / "model.safetensors", kernels="eager")):
            assert model.config.layer_norm_eps == 1e-12
            model = model.double().eval()
            actual = model(images) if classify else model(images, bool_masked_pos=mask)
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
        # a config or an override still decides
        assert BEiT.from_state_dict(state, layer_norm_eps=1e-6).config.layer_norm_eps == 1e-6
