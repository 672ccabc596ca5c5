"""beitfast.checkpoint: format detection, config inference, adaptation (shared -> per-layer bias,
resizing), errors on bad input, and files (safetensors, pth; atomic writes)."""

import argparse
import math

import pytest
import torch

import beitfast.model
from beitfast import BEiT, BEiTConfig
from beitfast import checkpoint, resize


def small_config(**overrides) -> BEiTConfig:
    # 5x5 patches of 4 pixels: N = 26 tokens.
    values = dict(img_size=20, patch_size=4, embed_dim=48, depth=2, num_heads=3, vocab_size=37,
                  drop_path_rate=0.0, kernels="eager")
    return BEiTConfig(**{**values, **overrides})


def random_model(**overrides) -> BEiT:
    model = BEiT(small_config(**overrides))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def assert_state_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def inputs(config: BEiTConfig, batch: int = 2):
    images = torch.randn(batch, config.in_chans, *config.image_hw)
    mask = torch.rand(batch, config.num_patches) < 0.4
    mask[:, 1] = True
    return images, mask


# -- detection and unwrapping ---------------------------------------------------------------------


def test_detects_every_format():
    model = random_model()
    assert checkpoint.detect_format(model.state_dict()) == "official"
    assert checkpoint.detect_format(model.to_hf_state_dict(version=5)) == "hf-v5"
    assert checkpoint.detect_format(model.to_hf_state_dict(version=4)) == "hf-v4"


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module", "model+module", "ddp-prefix", "compiled"])
def test_official_wrappers_and_prefixes(wrap):
    model = random_model()
    sd = model.state_dict()
    payload = {
        "model": {"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3)},
        "state_dict": {"state_dict": sd},
        "module": {"module": sd},
        "model+module": {"model": {"module": sd}},
        "ddp-prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }[wrap]
    # Official files carry the relative position index buffers: dropped.
    inner = checkpoint.unwrap_state_dict(payload)
    assert_state_equal(inner, sd)
    sd_with_index = {**sd, "rel_pos_bias.relative_position_index": torch.zeros(26, 26, dtype=torch.long)}
    loaded = BEiT.from_state_dict({"model": sd_with_index}, kernels="eager", drop_path_rate=0.0)
    assert loaded.config == model.config
    assert_state_equal(BEiT.from_state_dict(payload).state_dict(), sd)


def test_official_pretrain_checkpoint_names():
    """The official pre-training model: shared bias, mask token, final norm and lm_head."""
    model = random_model()
    keys = set(model.state_dict())
    assert {"mask_token", "lm_head.weight", "lm_head.bias", "norm.weight",
            "rel_pos_bias.relative_position_bias_table", "blocks.1.attn.q_bias", "blocks.1.gamma_2"} <= keys


def test_unknown_format_names_keys():
    with pytest.raises(ValueError, match=r"keys seen: encoder\.conv1\.weight"):
        BEiT.from_state_dict({"encoder.conv1.weight": torch.randn(2, 2)})
    with pytest.raises(TypeError, match="mapping of tensors"):
        BEiT.from_state_dict(torch.randn(3))
    with pytest.raises(ValueError, match="no tensors found; top-level keys: epoch"):
        BEiT.from_state_dict({"epoch": 3})


# -- config inference -----------------------------------------------------------------------------


SQUARE_AND_RECTANGULAR = [
    dict(),
    dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, layer_scale_init_value=0.0),
    dict(vocab_size=0, num_classes=11, use_shared_rel_pos_bias=False, use_rel_pos_bias=True),
    dict(vocab_size=0, num_classes=11, use_mean_pooling=False, in_chans=1, mlp_ratio=2.5),
    dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True, img_size=(12, 28), embed_dim=128, num_heads=2),
    dict(img_size=36, patch_size=6, embed_dim=60, num_heads=5),
]


