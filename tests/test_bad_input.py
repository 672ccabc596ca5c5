"""Bad input everywhere, property-based: every rejection is a TypeError or ValueError naming the
argument and the expected form; nothing fails with another exception; nothing the documentation forbids
is accepted, and everything it allows is.

The configs and the masking generator are checked against an oracle written here from their
documentation (a value is accepted exactly when the documentation allows it). The ops, the model and
the tokenizers take one valid call of random small shapes and spoil one argument in one way (a list or a
NumPy array instead of a tensor, another dtype, rank, size or device, a missing tensor): the call must
be refused, naming that argument. Examples are drawn deterministically (derandomised, no database).
"""

from __future__ import annotations

import math
import numbers
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beitfast import BEiT, BEiTConfig, MaskingGenerator, ops
from beitfast.masking import BACKENDS
from beitfast.ops import dispatch
from beitfast.tokenizers import DalleTokenizer, KMeansTokenizer
from beitfast.train import TrainConfig

# The same examples on every run, no example database, no deadline (the CPU cores are shared).
SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=25)
# Per (argument, spoil) pair, each a test case of its own: a few random shapes.
EACH = settings(SETTINGS, max_examples=5)


def refused(call, name: str, error=(TypeError, ValueError)) -> None:
    """Run ``call``: it must raise ``error`` (TypeError or ValueError) whose message names ``name`` (as a
    whole word) and says what was expected. Any other exception propagates and fails the test."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), f"{name!r} is not named in: {message}"
    assert re.search(r"\b(must|needs?|expected|known)\b", message), f"no expected form in: {message}"


# -- values of every kind ----------------------------------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.integers(-(2 ** 70), 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 300), st.text(max_size=6),
    st.sampled_from(["auto", "eager", "triton", "cpu", "bf16", "ddp", "compile", "float32"]),
    st.lists(st.integers(-2, 300), max_size=3), st.tuples(st.integers(-2, 300), st.integers(-2, 300)),
    st.tuples(st.integers(-2, 300), st.floats(-2, 300)),
    st.integers(-2, 300).map(np.int64), st.integers(0, 255).map(np.uint8), st.floats(-2, 300).map(np.float32),
    st.booleans().map(np.bool_), st.integers(1, 4).map(torch.tensor), st.just(10 ** 400),
)


def is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_int(value, minimum=-math.inf) -> bool:
    return isinstance(value, numbers.Integral) and not is_bool(value) and value >= minimum


def is_real(value, low=-math.inf, high=math.inf, low_open=False, high_open=False) -> bool:
    if not isinstance(value, numbers.Real) or is_bool(value) or not is_finite(value):
        return False
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


def is_finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def is_plain(value) -> bool:
    """What a config stores: plain Python values (JSON-serialisable), whatever NumPy type came in."""
    if isinstance(value, tuple):
        return all(is_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


# -- BEiTConfig --------------------------------------------------------------------------------------

# What the documentation (BEiTConfig's docstring and field comments) allows for each field.
BEIT_FIELDS = {
    "img_size": lambda v: is_int(v, 1) or (isinstance(v, (list, tuple)) and len(v) == 2
                                           and all(is_int(s, 1) for s in v)),
    "patch_size": lambda v: is_int(v, 1),
    "in_chans": lambda v: is_int(v, 1),
    "embed_dim": lambda v: is_int(v, 1),
    "depth": lambda v: is_int(v, 1),
    "num_heads": lambda v: is_int(v, 1),
    "mlp_ratio": lambda v: is_real(v, 0, low_open=True),
    "vocab_size": lambda v: is_int(v, 0),
    "num_classes": lambda v: is_int(v, 0),
    "use_abs_pos_emb": is_bool,
    "use_rel_pos_bias": is_bool,
    "use_shared_rel_pos_bias": is_bool,
    "layer_scale_init_value": lambda v: is_real(v, 0),
    "drop_path_rate": lambda v: is_real(v, 0, 1, high_open=True),
    "use_mean_pooling": is_bool,
    "init_std": lambda v: is_real(v, 0, low_open=True),
    "init_scale": lambda v: is_real(v, 0),
    "layer_norm_eps": lambda v: is_real(v, 0, low_open=True),
    "kernels": lambda v: isinstance(v, str) and v in ["auto", *dispatch.backend_names()],
    # the options of the fast step (README "Fast step")
    "fuse_blocks": lambda v: isinstance(v, str) and v in ("auto", "compile", "off"),
    "residual_dtype": lambda v: isinstance(v, str) and v in ("float32", "autocast"),
    "checkpoint_blocks": lambda v: is_int(v, -1),
}
SMALL = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, vocab_size=10, num_classes=0,
             use_shared_rel_pos_bias=False, drop_path_rate=0.0, kernels="eager")


@pytest.fixture(scope="module")
def model():
    return BEiT(BEiTConfig(**SMALL)).eval()


@pytest.fixture(scope="module")
def tokenizers():
    gen = torch.Generator().manual_seed(0)
    return [KMeansTokenizer(torch.randn(7, 3 * 4 * 4, generator=gen), patch_size=4, input_size=16),
            DalleTokenizer(n_hid=8, n_blk_per_group=1, vocab_size=16, input_size=16)]


def test_the_oracle_knows_every_field():
    """A new config field needs its documented rule here, so that the properties cover it."""
    assert set(BEiTConfig.__dataclass_fields__) == set(BEIT_FIELDS)
    assert set(TrainConfig.__dataclass_fields__) == set(TRAIN_FIELDS)


@SETTINGS
@given(field=st.sampled_from(sorted(BEIT_FIELDS)), value=ANY_VALUE)
def test_beit_config_accepts_a_field_exactly_as_documented(field, value):
    allowed = BEIT_FIELDS[field](value)
    # A config where any allowed value of the field fits the other fields.
    base = {**SMALL, "patch_size": 1, "embed_dim": 64, "num_heads": 1}
    if allowed and field == "patch_size":
        base["img_size"] = value
    if allowed and field == "num_heads":
        base["embed_dim"] = value
    if allowed and field in ("mlp_ratio", "embed_dim"):
        # the MLP has int(embed_dim * mlp_ratio) units: at least one, finitely many
        units = 64 * value if field == "mlp_ratio" else value * 4
        allowed = is_finite(units) and units >= 1
    if not allowed:
        refused(lambda: BEiTConfig(**{**base, field: value}), field)
        return
    config = BEiTConfig(**{**base, field: value})
    stored = getattr(config, field)
    assert is_plain(stored), (field, stored)
    assert stored == (tuple(value) if isinstance(value, list) else value)


@FEW
@given(img=st.integers(1, 3), patch=st.sampled_from([1, 2, 4]), heads=st.integers(1, 3),
       head_dim=st.integers(2, 6), depth=st.integers(1, 2), mlp_ratio=st.floats(0.5, 3),
       vocab=st.integers(0, 5), classes=st.integers(0, 4), table=st.sampled_from(["none", "shared", "layer"]),
       abs_pos=st.booleans(), mean_pooling=st.booleans(), layer_scale=st.sampled_from([0, 0.1]),
       numpy_ints=st.booleans())
def test_every_valid_small_config_builds_a_model_that_runs(img, patch, heads, head_dim, depth, mlp_ratio, vocab,
                                                          classes, table, abs_pos, mean_pooling, layer_scale,
                                                          numpy_ints):
    as_int = np.int64 if numpy_ints else int
    config = BEiTConfig(
        img_size=(as_int(img * patch), as_int((img + 1) * patch)), patch_size=as_int(patch),
        embed_dim=as_int(heads * head_dim), num_heads=as_int(heads), depth=as_int(depth), mlp_ratio=mlp_ratio,
        vocab_size=as_int(vocab), num_classes=as_int(classes), use_rel_pos_bias=table == "layer",
        use_shared_rel_pos_bias=table == "shared", use_abs_pos_emb=abs_pos, use_mean_pooling=mean_pooling,
        layer_scale_init_value=layer_scale, drop_path_rate=0.0, kernels="eager",
    )
    model = BEiT(config)
    images = torch.randn(2, 3, img * patch, (img + 1) * patch)
    out = model(images)
    assert out.shape == (2, classes or heads * head_dim) and torch.isfinite(out).all()
    if vocab:
        mask = torch.zeros(2, config.num_patches, dtype=torch.bool)
        mask[:, 0] = True
        labels = torch.randint(0, vocab, (2, config.num_patches))
        assert torch.isfinite(model(images, bool_masked_pos=mask, labels=labels))


# -- TrainConfig -------------------------------------------------------------------------------------

TRAIN_FIELDS = {
    "steps": lambda v: is_int(v, 1),
    "batch_size": lambda v: is_int(v, 1),
    "lr": lambda v: is_real(v, 0),
    "min_lr": lambda v: is_real(v, 0),
    "warmup_steps": lambda v: is_int(v, 0),
    "weight_decay": lambda v: is_real(v, 0),
    "weight_decay_end": lambda v: v is None or is_real(v, 0),
    "betas": lambda v: isinstance(v, (list, tuple)) and len(v) == 2
    and all(is_real(b, 0, 1, high_open=True) for b in v),
    "eps": lambda v: is_real(v, 0, low_open=True),
    "clip_grad": lambda v: v is None or is_real(v, 0, low_open=True),
    "layer_decay": lambda v: v is None or is_real(v, 0, 1, low_open=True),
    "label_smoothing": lambda v: is_real(v, 0, 1, high_open=True),
    "linear_probe": is_bool,
    "checkpoint_every": lambda v: is_int(v, 1),
    "seed": lambda v: is_int(v, 0),
    "num_workers": lambda v: is_int(v, 0),
    "precision": lambda v: isinstance(v, str) and v in ("auto", "bf16", "fp32"),
    "parallel": lambda v: isinstance(v, str) and v in ("ddp", "fsdp"),
    "input_path": lambda v: isinstance(v, str) and v in ("auto", "cpu", "device"),
    "progress": is_bool,
    "log_every": lambda v: is_int(v, 0),
    "output_dir": lambda v: isinstance(v, (str, os.PathLike)),
    "resume": lambda v: v is None or isinstance(v, (str, os.PathLike)),
    "allow_tokenizer_change": is_bool,
    "device": lambda v: v == "auto" or isinstance(v, torch.device) or (isinstance(v, str) and parses_as_device(v)),
    # the options of the fast step (README "Fast step")
    "fused_optimizer": is_bool,
    "compile": is_bool,
    "cuda_graphs": is_bool,
    "fp8": is_bool,
}


def parses_as_device(name: str) -> bool:
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


@SETTINGS
@given(field=st.sampled_from(sorted(TRAIN_FIELDS)),
       value=st.one_of(ANY_VALUE, st.tuples(st.floats(-1, 2), st.floats(-1, 2)), st.just([0.9, 0.95]),
                       st.sampled_from(["cuda:1", "meta", "cpu:0", "gpu", "cuda:x"])))
def test_train_config_accepts_a_field_exactly_as_documented(field, value):
    # Enough steps for any warmup drawn (a run must reach its peak learning rate).
    base = dict(output_dir="unused", steps=2 ** 80, warmup_steps=0)
    if not TRAIN_FIELDS[field](value):
        refused(lambda: TrainConfig(**{**base, field: value}), field)
        return
    config = TrainConfig(**{**base, field: value})
    stored = getattr(config, field)
    assert is_plain(stored), (field, stored)
    assert stored == (tuple(value) if isinstance(value, list) else value)


# -- MaskingGenerator --------------------------------------------------------------------------------

@SETTINGS
@given(input_size=st.one_of(st.integers(-1, 6), st.tuples(st.integers(0, 6), st.integers(0, 6)),
                            st.tuples(st.integers(1, 5)), st.just((4, 4.0)), st.just("4"), st.just(np.int64(4))),
       num_masking_patches=st.one_of(st.integers(-1, 40), st.floats(0, 10), st.just(np.int32(3))),
       min_num_patches=st.one_of(st.integers(-1, 5), st.just(2.0), st.none()),
       max_num_patches=st.one_of(st.none(), st.integers(-1, 5), st.just("3")),
       min_aspect=st.one_of(st.floats(-1, 4), st.just(float("nan")), st.just(float("inf")), st.just(True)),
       max_aspect=st.one_of(st.none(), st.floats(-1, 4), st.just("wide")),
       seed=st.one_of(st.none(), st.integers(-3, 2 ** 64), st.just(1.5), st.just("x")))
def test_masking_generator_accepts_settings_exactly_as_documented(input_size, num_masking_patches, min_num_patches,
                                                                  max_num_patches, min_aspect, max_aspect, seed):
    sizes = input_size if isinstance(input_size, tuple) else (input_size, input_size)
    sizes_ok = len(sizes) == 2 and all(is_int(s, 1) for s in sizes)
    checks = [
        ("input_size", sizes_ok),
        ("num_masking_patches", sizes_ok and is_int(num_masking_patches, 0)
         and num_masking_patches <= sizes[0] * sizes[1]),
        ("min_num_patches", is_int(min_num_patches, 1)),
        ("max_num_patches", max_num_patches is None or is_int(max_num_patches, 1)),
        ("min_aspect", is_real(min_aspect, 0, low_open=True)),
        ("max_aspect", max_aspect is None or is_real(max_aspect, 0, low_open=True)),
        ("seed", seed is None or is_int(seed)),
    ]
    args = dict(input_size=input_size, num_masking_patches=num_masking_patches, min_num_patches=min_num_patches,
                max_num_patches=max_num_patches, min_aspect=min_aspect, max_aspect=max_aspect, seed=seed)
    wrong = [name for name, ok in checks if not ok]
    if wrong:
        # the first wrong setting, in the order of the signature, is the one named
        refused(lambda: MaskingGenerator(**args), wrong[0])
        return
    generator = MaskingGenerator(**args)
    masks = generator.batch(3, backend="python")
    assert masks.shape == (3, sizes[0] * sizes[1]) and masks.dtype == torch.bool
    assert (masks.sum(1) <= num_masking_patches).all()


@FEW
@given(batch_size=st.one_of(st.integers(-2, 3), st.just(2.0), st.just("2"), st.just(True), st.just(np.int64(2))),
       device=st.sampled_from([None, "cpu", torch.device("cpu"), "gpu", "cpu:x", 3.5]),
       backend=st.sampled_from([None, "python", "cpp", "numpy", "", ["python"]]))
def test_masking_batch_accepts_arguments_exactly_as_documented(batch_size, device, backend):
    generator = MaskingGenerator((4, 5), 6, min_num_patches=2, seed=0)
    checks = [("batch_size", is_int(batch_size, 0)),
              ("device", device in (None, "cpu") or isinstance(device, torch.device)),
              ("backend", backend in (None, *BACKENDS))]
    wrong = [name for name, ok in checks if not ok]
    if wrong:
        refused(lambda: generator.batch(batch_size, device, backend), wrong[0])
        return
    try:
        masks = generator.batch(batch_size, device, backend)
    except RuntimeError as error:  # a backend this install lacks: an environment fact, not bad input
        assert "unavailable" in str(error)
        return
    assert masks.shape == (batch_size, 20) and masks.dtype == torch.bool


# -- spoiling one argument of a valid call -----------------------------------------------------------

def spoil(value, how: str):
    """``value`` made wrong in one way (for a tensor argument)."""
    if how == "list":
        return value.tolist()
    if how == "numpy":
        return value.numpy()
    if how == "scalar":
        return 1.0
    if how == "missing":
        return None
    if how == "dtype":
        return value.to(torch.float32 if value.dtype in (torch.bool, torch.int64, torch.int32) else torch.int32)
    if how == "rank":
        return value.unsqueeze(0)
    if how == "size":
        return torch.cat([value, value.narrow(-1, 0, 1)], dim=-1)
    if how == "device":
        return value.to("meta")
    raise AssertionError(how)


TENSOR_SPOILS = ["list", "numpy", "scalar", "dtype", "rank", "size", "device"]


def patch_embed_call(gen: torch.Generator, batch: int, grid: tuple[int, int], patch: int, dim: int, dtype):
    n = grid[0] * grid[1]
    mask = torch.rand(batch, n, generator=gen) < 0.5
    return dict(
        images=torch.randn(batch, 3, grid[0] * patch, grid[1] * patch, generator=gen, dtype=dtype),
        weight=torch.randn(dim, 3, patch, patch, generator=gen, dtype=dtype),
        bias=torch.randn(dim, generator=gen, dtype=dtype), patch_size=patch, mask=mask,
        mask_token=torch.randn(1, 1, dim, generator=gen, dtype=dtype),
        cls_token=torch.randn(1, 1, dim, generator=gen, dtype=dtype),
        pos_embed=torch.randn(1, n + 1, dim, generator=gen, dtype=dtype),
    )


CALL_SHAPES = dict(seed=st.integers(0, 2 ** 31), batch=st.integers(1, 3),
                   dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))


@pytest.mark.parametrize("arg", ["images", "weight", "bias", "mask", "mask_token", "cls_token", "pos_embed"])
@pytest.mark.parametrize("how", TENSOR_SPOILS + ["missing"])
@EACH
@given(**CALL_SHAPES, grid=st.tuples(st.integers(1, 3), st.integers(1, 3)), patch=st.integers(1, 4),
       dim=st.integers(1, 9))
def test_masked_patch_embed_refuses_each_spoilt_argument(seed, batch, dtype, grid, patch, dim, arg, how):
    call = patch_embed_call(torch.Generator().manual_seed(seed), batch, grid, patch, dim, dtype)
    out = ops.masked_patch_embed(**call)
    assert out.shape == (batch, 1 + grid[0] * grid[1], dim)
    if how == "missing" and arg not in ("images", "weight", "mask_token"):
        return  # the optional ones may be left out
    if how == "device" and arg == "images":
        how = "rank"  # the others would be the ones on another device
    if how == "size" and arg == "images" and patch == 1:
        how = "rank"  # one more column is another valid image size for 1-pixel patches
    call[arg] = spoil(call[arg], how)
    if how == "missing" and arg == "mask_token":
        refused(lambda: ops.masked_patch_embed(**call), arg)  # a mask needs a mask_token
    else:
        refused(lambda: ops.masked_patch_embed(**call), arg)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31),
       patch_size=st.one_of(st.integers(-2, 0), st.floats(0.5, 4.5), st.just("4"), st.just(True), st.none(),
                            st.just(np.int64(3)), st.just(np.int32(0))))
def test_masked_patch_embed_patch_size(seed, patch_size):
    call = patch_embed_call(torch.Generator().manual_seed(seed), 2, (2, 2), 3, 5, torch.float32)
    call["patch_size"] = patch_size
    if is_int(patch_size, 1):
        assert ops.masked_patch_embed(**call).shape == (2, 5, 5)
    else:
        refused(lambda: ops.masked_patch_embed(**call), "patch_size")


def attention_call(gen, batch, heads, n, head_dim, dtype):
    rows = (2 * n - 1) + 3
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    return dict(q=q, k=k, v=v, bias_table=torch.randn(rows, heads, generator=gen, dtype=dtype),
                rel_index=torch.randint(0, rows, (n, n), generator=gen))


@pytest.mark.parametrize("arg", ["q", "k", "v", "bias_table", "rel_index"])
@pytest.mark.parametrize("how", TENSOR_SPOILS)
@EACH
@given(**CALL_SHAPES, heads=st.integers(1, 3), n=st.integers(1, 7), head_dim=st.integers(1, 9))
def test_rel_pos_attention_refuses_each_spoilt_argument(seed, batch, dtype, heads, n, head_dim, arg, how):
    call = attention_call(torch.Generator().manual_seed(seed), batch, heads, n, head_dim, dtype)
    assert ops.rel_pos_attention(**call).shape == (batch, heads, n, head_dim)
    if how == "device" and arg == "q":
        how = "rank"
    call[arg] = spoil(call[arg], how)
    refused(lambda: ops.rel_pos_attention(**call), arg)


def test_rel_pos_attention_scale():
    call = attention_call(torch.Generator().manual_seed(0), 1, 2, 5, 8, torch.float32)
    for scale in ("0.3", [0.3]):
        refused(lambda: ops.rel_pos_attention(**call, scale=scale), "scale", TypeError)


def cross_entropy_call(gen, batch, n, dim, vocab, dtype, masked: bool):
    mask = torch.rand(batch, n, generator=gen) < 0.5
    mask[0, 0] = True
    hidden = torch.randn(batch, n, dim, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, n), generator=gen)
    if not masked:
        hidden, labels, mask = hidden[mask], labels[mask], None
    return dict(hidden=hidden, weight=torch.randn(vocab, dim, generator=gen, dtype=dtype),
                bias=torch.randn(vocab, generator=gen, dtype=dtype), labels=labels, mask=mask)


@pytest.mark.parametrize("arg", ["hidden", "weight", "bias", "labels", "mask"])
@pytest.mark.parametrize("how", TENSOR_SPOILS)
@EACH
@given(**CALL_SHAPES, n=st.integers(1, 6), dim=st.integers(1, 9), vocab=st.integers(2, 12), masked=st.booleans())
def test_masked_lm_cross_entropy_refuses_each_spoilt_argument(seed, batch, dtype, n, dim, vocab, masked, arg,
                                                              how):
    call = cross_entropy_call(torch.Generator().manual_seed(seed), batch, n, dim, vocab, dtype, masked)
    assert ops.masked_lm_cross_entropy(**call).shape == ()
    if arg == "mask" and not masked:
        arg = "labels"
    if how == "device" and arg == "hidden":
        how = "rank"
    call[arg] = spoil(call[arg], how)
    refused(lambda: ops.masked_lm_cross_entropy(**call), arg)


def test_masked_lm_cross_entropy_options():
    call = cross_entropy_call(torch.Generator().manual_seed(0), 2, 5, 8, 11, torch.float32, True)
    for ignore_index in ("-100", 1.5, None):
        refused(lambda: ops.masked_lm_cross_entropy(**call, ignore_index=ignore_index), "ignore_index")
    for reduction in ("avg", None, ["mean"]):
        refused(lambda: ops.masked_lm_cross_entropy(**call, reduction=reduction), "reduction")


def model_call():
    gen = torch.Generator().manual_seed(0)
    return dict(images=torch.randn(2, 3, 16, 16, generator=gen), bool_masked_pos=torch.rand(2, 4, generator=gen) < 0.5,
                labels=torch.randint(0, 10, (2, 4), generator=gen))


def tokenizer_call():
    return dict(images=torch.rand(2, 3, 16, 16))


LIST_CASES = [
    *[("masked_patch_embed", arg) for arg in ("images", "weight", "bias", "mask", "mask_token", "cls_token",
                                             "pos_embed")],
    *[("rel_pos_attention", arg) for arg in ("q", "k", "v", "bias_table", "rel_index")],
    *[("masked_lm_cross_entropy", arg) for arg in ("hidden", "weight", "bias", "labels", "mask")],
    *[("BEiT", arg) for arg in ("images", "bool_masked_pos", "labels")],
    *[(kind, "images") for kind in ("KMeansTokenizer.tokenize", "DalleTokenizer.tokenize")],
]


@pytest.mark.parametrize("what, arg", LIST_CASES)
@pytest.mark.parametrize("how", ["list", "numpy", "scalar"])
def test_not_a_tensor_where_a_tensor_belongs_is_a_type_error(model, tokenizers, what, arg, how):
    """A list (or an array, a number) given for a tensor: a TypeError naming the argument, not an
    AttributeError about ``.dim`` from deep inside."""
    gen = torch.Generator().manual_seed(0)
    function, call = {
        "masked_patch_embed": (ops.masked_patch_embed, lambda: patch_embed_call(gen, 2, (2, 3), 4, 8, torch.float32)),
        "rel_pos_attention": (ops.rel_pos_attention, lambda: attention_call(gen, 2, 2, 5, 8, torch.float32)),
        "masked_lm_cross_entropy": (ops.masked_lm_cross_entropy,
                                    lambda: cross_entropy_call(gen, 2, 5, 8, 11, torch.float32, True)),
        "BEiT": (model, model_call),
        "KMeansTokenizer.tokenize": (tokenizers[0].tokenize, tokenizer_call),
        "DalleTokenizer.tokenize": (tokenizers[1].tokenize, tokenizer_call),
    }[what]
    call = call()
    call[arg] = spoil(call[arg], how)
    refused(lambda: function(**call), arg, TypeError)


@pytest.mark.parametrize("what, arg", [
    ("masked_patch_embed", "weight"),
    ("rel_pos_attention", "q"),
    ("masked_lm_cross_entropy", "weight"),
])
def test_empty_feature_dimension_is_refused(what, arg):
    """A zero-sized embedding, head or vocabulary dimension (an empty batch or sequence is fine)."""
    gen = torch.Generator().manual_seed(0)
    if what == "masked_patch_embed":
        call = patch_embed_call(gen, 2, (2, 2), 4, 8, torch.float32)
        call["weight"] = call["weight"][:0]
        function = ops.masked_patch_embed
    elif what == "rel_pos_attention":
        call = attention_call(gen, 2, 2, 5, 8, torch.float32)
        call.update(q=call["q"][..., :0], k=call["k"][..., :0], v=call["v"][..., :0])
        function = ops.rel_pos_attention
    else:
        call = cross_entropy_call(gen, 2, 5, 8, 11, torch.float32, True)
        call.update(weight=call["weight"][:0], bias=call["bias"][:0])
        function = ops.masked_lm_cross_entropy
    refused(lambda: function(**call), arg)


# -- the model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["images", "bool_masked_pos", "labels"])
@pytest.mark.parametrize("how", ["list", "numpy", "scalar", "dtype", "rank", "size"])
@EACH
@given(seed=st.integers(0, 2 ** 31), batch=st.integers(1, 3))
def test_model_refuses_each_spoilt_argument(model, seed, batch, arg, how):
    gen = torch.Generator().manual_seed(seed)
    call = dict(images=torch.randn(batch, 3, 16, 16, generator=gen),
                bool_masked_pos=torch.rand(batch, 4, generator=gen) < 0.5,
                labels=torch.randint(0, 10, (batch, 4), generator=gen))
    assert torch.isfinite(model(**call))
    call[arg] = spoil(call[arg], how)
    refused(lambda: model(**call), arg)
    if arg != "labels":
        refused(lambda: model.forward_features(call["images"], call["bool_masked_pos"]), arg)


def test_model_accepts_numpy_integer_sizes():
    """A NumPy integer patch size (from an array of settings, say) was refused by the patch embedding."""
    config = BEiTConfig(**{**SMALL, "patch_size": np.int64(8), "img_size": np.int32(16), "depth": np.int64(1)})
    out = BEiT(config)(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 16)


# -- tokenizers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("how", ["list", "numpy", "scalar", "dtype", "rank", "size", "channels"])
@EACH
@given(batch=st.integers(1, 2))
def test_tokenize_refuses_spoilt_images(tokenizers, which, batch, how):
    tokenizer = tokenizers[which]
    images = torch.rand(batch, 3, 16, 16)
    assert tokenizer.tokenize(images).shape == (batch, tokenizer.grid_size, tokenizer.grid_size)
    if how == "channels":
        images = images[:, :2]
    else:
        images = spoil(images, how)
    refused(lambda: tokenizer.tokenize(images), "images")
