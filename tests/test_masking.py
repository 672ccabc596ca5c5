"""Blockwise masking: the native backends (C++, CUDA) against the official Python generator.

The backends use different random streams, so they are compared as distributions: thousands of
masks from each, then two-sample tests on the number of masked patches, on blockiness (masked
4-neighbour pairs, horizontal and vertical apart, and 4-connected components) and on the masking
frequency of every position. Deliberately broken generators must fail the same comparison, which
shows the tests can tell. All draws are seeded: the outcome is the same on every run.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from beitfast import MaskingGenerator, _ext

NATIVE_MISSING = _ext.missing("blockwise_masks.out", "cpu")
needs_cpp = pytest.mark.skipif(NATIVE_MISSING is not None,
                               reason=f"C++ backend unavailable: {NATIVE_MISSING}")

OFFICIAL = dict(input_size=(14, 14), num_masking_patches=75)
PYTHON_DRAWS = 2000
NATIVE_DRAWS = 20000
# Per-statistic significance: with fixed seeds the outcome is deterministic; a threshold this small
# keeps a correct implementation clear of it for any seed, while the broken variants below land
# many orders of magnitude beyond it.
P_VALUE_FLOOR = 1e-4
# Largest allowed |z| of a per-position frequency difference (196 positions: Bonferroni at ~1e-3).
MAX_POSITION_Z = 4.5


def python_masks(generator: MaskingGenerator, draws: int = PYTHON_DRAWS) -> np.ndarray:
    return generator.batch(draws, backend="python").view(draws, generator.height, generator.width).numpy()


def native_masks(generator: MaskingGenerator, draws: int = NATIVE_DRAWS, backend: str = "cpp") -> np.ndarray:
    device = "cuda" if backend == "cuda" else "cpu"
    masks = generator.batch(draws, device=device, backend=backend)
    return masks.cpu().view(draws, generator.height, generator.width).numpy()


def components(masks: np.ndarray) -> np.ndarray:
    return np.array([ndimage.label(m)[1] for m in masks])


def _binned_chi2_p(a: np.ndarray, b: np.ndarray, edges: list[float]) -> float:
    table = np.stack([np.histogram(a, edges)[0], np.histogram(b, edges)[0]])
    table = table[:, table.sum(0) > 0]
    return 1.0 if table.shape[1] < 2 else stats.chi2_contingency(table)[1]


def distribution_differences(reference: np.ndarray, candidate: np.ndarray) -> list[str]:
    """The statistics on which two samples of ``[draws, H, W]`` masks differ significantly."""
    target_counts = reference.sum((1, 2))
    top = int(max(target_counts.max(), candidate.sum((1, 2)).max()))
    differences = []

    def compare(name: str, p_value: float) -> None:
        if p_value < P_VALUE_FLOOR:
            differences.append(f"{name} (p={p_value:.2g})")

    # Counts: exactly the target unless the algorithm stopped early; the last bin holds the target.
    compare("masked count", _binned_chi2_p(target_counts, candidate.sum((1, 2)),
                                           [0, top - 5, top - 3, top - 2, top - 1, top, top + 1]))
    vertical = [(m[:, 1:, :] & m[:, :-1, :]).sum((1, 2)) for m in (reference, candidate)]
    horizontal = [(m[:, :, 1:] & m[:, :, :-1]).sum((1, 2)) for m in (reference, candidate)]
    compare("vertical pairs", stats.ks_2samp(*vertical).pvalue)
    compare("horizontal pairs", stats.ks_2samp(*horizontal).pvalue)
    compare("components", _binned_chi2_p(components(reference), components(candidate), [1, 2, 3, 4, 5, 99]))
    p_ref, p_new = reference.mean(0), candidate.mean(0)
    pooled = (p_ref * len(reference) + p_new * len(candidate)) / (len(reference) + len(candidate))
    spread = np.sqrt(pooled * (1 - pooled) * (1 / len(reference) + 1 / len(candidate)))
    # Positions neither sample ever masks have no spread and no difference: z = 0.
    worst = float((np.abs(p_ref - p_new) / np.maximum(spread, 1e-12)).max())
    if worst > MAX_POSITION_Z:
        differences.append(f"position frequencies (max |z|={worst:.1f})")
    return differences


@pytest.fixture(scope="module")
def official_sample() -> np.ndarray:
    return python_masks(MaskingGenerator(**OFFICIAL, seed=1))


# --- the comparison itself can tell a wrong generator -------------------------------------------


class _OffByOneRandom(random.Random):
    """``randint(0, n)`` that never returns n: the classic exclusive-bound bug of a port."""

    def randint(self, a: int, b: int) -> int:
        return super().randint(a, max(a, b - 1))


@pytest.mark.parametrize("variant", ["corner off by one", "aspect range", "min block size", "fewer patches"])
def test_comparison_rejects_broken_generators(official_sample, variant):
    if variant == "corner off by one":
        broken = MaskingGenerator(**OFFICIAL, seed=2)
        broken.rng = _OffByOneRandom(2)
    elif variant == "aspect range":
        broken = MaskingGenerator(**OFFICIAL, min_aspect=0.5, seed=2)
    elif variant == "min block size":
        broken = MaskingGenerator(**OFFICIAL, min_num_patches=8, seed=2)
    else:
        broken = MaskingGenerator((14, 14), num_masking_patches=73, seed=2)
    assert distribution_differences(official_sample, python_masks(broken)) != []


def test_comparison_accepts_the_reference_against_itself(official_sample):
    assert distribution_differences(official_sample, python_masks(MaskingGenerator(**OFFICIAL, seed=3))) == []


# --- the C++ backend draws from the official distribution ---------------------------------------


@needs_cpp
def test_cpp_matches_official_distribution(official_sample):
    native = native_masks(MaskingGenerator(**OFFICIAL, seed=4))
    assert distribution_differences(official_sample, native) == []
    counts = native.sum((1, 2))
    assert counts.max() == 75 and 0.5 < (counts == 75).mean() < 0.9
    assert native.any(0).all(), "every position must be reachable"


@needs_cpp
@pytest.mark.parametrize(
    "grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect",
    [((7, 20), 50, 16, None, 0.3), ((9, 13), 40, 4, 12, 0.5), ((24, 24), 230, 16, None, 0.3)],
)
def test_cpp_matches_official_distribution_other_settings(grid, num_masking_patches, min_num_patches,
                                                          max_num_patches, min_aspect):
    settings = dict(input_size=grid, num_masking_patches=num_masking_patches, min_num_patches=min_num_patches,
                    max_num_patches=max_num_patches, min_aspect=min_aspect)
    reference = python_masks(MaskingGenerator(**settings, seed=5), 1000)
    native = native_masks(MaskingGenerator(**settings, seed=6), 10000)
    assert distribution_differences(reference, native) == []
    assert native.sum((1, 2)).max() <= num_masking_patches


@needs_cpp
def test_cpp_is_seeded_and_advances():
    first, second = MaskingGenerator(**OFFICIAL, seed=7), MaskingGenerator(**OFFICIAL, seed=7)
    a1, a2 = first.batch(64), first.batch(64)
    assert torch.equal(a1, second.batch(64)) and torch.equal(a2, second.batch(64))
    assert not torch.equal(a1, a2), "consecutive batches must differ"
    assert not torch.equal(a1, MaskingGenerator(**OFFICIAL, seed=8).batch(64))
    assert len({tuple(row.tolist()) for row in a1}) == 64, "images of a batch must differ"


@needs_cpp
def test_cpp_batch_is_the_op_with_a_seed_from_the_generator():
    generator = MaskingGenerator((9, 13), 40, min_num_patches=4, max_num_patches=12, min_aspect=0.5, seed=9)
    expected = torch.ops.beitfast.blockwise_masks(
        33, 9, 13, 40, 4, 12, math.log(0.5), math.log(2.0), random.Random(9).getrandbits(63),
        torch.device("cpu"))
    masks = generator.batch(33, backend="cpp")
    assert masks.dtype == torch.bool and masks.shape == (33, 9 * 13) and masks.device.type == "cpu"
    assert torch.equal(masks, expected)


@needs_cpp
def test_cpp_threads_do_not_change_masks():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = MaskingGenerator(**OFFICIAL, seed=10).batch(777)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(single, MaskingGenerator(**OFFICIAL, seed=10).batch(777))
    finally:
        torch.set_num_threads(threads)


@needs_cpp
def test_cpp_out_form_fills_a_poisoned_tensor():
    out = torch.ones(50, 196, dtype=torch.bool)
    result = torch.ops.beitfast.blockwise_masks.out(14, 14, 0, 16, 75, -1.0, 1.0, 3, out=out)
    assert result.data_ptr() == out.data_ptr() and not out.any(), "num_masking_patches=0 masks nothing"


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_batch_shapes(backend, batch):
    masks = MaskingGenerator((6, 11), 20, min_num_patches=4, seed=0).batch(batch, backend=backend)
    assert masks.dtype == torch.bool and masks.shape == (batch, 66)
    assert (masks.sum(1) <= 20).all()


@needs_cpp
def test_op_traces_as_one_node_on_meta_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = torch.ops.beitfast.blockwise_masks(4, 14, 14, 75, 16, 75, -1.2, 1.2, 0, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (4, 196) and meta.dtype == torch.bool
    with FakeTensorMode():
        fake = torch.ops.beitfast.blockwise_masks(4, 7, 9, 20, 4, 20, -1.2, 1.2, 0, torch.device("cpu"))
    assert fake.shape == (4, 63) and fake.device.type == "cpu"


# --- backend choice and errors ----------------------------------------------------------------


def test_default_backend_falls_back_to_python_without_extension(monkeypatch):
    monkeypatch.setattr(_ext, "missing", lambda op=None, device_type="cpu": "beitfast._C is not built")
    generator = MaskingGenerator(**OFFICIAL, seed=11)
    assert torch.equal(generator.batch(3), MaskingGenerator(**OFFICIAL, seed=11).batch(3, backend="python"))
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable: beitfast._C is not built"):
        generator.batch(3, backend="cpp")


@needs_cpp
def test_default_backend_is_cpp_on_cpu():
    generator = MaskingGenerator(**OFFICIAL, seed=12)
    assert torch.equal(generator.batch(5), MaskingGenerator(**OFFICIAL, seed=12).batch(5, backend="cpp"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_masking_patches=197), r"num_masking_patches must be in \[0, 196\], got 197"),
        (dict(num_masking_patches=-1), r"num_masking_patches must be in \[0, 196\], got -1"),
        (dict(min_num_patches=0), "min_num_patches must be an int >= 1, got 0"),
        (dict(max_num_patches=0), "max_num_patches must be an int >= 1 or None, got 0"),
        (dict(min_aspect=0.0), "min_aspect must be a number > 0, got 0.0"),
        (dict(max_aspect=-2.0), "max_aspect must be a number > 0 or None, got -2.0"),
    ],
)
def test_generator_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskingGenerator(**{"input_size": 14, "num_masking_patches": 75, **kwargs})


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(batch_size=-1), "batch_size must be an int >= 0, got -1"),
        (dict(batch_size=2, backend="numpy"),
         r"backend must be one of \('python', 'cpp', 'cuda'\) or None, got 'numpy'"),
        (dict(batch_size=2, backend="cuda"), "backend 'cuda' needs a CUDA device, got device=cpu"),
    ],
)
def test_batch_rejects_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        MaskingGenerator(**OFFICIAL).batch(**call)


@needs_cpp
@pytest.mark.parametrize(
    "args, message",
    [
        ((2, 14, 14, 197, 16, 75, -1.0, 1.0), r"num_masking_patches must be in \[0, 196\], got 197"),
        ((2, 0, 14, 10, 16, 75, -1.0, 1.0), "height and width must be >= 1, got height=0, width=14"),
        ((2, 14, 14, 75, 0, 75, -1.0, 1.0), "min_num_patches must be >= 1, got 0"),
        ((2, 14, 14, 75, 16, 0, -1.0, 1.0), "max_num_patches must be >= 1, got 0"),
        ((2, 14, 14, 75, 16, 75, -math.inf, 1.0), "log_aspect_min and log_aspect_max must be finite"),
        ((-1, 14, 14, 75, 16, 75, -1.0, 1.0), "batch must be >= 0, got -1"),
    ],
)
def test_op_rejects_bad_arguments(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.beitfast.blockwise_masks(*args, 0, torch.device("cpu"))


@needs_cpp
@pytest.mark.parametrize(
    "out, message",
    [
        (torch.zeros(3, 196, dtype=torch.uint8), "out must be a bool tensor, got Byte"),
        (torch.zeros(3, 195, dtype=torch.bool),
         r"out must have shape \[batch, 196\] \(height \* width = 14 \* 14\), got \[3, 195\]"),
        (torch.zeros(196, 3, dtype=torch.bool).t(), "out must be contiguous"),
    ],
)
def test_op_out_rejects_bad_tensors(out, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.beitfast.blockwise_masks.out(14, 14, 75, 16, 75, -1.0, 1.0, 0, out=out)


# --- CUDA -------------------------------------------------------------------------------------------

CUDA_MISSING = _ext.missing("blockwise_masks.out", "cuda") if torch.cuda.is_available() else "no CUDA device"
needs_cuda_backend = pytest.mark.skipif(CUDA_MISSING is not None,
                                        reason=f"CUDA backend unavailable: {CUDA_MISSING}")


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_matches_official_distribution(official_sample):
    native = native_masks(MaskingGenerator(**OFFICIAL, seed=4), backend="cuda")
    assert distribution_differences(official_sample, native) == []
    assert native.any(0).all()


@pytest.mark.gpu
@needs_cuda_backend
@pytest.mark.parametrize("grid, num_masking_patches", [((14, 14), 75), ((7, 20), 50), ((24, 24), 230)])
def test_cuda_equals_cpp_for_the_same_seed(grid, num_masking_patches):
    on_gpu = MaskingGenerator(grid, num_masking_patches, seed=13).batch(4099, device="cuda", backend="cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.bool
    on_cpu = MaskingGenerator(grid, num_masking_patches, seed=13).batch(4099, backend="cpp")
    # Same code and random stream on both devices; CUDA's exp may differ from the C library's in the
    # last bit, which can flip a rounding in very rare draws.
    same_rows = (on_gpu.cpu() == on_cpu).all(1).float().mean().item()
    assert same_rows > 0.999


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_is_the_default_on_a_cuda_device_and_seeded():
    default = MaskingGenerator(**OFFICIAL, seed=14).batch(300, device="cuda")
    explicit = MaskingGenerator(**OFFICIAL, seed=14).batch(300, device="cuda", backend="cuda")
    assert default.device.type == "cuda" and torch.equal(default, explicit)


@pytest.mark.gpu
@needs_cuda_backend
def test_cuda_out_form_fills_a_poisoned_tensor_and_compiles():
    out = torch.ones(70, 196, dtype=torch.bool, device="cuda")
    torch.ops.beitfast.blockwise_masks.out(14, 14, 0, 16, 75, -1.0, 1.0, 3, out=out)
    assert not out.any()

    @torch.compile(fullgraph=True)
    def masked_fraction(seed: int) -> torch.Tensor:
        masks = torch.ops.beitfast.blockwise_masks(64, 14, 14, 75, 16, 75, -1.2, 1.2, seed,
                                                   torch.device("cuda"))
        return masks.float().mean()

    assert 0.3 < masked_fraction(5).item() <= 75 / 196