# transformers' BEiT is square only.
@pytest.mark.parametrize("overrides,fmt", [
    (overrides, fmt) for overrides in SQUARE_AND_RECTANGULAR for fmt in ("official", "hf-v4", "hf-v5")
    if fmt == "official" or not isinstance(overrides.get("img_size"), tuple)
])
def test_infers_the_config(overrides, fmt):
    model = random_model(**overrides)
    sd = {"official": model.state_dict, "hf-v4": lambda: model.to_hf_state_dict(4),
          "hf-v5": lambda: model.to_hf_state_dict(5)}[fmt]()
    # img_size (12, 28): a rectangular grid is not inferable from pos_embed alone.
    given = {"img_size": model.config.img_size} if isinstance(model.config.img_size, tuple) else {}
    official, _ = checkpoint.to_official_names(sd)
    inferred = checkpoint.infer_config(official, kernels="eager", drop_path_rate=0.0, **given)
    assert inferred == model.config


def test_infers_heads_from_default_head_dim_without_table():
    no_table = dict(use_shared_rel_pos_bias=False, use_abs_pos_emb=True)
    model = BEiT(small_config(embed_dim=128, num_heads=2, **no_table))
    config = checkpoint.infer_config(model.state_dict())
    assert config.num_heads == 128 // checkpoint.DEFAULT_HEAD_DIM
    with pytest.raises(ValueError, match="embed_dim 48 is not a multiple of the default head dim 64"):
        checkpoint.infer_config(BEiT(small_config(use_shared_rel_pos_bias=False)).state_dict())


def test_overrides_are_applied_before_inference():
    """Without a bias table the shapes do not tell the heads; num_heads given as an override does."""
    model = random_model(use_shared_rel_pos_bias=False, use_rel_pos_bias=False, use_abs_pos_emb=True)
    state = model.state_dict()
    with pytest.raises(ValueError, match="embed_dim 48 is not a multiple of the default head dim 64"):
        BEiT.from_state_dict(state)
    loaded = BEiT.from_state_dict(state, num_heads=3, kernels="eager", drop_path_rate=0.0)
    assert loaded.config == model.config
    images, mask = inputs(model.config)
    expected = model(images, bool_masked_pos=mask)
    torch.testing.assert_close(loaded.eval()(images, bool_masked_pos=mask), expected, rtol=0, atol=0)


def test_infers_image_size_from_bias_table():
    model = BEiT(small_config(img_size=28))  # 7x7 grid, table of 13*13+3 rows
    assert checkpoint.infer_config(model.state_dict()).img_size == 28


def test_loaded_model_buffers_and_dtype():
    """Loading skips the random init (meta device): derived buffers must still be right, and a
    half-precision checkpoint is cast to the float32 model."""
    model = random_model(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, drop_path_rate=0.2)
    half = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    loaded = BEiT.from_state_dict(half)
    fresh = BEiT(loaded.config)
    assert [n for n, _ in loaded.named_buffers()] == [n for n, _ in fresh.named_buffers()]
    for (name, buffer), (_, expected) in zip(loaded.named_buffers(), fresh.named_buffers()):
        assert torch.equal(buffer, expected), name
    assert [b.drop_path_rate for b in loaded.blocks] == [b.drop_path_rate for b in fresh.blocks]
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, half[name].float()), name


# -- errors ---------------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_listed():
    sd = random_model().state_dict()
    del sd["blocks.1.attn.q_bias"]
    sd["blocks.0.attn.k_bias"] = torch.zeros(48)
    listed = r"missing keys \['blocks.1.attn.q_bias'\], unexpected keys \['blocks.0.attn.k_bias'\]"
    with pytest.raises(ValueError, match=listed):
        BEiT.from_state_dict(sd)
    with pytest.warns(UserWarning, match="missing keys"):
        loaded = BEiT.from_state_dict(sd, strict=False)
    assert torch.equal(loaded.blocks[0].attn.v_bias, sd["blocks.0.attn.v_bias"])


