"""Visual tokenizers: the DALL-E encoder and its safe loader, the k-means patch tokenizer, saved files."""

from __future__ import annotations

import builtins
import math
import os
import pickle
import sys
import types
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from beitfast.tokenizers import DalleTokenizer, KMeansTokenizer, Tokenizer, UnsafePickleError, load_tokenizer
from beitfast.tokenizers.dvae import map_pixels
from beitfast.tokenizers.kmeans import _Reservoir


SIZE = 32  # tokenizer view of the tests: 4 x 4 tokens of 8 x 8 pixels


def smooth_images(batch: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """Images with structure (a smooth colour field plus one vertical step edge), values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    field = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    edge_column = torch.randint(size // 8, size - size // 8, (batch, 1, 1, 1), generator=g)
    step = (torch.arange(size).view(1, 1, 1, size) >= edge_column) * torch.rand(batch, 3, 1, 1, generator=g)
    return 0.7 * field + 0.3 * step


def reference_patches(images: torch.Tensor, patch_size: int, contrast_floor: float) -> torch.Tensor:
    """float64 normalised patches [B*N, 3 p^2], channel-major values, row-major patch order."""
    columns = F.unfold(images.double(), kernel_size=patch_size, stride=patch_size)  # [B, 3 p^2, N]
    patches = columns.transpose(1, 2).reshape(-1, columns.shape[1])
    centred = patches - patches.mean(dim=1, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(dim=1, keepdim=True) + contrast_floor**2)


def reference_tokens(tokenizer: KMeansTokenizer, images: torch.Tensor) -> torch.Tensor:
    patches = reference_patches(images, tokenizer.patch_size, tokenizer.contrast_floor)
    distances = (patches[:, None, :] - tokenizer.centroids.double()[None]).square().sum(dim=-1)
    grid = tokenizer.grid_size
    return distances.argmin(dim=1).view(images.shape[0], grid, grid)


# ---------------------------------------------------------------------------------------------------
# k-means tokenizer


@pytest.fixture(scope="module")
def fitted() -> KMeansTokenizer:
    return KMeansTokenizer.fit(smooth_images(24), vocab_size=48, input_size=SIZE, iters=30, batch_size=1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_kmeans_tokens_are_nearest_centroids(fitted, dtype, batch):
    images = smooth_images(batch, seed=7)
    tokens = fitted.tokenize(images.to(dtype))
    assert tokens.dtype == torch.int64 and tokens.shape == (batch, 4, 4)
    # float16 images are rounded before tokenizing: compare against the same rounded pixels.
    assert torch.equal(tokens, reference_tokens(fitted, images.to(dtype)))


@pytest.mark.parametrize("patch_size, input_size", [(4, 28), (8, 24)])
def test_kmeans_other_patch_sizes(patch_size, input_size):
    images = smooth_images(5, size=input_size, seed=1)
    tokenizer = KMeansTokenizer.fit(
        images, vocab_size=13, patch_size=patch_size, input_size=input_size, iters=5
    )
    grid = input_size // patch_size
    assert tokenizer.centroids.shape == (13, 3 * patch_size**2)
    tokens = tokenizer.tokenize(images)
    assert tokens.shape == (5, grid, grid)
    assert torch.equal(tokens, reference_tokens(tokenizer, images))


def test_kmeans_under_cpu_autocast_gives_the_same_tokens(fitted):
    images = smooth_images(2, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = fitted.tokenize(images)
    assert torch.equal(tokens, fitted.tokenize(images))


def test_kmeans_is_deterministic_for_a_seed():
    images = smooth_images(12)
    def fit(seed):
        return KMeansTokenizer.fit(
            images, vocab_size=20, input_size=SIZE, iters=12, batch_size=128, seed=seed
        )

    first, again, other = fit(0), fit(0), fit(1)
    assert torch.equal(first.centroids, again.centroids)
    assert not torch.equal(first.centroids, other.centroids)


def test_kmeans_reduces_quantisation_error(fitted):
    images = smooth_images(24)
    patches = reference_patches(images, 8, fitted.contrast_floor).float()
    g = torch.Generator().manual_seed(5)
    random_patches = KMeansTokenizer(patches[torch.randperm(len(patches), generator=g)[:48]], input_size=SIZE)
    random_normal = KMeansTokenizer(torch.randn(48, 192, generator=g), input_size=SIZE)
    fitted_error = fitted.quantization_error(images)
    assert fitted_error < 0.75 * random_patches.quantization_error(images)
    assert fitted_error < 0.5 * random_normal.quantization_error(images)
    # Unseen images of the same kind are described better too.
    held_out = smooth_images(24, seed=11)
    assert fitted.quantization_error(held_out) < 0.9 * random_patches.quantization_error(held_out)


def test_kmeans_full_batch_converges_to_cluster_means(fitted):
    # 24 images = 384 patches fit in one batch: Lloyd's algorithm, whose fixed point has every centroid
    # at the mean of the patches nearest to it.
    # The fit keeps its patch sample in float16 (a patch may round one ulp apart from this reference).
    patches = reference_patches(smooth_images(24), 8, fitted.contrast_floor).half().double()
    assignment = reference_tokens(fitted, smooth_images(24)).flatten()
    used = assignment.unique()
    assert len(used) > 0.9 * fitted.vocab_size
    for index in used:
        cluster_mean = patches[assignment == index].mean(dim=0)
        torch.testing.assert_close(fitted.centroids[index].double(), cluster_mean, rtol=0, atol=5e-4)


def test_minibatch_kmeans_approaches_full_batch():
    images = smooth_images(160, seed=2)  # 2560 patches
    kwargs = dict(vocab_size=32, input_size=SIZE, seed=3)
    full = KMeansTokenizer.fit(images, iters=25, batch_size=4096, **kwargs)
    minibatch = KMeansTokenizer.fit(images, iters=40, batch_size=512, **kwargs)
    assert minibatch.quantization_error(images) < 1.1 * full.quantization_error(images)


def test_kmeans_minibatches_from_an_iterable_with_a_patch_cap():
    batches = (smooth_images(8, seed=seed) for seed in range(4))  # read once
    tokenizer = KMeansTokenizer.fit(
        batches, vocab_size=16, input_size=SIZE, iters=20, batch_size=64, max_patches=300
    )
    images = smooth_images(8, seed=2)
    first_patches = reference_patches(images, 8, tokenizer.contrast_floor).float()[:16]
    baseline = KMeansTokenizer(first_patches, input_size=SIZE)
    assert tokenizer.quantization_error(images) < baseline.quantization_error(images)


def test_reservoir_sample_is_uniform():
    inclusion = torch.zeros(1000)
    for seed in range(200):
        reservoir = _Reservoir(100, torch.Generator().manual_seed(seed))
        for start in range(0, 1000, 64):  # uneven chunks, the first one partly fills the sample
            reservoir.add(torch.arange(start, min(start + 64, 1000))[:, None])
        rows = reservoir.rows().squeeze(1)
        assert len(rows) == 100 and len(rows.unique()) == 100
        inclusion[rows] += 1
    inclusion /= 200  # each row should be kept with probability 0.1
    for part in inclusion.chunk(4):
        assert abs(part.mean().item() - 0.1) < 0.01


def test_kmeans_vocab_clamped_to_distinct_patches():
    image = smooth_images(1)
    image[..., :16, :] = 0.5  # 8 of the 16 patches are identical flat patches
    message = r"only 9 distinct patches, fewer than vocab_size=64; using vocab_size=9"
    with pytest.warns(UserWarning, match=message):
        tokenizer = KMeansTokenizer.fit(image, vocab_size=64, input_size=SIZE, iters=3)
    assert tokenizer.vocab_size == 9
    assert tokenizer.quantization_error(image) < 1e-3  # every patch is a centroid (up to float16 rounding)


def test_kmeans_save_load_round_trip(fitted, tmp_path):
    path = tmp_path / "kmeans.safetensors"
    fitted.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, KMeansTokenizer)
    assert (loaded.vocab_size, loaded.patch_size, loaded.input_size, loaded.contrast_floor) == (
        fitted.vocab_size, fitted.patch_size, fitted.input_size, fitted.contrast_floor)
    assert torch.equal(loaded.centroids, fitted.centroids)
    images = smooth_images(3, seed=4)
    assert torch.equal(loaded.tokenize(images), fitted.tokenize(images))
    assert os.path.getsize(path) < fitted.centroids.numel() * 4 + 4096


def test_kmeans_fit_errors():
    message = r"KMeansTokenizer.fit: images must be \[B, 3, 32, 32\].*got \[2, 3, 24, 24\]"
    with pytest.raises(ValueError, match=message):
        KMeansTokenizer.fit(torch.rand(2, 3, 24, 24), vocab_size=4, input_size=SIZE)
    with pytest.raises(TypeError, match="an item of type tuple"):
        KMeansTokenizer.fit([(torch.rand(2, 3, 32, 32),)], vocab_size=4, input_size=SIZE)
    with pytest.raises(ValueError, match="no images"):
        KMeansTokenizer.fit([], vocab_size=4, input_size=SIZE)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        KMeansTokenizer.fit(torch.rand(2, 3, 32, 32), vocab_size=0, input_size=SIZE)
    not_a_multiple = r"input_size \(30\) must be a multiple of patch_size \(8\)"
    with pytest.raises(ValueError, match=rf"^KMeansTokenizer.fit: {not_a_multiple}"):
        KMeansTokenizer.fit(torch.rand(2, 3, 30, 30), input_size=30)
    with pytest.raises(ValueError, match=r"^KMeansTokenizer.fit: contrast_floor must be > 0, got 0.0"):
        KMeansTokenizer.fit(torch.rand(2, 3, 32, 32), vocab_size=4, input_size=SIZE, contrast_floor=0.0)
    with pytest.raises(ValueError, match=r"^KMeansTokenizer: contrast_floor must be > 0, got -1"):
        KMeansTokenizer(torch.randn(5, 192), contrast_floor=-1)
    with pytest.raises(ValueError, match=rf"^KMeansTokenizer: {not_a_multiple}"):
        KMeansTokenizer(torch.randn(5, 192), input_size=30)
    with pytest.raises(ValueError, match=r"centroids must be \[vocab_size, 192\].*got \[5, 48\]"):
        KMeansTokenizer(torch.randn(5, 48))


# ---------------------------------------------------------------------------------------------------
# Errors shared by every tokenizer


@pytest.mark.parametrize("make", [
    lambda: KMeansTokenizer(torch.randn(6, 192), input_size=SIZE),
    lambda: DalleTokenizer(n_hid=8, n_blk_per_group=1, vocab_size=8, input_size=SIZE),
])
def test_tokenize_rejects_bad_images(make):
    tokenizer = make()
    name = type(tokenizer).__name__
    message = rf"{name}.tokenize: images must be \[B, 3, 32, 32\].*got \[2, 3, 64, 64\]"
    with pytest.raises(ValueError, match=message):
        tokenizer.tokenize(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"got \[2, 1, 32, 32\]"):
        tokenizer.tokenize(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"got \[3, 32, 32\]"):
        tokenizer.tokenize(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="floating point with values in \\[0, 1\\], got torch.uint8"):
        tokenizer.tokenize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    assert not tokenizer.tokenize(images).requires_grad


@settings(derandomize=True, database=None, deadline=None, max_examples=30)
@given(kind=st.sampled_from(["kmeans", "dalle"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       value=st.sampled_from([math.nan, math.inf, -math.inf]), batch=st.integers(1, 3),
       where=st.integers(0, 10**6), how_many=st.integers(1, 5))
def test_tokenize_refuses_nan_and_infinite_images(kind, dtype, value, batch, where, how_many):
    if kind == "kmeans":
        centroids = torch.randn(6, 192, generator=torch.Generator().manual_seed(0))
        tokenizer = KMeansTokenizer(centroids, input_size=SIZE)
    else:
        tokenizer = DalleTokenizer(n_hid=8, n_blk_per_group=1, vocab_size=8, input_size=SIZE)
    images = smooth_images(batch, seed=where % 7).to(dtype)
    flat = images.view(-1)
    flat[[(where + 7919 * i) % flat.numel() for i in range(how_many)]] = value
    message = rf"{type(tokenizer).__name__}.tokenize: images must be finite.*got \d+ NaN or infinite"
    with pytest.raises(ValueError, match=message):
        tokenizer.tokenize(images)


def test_fit_refuses_nan_images():
    images = smooth_images(2)
    images[1, 2, 3, 4] = math.nan
    with pytest.raises(ValueError, match=r"KMeansTokenizer.fit: images must be finite.*got 1 NaN"):
        KMeansTokenizer.fit(images, vocab_size=4, patch_size=8, input_size=SIZE, iters=2)


def test_load_tokenizer_rejects_unknown_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"GIF89a" + bytes(range(64)))
    with pytest.raises(ValueError, match="unknown tokenizer file format"):
        load_tokenizer(garbage)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.randn(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a beitfast tokenizer"):
        load_tokenizer(foreign)
    unknown_kind = tmp_path / "unknown.safetensors"
    save_file({"w": torch.randn(3)}, str(unknown_kind),
              metadata={"format": "beitfast.tokenizer", "kind": "vqgan", "config": "{}"})
    with pytest.raises(ValueError, match="unknown tokenizer kind 'vqgan'"):
        load_tokenizer(unknown_kind)


# ---------------------------------------------------------------------------------------------------
# DALL-E encoder: a file with the structure of the official encoder.pkl


@pytest.fixture
def official_dall_e(monkeypatch):
    """Importable stand-ins of the official ``dall_e.encoder`` / ``dall_e.utils`` classes, with their
    attributes and module tree, so that ``torch.save`` writes what the official file holds."""
    package, utils, encoder = map(types.ModuleType, ("dall_e", "dall_e.utils", "dall_e.encoder"))

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"),
                     requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.kw = n_in, n_out, kw
            self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
            # The official init is 0; random values check that b is used.
            self.b = nn.Parameter(0.02 * torch.randn(n_out))

        def forward(self, x):
            return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
            self.device, self.requires_grad = device, requires_grad
            self.n_hid = n_out // 4
            self.post_gain = 1 / n_layers**2
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            hid = self.n_hid
            convs = [(n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, n_out, 1)]
            layers = []
            for i, (a, b, k) in enumerate(convs, start=1):
                layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(a, b, k))]
            self.res_path = nn.Sequential(OrderedDict(layers))

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        def __init__(self, n_hid, n_blk_per_group, input_channels=3, vocab_size=8192):
            super().__init__()
            self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
            self.input_channels, self.vocab_size = input_channels, vocab_size
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            n_layers = 4 * n_blk_per_group
            widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
            groups = [("input", Conv2d(input_channels, n_hid, 7))]
            for g in range(1, 5):
                blocks = [
                    (f"block_{i + 1}", EncoderBlock(widths[g if i else g - 1], widths[g], n_layers))
                    for i in range(n_blk_per_group)
                ]
                if g < 4:
                    blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
                groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
            groups.append(("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))))
            self.blocks = nn.Sequential(OrderedDict(groups))

        def forward(self, x):
            return self.blocks(x)

    for cls, module in ((Conv2d, utils), (EncoderBlock, encoder), (Encoder, encoder)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    package.utils, package.encoder = utils, encoder
    for module in (package, utils, encoder):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return encoder


def save_official_encoder(official_dall_e, monkeypatch, path, legacy_format=False):
    """Write a tiny encoder the way ``torch.save(encoder)`` did, then make ``dall_e`` unimportable."""
    encoder = official_dall_e.Encoder(n_hid=8, n_blk_per_group=2, vocab_size=24).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy format: the test classes' source is not retrievable
        torch.save(encoder, path, _use_new_zipfile_serialization=not legacy_format)
    for name in ("dall_e", "dall_e.utils", "dall_e.encoder"):
        monkeypatch.delitem(sys.modules, name)
    return encoder


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_dalle_loads_the_official_pickle_and_matches_it(
    official_dall_e, monkeypatch, tmp_path, legacy_format
):
    path = tmp_path / "encoder.pkl"
    official = save_official_encoder(official_dall_e, monkeypatch, path, legacy_format)
    tokenizer = DalleTokenizer.from_file(path, input_size=SIZE)
    assert (tokenizer.vocab_size, tokenizer.patch_size, tokenizer.grid_size) == (24, 8, 4)

    images = torch.rand(8, 3, SIZE, SIZE)
    with torch.no_grad():
        expected_logits = official.double()(0.8 * images.double() + 0.1)  # official map_pixels, eps 0.1
        logits = tokenizer.encoder(map_pixels(images))
    assert logits.dtype == torch.float32 and logits.shape == (8, 24, 4, 4)
    torch.testing.assert_close(logits.double(), expected_logits, rtol=1e-4, atol=1e-5)
    tokens = tokenizer.tokenize(images)
    assert tokens.dtype == torch.int64 and tokens.shape == (8, 4, 4)
    assert torch.equal(tokens, expected_logits.argmax(dim=1))

    generic = load_tokenizer(path)  # default 112 view
    assert isinstance(generic, DalleTokenizer) and generic.input_size == 112
    assert generic.tokenize(torch.rand(1, 3, 112, 112)).shape == (1, 14, 14)


def test_a_pickled_module_tree_that_contains_itself_is_refused(official_dall_e, monkeypatch, tmp_path):
    path = tmp_path / "encoder.pkl"
    encoder = official_dall_e.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=24)
    encoder.blocks.group_1.add_module("loop", encoder)  # a crafted file: the tree holds its own root
    torch.save(encoder, path)
    for name in ("dall_e", "dall_e.utils", "dall_e.encoder"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ValueError, match=r"encoder.pkl: pickled module 'blocks.group_1.loop' appears twice"):
        DalleTokenizer.from_file(path)


@pytest.mark.parametrize("damage", ["truncated", "empty", "nan"])
def test_damaged_dalle_files_are_refused(official_dall_e, monkeypatch, tmp_path, damage):
    from beitfast.checkpoint import FileIntegrityError

    path = tmp_path / "encoder.pkl"
    encoder = official_dall_e.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=24)
    if damage == "nan":
        with torch.no_grad():
            encoder.blocks.group_2.block_1.res_path.conv_3.w[0, 0, 1, 1] = float("nan")
    torch.save(encoder, path)
    for name in ("dall_e", "dall_e.utils", "dall_e.encoder"):
        monkeypatch.delitem(sys.modules, name)
    if damage != "nan":
        with open(path, "r+b") as f:
            f.truncate(0 if damage == "empty" else os.path.getsize(path) // 2)
    reason = {"truncated": "damaged or truncated zip archive", "empty": "empty file",
              "nan": r"non-finite weights: 'blocks.group_2.block_1.res_path.conv_3.w' has 1 NaN"}[damage]
    for load in (DalleTokenizer.from_file, load_tokenizer):
        with pytest.raises(FileIntegrityError, match=rf"^{path}: {reason}"):
            load(path)


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_damaged_dalle_pickle_is_refused_or_loads(official_dall_e, monkeypatch, tmp_path, legacy_format,
                                                  each_damage):
    """A foreign file has no checksum: damage anywhere gives a clear refusal naming the file (or an unsafe
    global refused), or a tokenizer; never another exception."""
    path = tmp_path / "encoder.pkl"
    save_official_encoder(official_dall_e, monkeypatch, path, legacy_format)

    def check():
        try:
            DalleTokenizer.from_file(path, input_size=SIZE)
        except UnsafePickleError:
            pass
        except ValueError as error:
            assert str(error).startswith(f"{path}: "), error

    each_damage(path, check)


def test_map_pixels_is_the_official_one():
    images = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(map_pixels(images), (1 - 2 * 0.1) * images + 0.1, rtol=0, atol=1e-15)


def test_dalle_loads_an_official_state_dict(official_dall_e, monkeypatch, tmp_path):
    official = official_dall_e.Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    torch.save(official.state_dict(), tmp_path / "state.pt")
    tokenizer = DalleTokenizer.from_file(tmp_path / "state.pt", input_size=SIZE)
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = official.double()(0.8 * images.double() + 0.1).argmax(dim=1)
    assert torch.equal(tokenizer.tokenize(images), expected)


def test_dalle_save_load_round_trip(tmp_path):
    tokenizer = DalleTokenizer(n_hid=8, n_blk_per_group=2, vocab_size=20, input_size=SIZE)
    path = tmp_path / "dalle.safetensors"
    tokenizer.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, DalleTokenizer) and isinstance(loaded, Tokenizer)
    assert (loaded.vocab_size, loaded.input_size) == (20, SIZE)
    images = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(loaded.tokenize(images), tokenizer.tokenize(images))


def test_dalle_under_cpu_autocast():
    tokenizer = DalleTokenizer(n_hid=8, n_blk_per_group=1, vocab_size=16, input_size=SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = tokenizer.tokenize(torch.rand(2, 3, SIZE, SIZE))
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 4, 4)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 16


class RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsPython:
    def __reduce__(self):
        return builtins.exec, ("raise SystemExit('code from the pickle ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"hook": RunsShell(f"touch {marker}"), "blocks.input.w": torch.randn(2)}
    path = tmp_path / "encoder.pkl"
    if writer == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
    for load in (DalleTokenizer.from_file, load_tokenizer):
        message = rf"refusing to load global '{os.system.__module__}.system'"
        with pytest.raises(UnsafePickleError, match=message):
            load(path)
    assert not marker.exists()

    torch.save([RunsPython()], path)
    with pytest.raises(UnsafePickleError, match="refusing to load global 'builtins.exec'"):
        DalleTokenizer.from_file(path)


def test_dalle_from_file_rejects_other_pickles(tmp_path):
    path = tmp_path / "not_an_encoder.pt"
    torch.save([torch.randn(2)], path)
    message = "expected a pickled dall_e.encoder.Encoder or its state dict, got list"
    with pytest.raises(ValueError, match=message):
        DalleTokenizer.from_file(path)
    torch.save({"blocks.input.w": torch.randn(8, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="not DALL-E encoder weights, 'blocks.output.conv.w' is missing"):
        DalleTokenizer.from_file(path)
    partial = {"blocks.input.w": torch.randn(8, 3, 7, 7), "blocks.output.conv.w": torch.randn(16, 64, 1, 1),
               "blocks.group_1.block_1.res_path.conv_1.w": torch.randn(2, 8, 3, 3)}
    torch.save(partial, path)
    message = rf"^{path}: DalleTokenizer: the weights do not fit a DALL-E encoder: Missing key\(s\)"
    with pytest.raises(ValueError, match=message):
        DalleTokenizer.from_file(path)


# ---------------------------------------------------------------------------------------------------
# GPU: bf16 autocast, no host synchronisation


@pytest.mark.gpu
def test_tokenizers_on_gpu_under_bf16_autocast_without_host_sync(fitted):
    images = smooth_images(16, seed=9).cuda()
    kmeans = KMeansTokenizer(fitted.centroids.cuda(), input_size=SIZE)
    dalle = DalleTokenizer(n_hid=16, n_blk_per_group=1, vocab_size=64, input_size=SIZE).cuda()
    expected_kmeans, expected_dalle = kmeans.tokenize(images), dalle.tokenize(images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tokens_kmeans, tokens_dalle = kmeans.tokenize(images), dalle.tokenize(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens_kmeans.shape == tokens_dalle.shape == (16, 4, 4)
    assert torch.equal(tokens_kmeans.cpu(), reference_tokens(fitted, images.cpu()))
    assert torch.equal(expected_kmeans, tokens_kmeans)
    # bf16 convolutions move the logits a little; the float32 argmax keeps most tokens.
    assert (tokens_dalle == expected_dalle).float().mean() > 0.8


# ---------------------------------------------------------------------------------------------------
# `beitfast tokenizer train`: progress, and defaults that fit in minutes on a CPU


def test_tokenizer_train_shows_progress_on_a_terminal(tmp_path, capsys, monkeypatch):
    from beitfast.cli import main

    command = ["tokenizer", "train", "--output", str(tmp_path / "tok.safetensors"), "--vocab-size", "8",
               "--tokenizer-size", "16", "--tokenizer-patch-size", "4", "--tokenizer-images", "20",
               "--tokenizer-iters", "3"]
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        assert main(command) == 0
        err = capsys.readouterr().err
        assert "tokenizer views: 100%" in err and "20/20" in err  # tqdm's bars
        assert "k-means: 100%" in err and "3/3" in err
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # in a log or a pipe: no bars
        assert main(command) == 0
        assert "%|" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_tokenizer_train_defaults_fit_minutes_on_a_cpu():
    """The defaults: a fifth of the views and under a third of the k-means iterations of the earlier
    ones (20000 and 100), which took 9.5 minutes on a 2-core CPU (see the README for the new time)."""
    from beitfast.cli import build_parser

    args = build_parser().parse_args(["tokenizer", "train"])
    assert (args.vocab_size, args.tokenizer_size, args.tokenizer_patch_size) == (8192, 112, 8)
    assert args.tokenizer_images <= 4000 and args.tokenizer_iters <= 30