def test_not_strict_gives_missing_parameters_a_new_models_values(monkeypatch):
    """Every kind of parameter a checkpoint may lack (zero biases and tables, layer scale, the conv
    projection, linear layers) gets what a new model has, never the memory of the meta-device load."""
    uninitialised = beitfast.model._uninitialised_model

    def poisoned(config):
        model = uninitialised(config)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(math.nan)
        return model

    monkeypatch.setattr(beitfast.model, "_uninitialised_model", poisoned)
    model = random_model()
    sd = model.state_dict()
    absent = ["blocks.1.attn.q_bias", "blocks.1.gamma_1", "rel_pos_bias.relative_position_bias_table",
              "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.mlp.fc2.weight", "norm.weight"]
    for key in absent:
        del sd[key]
    with pytest.warns(UserWarning, match="missing keys"):
        loaded = BEiT.from_state_dict(sd, model.config, strict=False)
    state = loaded.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert torch.equal(state["blocks.1.attn.q_bias"], torch.zeros(48))
    assert torch.equal(state["blocks.1.gamma_1"], torch.full((48,), model.config.layer_scale_init_value))
    assert torch.equal(state["rel_pos_bias.relative_position_bias_table"], torch.zeros(9 * 9 + 3, 3))
    assert torch.equal(state["norm.weight"], torch.ones(48))
    fan_in_bound = 1 / math.sqrt(3 * 4 * 4)  # PyTorch's default conv initialisation
    assert state["patch_embed.proj.bias"].abs().max() <= fan_in_bound
    assert state["patch_embed.proj.bias"].abs().sum() > 0
    assert state["blocks.0.mlp.fc2.weight"].abs().max() <= model.config.init_std
    for key, value in sd.items():
        assert torch.equal(state[key], value), key


def test_pretrained_backbone_into_classifier_config_not_strict():
    """Official fine-tuning start: the LM head and mask token are dropped, a new head and fc_norm
    initialised, the shared table copied into every layer."""
    pretrained = random_model()
    target = small_config(vocab_size=0, num_classes=9, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    new_parts = r"missing keys \['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight'\]"
    with pytest.warns(UserWarning, match=new_parts):
        model = BEiT.from_state_dict({"model": pretrained.state_dict()}, target, strict=False)
    table = pretrained.rel_pos_bias.relative_position_bias_table
    assert all(torch.equal(b.attn.relative_position_bias_table, table) for b in model.blocks)


def test_shape_mismatch_names_key_and_shapes():
    sd = random_model().state_dict()
    with pytest.raises(ValueError, match=r"mismatch for lm_head.weight: expected \(50, 48\), got \(37, 48\)"):
        BEiT.from_state_dict(sd, small_config(vocab_size=50))
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight: expected \(96, 48\), got \(192, 48\)"):
        BEiT.from_state_dict(sd, small_config(mlp_ratio=2.0))


def test_incomplete_hf_qkv_reported():
    sd = random_model().to_hf_state_dict(5)
    del sd["beit.layers.1.attention.k_proj.weight"]
    listed = r"missing keys \['blocks.1.attn.qkv.weight'\].*beit.layers.1.attention.q_proj.weight"
    with pytest.raises(ValueError, match=listed):
        BEiT.from_state_dict(sd)


def test_hf_export_refuses_what_transformers_cannot_hold():
    with pytest.raises(ValueError, match="no BeitForImageClassification equivalent"):
        random_model(num_classes=3).to_hf_state_dict(task="image_classification")
    with pytest.raises(ValueError, match="needs an LM head"):
        random_model(vocab_size=0, num_classes=3).to_hf_state_dict(task="masked_image_modeling")
    with pytest.raises(ValueError, match="version must be 4 or 5, got 3"):
        random_model().to_hf_state_dict(version=3)
    with pytest.raises(ValueError, match="task must be one of"):
        random_model().to_hf_config(task="segmentation")


# -- shared -> per-layer, resizing ----------------------------------------------------------------


def test_shared_to_per_layer_same_outputs():
    shared = random_model()
    per_layer = BEiT.from_state_dict(
        shared.state_dict(), small_config(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    ).eval()
    assert per_layer.rel_pos_bias is None
    images, mask = inputs(shared.config)
    with torch.no_grad():
        expected = shared(images, bool_masked_pos=mask)
        torch.testing.assert_close(per_layer(images, bool_masked_pos=mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(5, 5), (3, 7)])
def test_resize_identity_at_same_size(grid):
    table = torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, 4, dtype=torch.float64)
    assert checkpoint.resize_rel_pos_bias_table(table, grid, grid) is table
    pos = torch.randn(1, 1 + grid[0] * grid[1], 6)
    assert checkpoint.resize_pos_embed(pos, grid, grid) is pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("new_grid", [(7, 7), (3, 3), (4, 6)])
def test_bicubic_resize_smooth(new_grid, dtype):
    heads = 3
    offset = torch.arange(-4, 5.0, dtype=torch.float64)
    dy, dx = torch.meshgrid(offset, offset, indexing="ij")
    slopes = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    # A table linear in the offset, per head; the cls rows are distinct values that must survive.
    offsets = (dy[..., None] * slopes + 0.25 * dx[..., None] + 3.0).reshape(-1, heads)
    cls_rows = torch.randn(3, heads, dtype=torch.float64)
    table = torch.cat([offsets, cls_rows]).to(dtype)
    resized = checkpoint.resize_rel_pos_bias_table(table, new_grid, method="bicubic")
    hh, ww = 2 * new_grid[0] - 1, 2 * new_grid[1] - 1
    assert resized.shape == (hh * ww + 3, heads) and resized.dtype == dtype
    assert torch.equal(resized[-3:], table[-3:])
    grid = resized[:-3].double().reshape(hh, ww, heads)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    # The offset 0 stays at the centre with its value.
    torch.testing.assert_close(grid[hh // 2, ww // 2], offsets.reshape(9, 9, heads)[4, 4], rtol=tol, atol=tol)
    # Bicubic (PyTorch's a = -0.75) nearly reproduces a linear table: away from the borders (clamped
    # there) it stays within 1% of the table's range of the linear values at the rescaled offsets...
    ys = (torch.arange(hh, dtype=torch.float64) + 0.5) * 9 / hh - 0.5 - 4
    xs = (torch.arange(ww, dtype=torch.float64) + 0.5) * 9 / ww - 0.5 - 4
    expected = ys[:, None, None] * slopes + 0.25 * xs[None, :, None] + 3.0
    inner = (slice(2, hh - 2), slice(2, ww - 2))
    value_range = offsets.max() - offsets.min()
    assert (grid[inner] - expected[inner]).abs().max() <= 0.01 * value_range + tol
    # ...and monotone in the offset along the rows, with the sign of each head's slope.
    steps = grid[1:, inner[1]] - grid[:-1, inner[1]]
    assert (steps * slopes.sign() > 0).all()


def official_resize(table: torch.Tensor, new_side: int) -> torch.Tensor:
    """A float64 transcription of the official fine-tuning resize of a square grid's bias table
    (unilm beit/semantic_segmentation/mmcv_custom/checkpoint.py, also in beit/run_class_finetuning.py).
    The official code calls scipy's interp2d(x, y, z, kind="cubic")(dx, dy), removed from SciPy 1.14;
    on a full grid that is FITPACK's s=0 spline (regrid), evaluated by bispev, which clamps points
    beyond the nodes: RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)(dy, dx) is the same computation
    (checked equal to 5e-15 against interp2d of SciPy 1.12, outside the test suite)."""
    from scipy.interpolate import RectBivariateSpline

    src = math.isqrt(table.shape[0] - 3)
    dst = 2 * new_side - 1
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    nodes = [-d for d in reversed(dis)] + [0.0] + dis
    new = [float(i) for i in range(-(dst // 2), dst // 2 + 1)]
    values = table[:-3].double().numpy()
    heads = [
        RectBivariateSpline(nodes, nodes, values[:, h].reshape(src, src), kx=3, ky=3, s=0)(new, new)
        for h in range(table.shape[1])
    ]
    offsets = torch.stack([torch.from_numpy(h.reshape(-1)) for h in heads], dim=1)
    return torch.cat([offsets, table[-3:].double()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("new_side", [24, 32, 40])  # 224 px -> 384, 512, 640: 27x27 -> 47, 63, 79 offsets
def test_geometric_resize_equals_official(new_side, dtype):
    table = torch.randn(27 * 27 + 3, 3, generator=torch.Generator().manual_seed(new_side), dtype=dtype)
    resized = checkpoint.resize_rel_pos_bias_table(table, (new_side, new_side))  # the default method
    assert resized.dtype == dtype and resized.shape == ((2 * new_side - 1) ** 2 + 3, 3)
    assert torch.equal(resized[-3:], table[-3:])
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(resized.double(), official_resize(table, new_side), rtol=tol, atol=tol)


@pytest.mark.parametrize("img_size", [384, 512, 640])
@pytest.mark.parametrize("per_layer_source", [False, True])
def test_adapt_state_dict_resizes_per_layer_and_shared_tables_officially(per_layer_source, img_size):
    # 224 -> 384/512/640 px (27 -> 47/63/79 offsets): a shared table (copied into every block, as official
    # fine-tuning does) or per-layer ones.
    source = small_config(img_size=224, patch_size=16, vocab_size=0,
                          use_shared_rel_pos_bias=not per_layer_source, use_rel_pos_bias=per_layer_source)
    state = BEiT(source).state_dict()
    state = {k: torch.randn(v.shape) if k.endswith("bias_table") else v for k, v in state.items()}
    target = source.replace(img_size=img_size, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    adapted = checkpoint.adapt_state_dict(state, target)
    plain = checkpoint.adapt_state_dict(state, target, rel_pos_resize="bicubic")
    for i in range(target.depth):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        old = state[key if per_layer_source else "rel_pos_bias.relative_position_bias_table"]
        side = img_size // 16
        torch.testing.assert_close(adapted[key].double(), official_resize(old, side), rtol=1e-6, atol=1e-6)
        assert torch.equal(plain[key], checkpoint.resize_rel_pos_bias_table(old, (side, side), method="bicubic"))


@pytest.mark.parametrize("sides", [(5, 9), (9, 5), (4, 6), (3, 30)])
def test_geometric_resize_reproduces_cubics_and_clamps(sides):
    # Independent of SciPy: a not-a-knot cubic spline reproduces a cubic polynomial exactly, so a table
    # holding P(y, x) at the official node positions of its offsets resizes to P at the new integer
    # offsets, where they lie within the nodes; beyond them (3 -> 30 needs q > 1.5, the bisection's
    # bound) a point takes the value at the outermost node, as FITPACK's evaluation clamps.
    old, new = sides
    nodes = resize.geometric_offsets(2 * old - 1, 2 * new - 1)
    def poly(y, x):
        return 0.3 * y ** 3 - 0.1 * x ** 2 * y + 0.5 * x - 1.0 + 0.02 * x ** 3 * y ** 3

    at_nodes = poly(nodes[:, None], nodes[None, :]).reshape(-1, 1)
    table = torch.cat([at_nodes, torch.randn(3, 1, dtype=torch.float64)])
    resized = checkpoint.resize_rel_pos_bias_table(table, (new, new))
    offsets = torch.arange(-(new - 1), new, dtype=torch.float64).clamp(nodes[0], nodes[-1])
    expected = poly(offsets[:, None], offsets[None, :]).reshape(-1)
    torch.testing.assert_close(resized[:-3, 0], expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(resized[-3:], table[-3:])


def test_geometric_resize_offsets():
    nodes = resize.geometric_offsets(27, 47)
    assert nodes.shape == (27,) and nodes[13] == 0 and torch.equal(nodes, -nodes.flip(0))
    steps = nodes[14:] - nodes[13:-1]
    q = steps[1] / steps[0]
    torch.testing.assert_close(steps[1:] / steps[:-1], torch.full((12,), q.item(), dtype=torch.float64))
    assert steps[0] == 1 and abs(nodes[-1] - 23) < 1e-4  # the largest old offset lands on the largest new one


def test_resize_pos_embed_keeps_cls_and_constant():
    pos = torch.full((1, 1 + 16, 5), 0.7)
    pos[:, 0] = torch.randn(5)
    resized = checkpoint.resize_pos_embed(pos, (6, 3))
    assert resized.shape == (1, 1 + 18, 5)
    assert torch.equal(resized[:, 0], pos[:, 0])
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 18, 5), 0.7))


def test_load_into_other_image_size():
    model = random_model(use_abs_pos_emb=True)  # shared table and absolute embedding, 5x5 grid
    bigger = BEiT.from_state_dict(model.state_dict(), model.config.replace(img_size=28))
    assert bigger.rel_pos_bias.relative_position_bias_table.shape == (13 * 13 + 3, 3)
    assert bigger.pos_embed.shape == (1, 1 + 49, 48)
    images, _ = inputs(bigger.config)
    assert torch.isfinite(bigger.eval()(images)).all()
    same = model.resized(model.config.img_size)
    assert_state_equal(same.state_dict(), model.state_dict())
    back = bigger.resized(20)
    assert back.pos_embed.shape == model.pos_embed.shape


def test_bad_resize_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        checkpoint.resize_rel_pos_bias_table(torch.randn(12, 2), (3, 3), method="cubic")
    with pytest.raises(ValueError, match="at least 4 offsets per axis, this table has 3.*method='bicubic'"):
        checkpoint.resize_rel_pos_bias_table(torch.randn(12, 2), (3, 3))
    with pytest.raises(ValueError, match="rel_pos_resize must be one of"):
        checkpoint.adapt_state_dict(random_model().state_dict(), small_config(), rel_pos_resize="linear")


def test_bad_table_rows_refused():
    with pytest.raises(ValueError, match="10 rows is not"):
        checkpoint.resize_rel_pos_bias_table(torch.randn(10, 2), (3, 3))
    with pytest.raises(ValueError, match="table has 28 rows, grid"):
        checkpoint.resize_rel_pos_bias_table(torch.randn(28, 2), (3, 3), old_grid=(2, 4))


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
@pytest.mark.parametrize("overrides", [dict(), dict(img_size=(12, 20), vocab_size=0, num_classes=4)])
def test_save_load_round_trip(tmp_path, suffix, overrides):
    model = random_model(**overrides)
    path = tmp_path / f"weights{suffix}"
    model.save(path)
    loaded = BEiT.load(path)
    assert loaded.config == model.config
    assert_state_equal(loaded.state_dict(), model.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_pth_is_read_with_weights_only(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = random_model()
    path = tmp_path / "official.pth"
    # An official training checkpoint: wrapped, with argparse arguments and a step counter.
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1), "epoch": 2}, path)
    loaded = BEiT.from_file(path, kernels="eager", drop_path_rate=0.0)
    assert calls == [True]
    assert_state_equal(loaded.state_dict(), model.state_dict())


def test_pickled_code_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": random_model().state_dict(), "hook": math.floor}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        BEiT.from_file(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_atomic_write_keeps_old_file(tmp_path, monkeypatch, suffix):
    import safetensors.torch

    old, new = random_model(), random_model(vocab_size=5)
    path = tmp_path / f"model{suffix}"
    old.save(path)
    before = path.read_bytes()

    def failing_writer(obj, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_writer)
    monkeypatch.setattr(torch, "save", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_save_refuses_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in .safetensors, .pth or .pt, got '.*model.ckpt'"):
        random_model().save(tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        BEiT.load(tmp_path / "absent.pth")


def test_hf_files_without_config_are_inferred(tmp_path):
    import safetensors.torch

    model = random_model()
    safetensors.torch.save_file(model.to_hf_state_dict(4), tmp_path / "model.safetensors")
    torch.save(model.to_hf_state_dict(5), tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        loaded = BEiT.from_file(tmp_path / name, kernels="eager", drop_path_rate=0.0)
        assert loaded.config == model.config.replace(layer_norm_eps=1e-12)  # Hugging Face's default
        assert_state_equal(loaded.state_dict(), model.state_dict())


def test_timm_hub_folder_config_is_not_read_as_transformers(tmp_path):
    import json

    import safetensors.torch

    model = random_model(vocab_size=0, num_classes=6, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    safetensors.torch.save_file(model.to_timm_state_dict(), tmp_path / "model.safetensors")
    timm_config = {"architecture": "beit_base_patch16_224", "num_classes": 6}
    (tmp_path / "config.json").write_text(json.dumps(timm_config))
    loaded = BEiT.from_file(tmp_path, kernels="eager", drop_path_rate=0.0)
    assert loaded.config == model.config
    assert_state_equal(loaded.state_dict(), model.state_dict())


def test_sharded_hf_folder_and_config_beside_a_file(tmp_path):
    import json

    import safetensors.torch

    model = random_model(layer_norm_eps=1e-12)
    hf = model.to_hf_state_dict(5)
    keys = sorted(hf)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        safetensors.torch.save_file({k: hf[k].contiguous() for k in names}, tmp_path / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf_config = {"model_type": "beit", "architectures": ["BeitForMaskedImageModeling"],
                 **model.to_hf_config(), "drop_path_rate": 0.0}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    loaded = BEiT.from_file(tmp_path, kernels="eager")
    assert loaded.config == model.config  # eps 1e-12 comes from config.json, not the default
    assert_state_equal(loaded.state_dict(), model.state_dict())
    torch.save(model.to_hf_state_dict(4), tmp_path / "pytorch_model.bin")
    assert BEiT.from_file(tmp_path / "pytorch_model.bin", kernels="eager").config == model.config


@pytest.mark.parametrize("version", [4, 5])
def test_segmentation_file_in_transformers_names_reads_as_its_state_dict(tmp_path, version):
    """A transformers segmentation weights file with no config.json: from_file infers the config as
    from_state_dict does, with transformers' LayerNorm eps (the file's names, not ours after renaming)."""
    import safetensors.torch

    from beitfast import BEiTForSegmentation
    from beitfast.segmentation import SegmentationConfig

    config = BEiTConfig(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, vocab_size=0,
                        use_shared_rel_pos_bias=False, use_rel_pos_bias=True, layer_norm_eps=1e-12,
                        drop_path_rate=0.0, kernels="eager")
    model = BEiTForSegmentation(config, SegmentationConfig(num_classes=3, out_indices=(0, 1, 2, 3),
                                                           auxiliary_channels=8))
    hf = {k: v.contiguous() for k, v in model.to_hf_state_dict(version).items()}
    safetensors.torch.save_file(hf, tmp_path / "model.safetensors")
    settings = dict(num_heads=2, out_indices=(0, 1, 2, 3), kernels="eager", drop_path_rate=0.0)
    from_file = BEiTForSegmentation.from_file(tmp_path / "model.safetensors", **settings)
    from_state_dict = BEiTForSegmentation.from_state_dict(hf, **settings)
    assert from_file.config == from_state_dict.config == model.config
    assert from_file.segmentation_config == from_state_dict.segmentation_config == model.segmentation_config
    assert_state_equal(from_file.state_dict(), model.state_dict())
