"""The fused masked patch embedding (triton, cuda) against the eager definition computed in float64.

Without a GPU the Triton kernels run through the interpreter on CPU tensors (small shapes); the cuda
backend and bfloat16 are tested on a GPU only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from beitfast import _ext
from beitfast.ops import dispatch, masked_patch_embed

HAS_GPU = torch.cuda.is_available()

# Largest error allowed, relative to the largest magnitude of the float64 reference.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
TENSOR_ARGS = ("images", "weight", "bias", "mask_token", "cls_token", "pos_embed")


@dataclass(frozen=True)
class Case:
    batch: int
    channels: int
    height: int
    width: int
    patch: int
    dim: int
    mask: bool = True
    cls: bool = True
    pos: bool = True
    channels_last: bool = False
    images_grad: bool = True
    pos_2d: bool = False

    @property
    def num_patches(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)


CASES = {
    # Non-square, D=40 is not a multiple of the tile, several images share a row tile.
    "48x32_p16_d40": Case(2, 3, 48, 32, 16, 40),
    # p=14, K=588 has a tail, 2-D position embedding, no cls token.
    "28x42_p14_nocls": Case(1, 3, 28, 42, 14, 24, cls=False, pos_2d=True),
    # One channel, no mask, no position embedding, images without gradient.
    "1ch_p8_nomask_nopos": Case(2, 1, 24, 40, 8, 36, mask=False, pos=False, images_grad=False),
    # Four channels, channels-last images, 48 rows over two row tiles.
    "4ch_p8_channels_last": Case(3, 4, 32, 32, 8, 40, pos=False, channels_last=True),
}


def make_inputs(case: Case, device) -> dict:
    """Float64 leaves for the reference (mask included), random and non-zero."""
    N, D, K = case.num_patches, case.dim, case.channels * case.patch ** 2
    f64 = dict(device=device, dtype=torch.float64)
    inputs = {
        "images": torch.randn(case.batch, case.channels, case.height, case.width, **f64),
        "weight": torch.randn(D, case.channels, case.patch, case.patch, **f64) / K ** 0.5,
        "bias": torch.randn(D, **f64),
        "mask": torch.rand(case.batch, N, device=device) < 0.4 if case.mask else None,
        "mask_token": torch.randn(1, 1, D, **f64) if case.mask else None,
        "cls_token": torch.randn(1, 1, D, **f64) if case.cls else None,
        "pos_embed": None,
    }
    if case.mask:
        inputs["mask"][0, 0] = True  # an image's first patch masked: the cls row must not care
        inputs["mask"][-1, -1] = False
    if case.pos:
        T = N + case.cls
        inputs["pos_embed"] = torch.randn(T, D, **f64) if case.pos_2d else torch.randn(1, T, D, **f64)
    return inputs


def cast_inputs(reference: dict, case: Case, dtype: torch.dtype) -> dict:
    """Fresh leaves in ``dtype`` (gradients wanted for all but, maybe, the images)."""
    inputs = {}
    for name, t in reference.items():
        if t is None or name == "mask":
            inputs[name] = t
            continue
        t = t.detach().to(dtype)
        if name == "images" and case.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        inputs[name] = t.requires_grad_(name != "images" or case.images_grad)
    for name in TENSOR_ARGS:
        if reference[name] is not None:
            reference[name].requires_grad_(inputs[name].requires_grad)
    return inputs


def run(inputs: dict, case: Case, backend: str) -> torch.Tensor:
    return masked_patch_embed(
        inputs["images"], inputs["weight"], inputs["bias"], case.patch, mask=inputs["mask"],
        mask_token=inputs["mask_token"], cls_token=inputs["cls_token"], pos_embed=inputs["pos_embed"],
        backend=backend,
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3g} > {TOLERANCE[dtype]:g} x {scale:.3g}"


def check_against_reference(case: Case, dtype: torch.dtype, backend: str, device) -> None:
    reference = make_inputs(case, device)
    inputs = cast_inputs(reference, case, dtype)
    out = run(inputs, case, backend)
    expected = run(reference, case, "eager")
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "output")

    grad = torch.randn_like(expected)
    names = [n for n in TENSOR_ARGS if inputs[n] is not None and inputs[n].requires_grad]
    expected_grads = torch.autograd.grad(expected, [reference[n] for n in names], grad)
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad.to(dtype))
    for name, g, e in zip(names, grads, expected_grads):
        assert g.dtype == dtype, f"grad of {name}: dtype {g.dtype}"
        assert_close(g, e, dtype, f"grad of {name}")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fresh float buffers start as NaN, so a value the kernels forget to write shows up."""

    def poisoned(allocate):
        def wrapper(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return wrapper

    for name in ("empty", "empty_like"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))


# -- triton (interpreter on CPU, compiled on a GPU) -----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_matches_reference(case, dtype, device, poisoned_allocations):
    check_against_reference(case, dtype, "triton", device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_triton_bfloat16(case, device):
    check_against_reference(case, torch.bfloat16, "triton", device)


def test_triton_converts_images_to_the_weight_dtype(device, poisoned_allocations):
    # float32 pixels, float16 weights: the eager conv sees images.to(float16); so must the kernel.
    case = CASES["48x32_p16_d40"]
    reference = make_inputs(case, device)
    inputs = cast_inputs(reference, case, torch.float16)
    inputs["images"] = reference["images"].detach().float().requires_grad_()
    out = run(inputs, case, "triton")
    assert out.dtype == torch.float16
    assert_close(out, run(reference, case, "eager"), torch.float16, "output")
    out.float().sum().backward()
    assert inputs["images"].grad.dtype == torch.float32


def test_triton_skips_the_image_gradient_when_not_needed(device, monkeypatch):
    kernels = importlib.import_module("beitfast.kernels.patch_embed")

    def fail(*args, **kwargs):
        raise AssertionError("the image-gradient kernel ran for images that need no gradient")

    monkeypatch.setattr(kernels, "_patch_embed_bwd_images_kernel", _Unlaunchable(fail))
    case = CASES["1ch_p8_nomask_nopos"]
    reference = make_inputs(case, device)
    inputs = cast_inputs(reference, case, torch.float32)
    run(inputs, case, "triton").sum().backward()
    assert inputs["images"].grad is None and inputs["weight"].grad is not None


class _Unlaunchable:
    """Stands in for a kernel: ``kernel[grid](...)`` calls ``on_launch``."""

    def __init__(self, on_launch):
        self.on_launch = on_launch

    def __getitem__(self, grid):
        return self.on_launch


def test_triton_follows_autocast(device):
    # Under autocast the model's conv runs in the autocast dtype; the fused op must too, and the
    # gradients must reach the float32 parameters in float32.
    case = CASES["48x32_p16_d40"]
    reference = make_inputs(case, device)
    inputs = cast_inputs(reference, case, torch.float32)
    autocast_dtype = torch.float16
    with torch.autocast(device.type, dtype=autocast_dtype):
        out = run(inputs, case, "triton")
        eager = run(inputs, case, "eager")
    assert out.dtype == eager.dtype == autocast_dtype
    assert_close(out, run(reference, case, "eager"), autocast_dtype, "output")
    out.float().sum().backward()
    for name in TENSOR_ARGS:
        assert inputs[name].grad is not None and inputs[name].grad.dtype == torch.float32, name


def test_triton_is_one_node_under_torch_compile(device):
    case = CASES["28x42_p14_nocls"]
    reference = make_inputs(case, device)
    inputs = cast_inputs(reference, case, torch.float32)

    def embed(images, weight, bias, mask, mask_token, pos_embed):
        return masked_patch_embed(images, weight, bias, case.patch, mask=mask, mask_token=mask_token,
                                  pos_embed=pos_embed, backend="triton")

    args = [inputs[n] for n in ("images", "weight", "bias", "mask", "mask_token", "pos_embed")]
    compiled = torch.compile(embed, backend="aot_eager", fullgraph=True)
    out = compiled(*args)
    assert_close(out, run(reference, case, "eager"), torch.float32, "compiled output")
    out.sum().backward()
    assert all(a.grad is not None for a in args if a is not None and a.dtype != torch.bool)


def test_triton_custom_ops_pass_opcheck(device):
    ops = importlib.import_module("beitfast.ops.patch_embed")  # registers the custom ops
    assert ops.OP == "patch_embed"
    case = Case(2, 2, 16, 24, 8, 12)
    reference = make_inputs(case, device)
    inputs = cast_inputs(reference, case, torch.float32)
    args = (inputs["images"], inputs["weight"], inputs["bias"], case.patch, inputs["mask"],
            inputs["mask_token"].reshape(-1), inputs["cls_token"].reshape(-1), inputs["pos_embed"])
    torch.library.opcheck(torch.ops.beitfast.patch_embed_triton.default, args)


# -- dispatch and errors --------------------------------------------------------------------------

def test_backends_say_why_they_refuse(device):
    case = CASES["48x32_p16_d40"]
    inputs = make_inputs(case, torch.device("cpu"))
    reasons = dispatch.explain("patch_embed", patch_size=case.patch, **inputs)
    assert reasons["eager"] == []
    assert any("float64" in r for r in reasons["triton"])
    assert any("CUDA" in r or "beitfast._C" in r for r in reasons["cuda"])
    with pytest.raises(ValueError, match="triton"):
        run(inputs, case, "triton")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(images=torch.randn(2, 3, 40, 32)), "40x32 is not divisible by patch_size 16"),
        (dict(images=torch.randn(2, 1, 48, 32)), r"weight must be \[D, C=1, 16, 16\].*got \(40, 3, 16, 16\)"),
        (dict(mask=torch.zeros(2, 5, dtype=torch.bool)), r"mask must be a bool \[B, N\] = \[2, 6\].*\(2, 5\)"),
        (dict(mask_token=torch.randn(1, 1, 39)), r"mask_token must hold D=40 values.*\(1, 1, 39\)"),
        (dict(pos_embed=torch.randn(1, 6, 40)), r"pos_embed must be \[1, 7, 40\].*\(1, 6, 40\)"),
        (dict(bias=torch.randn(41)), r"bias must be \[D=40\], got \(41,\)"),
        (dict(images=torch.randn(2, 3, 48)), r"images must be \[B, C, H, W\], got \(2, 3, 48\)"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    case = CASES["48x32_p16_d40"]
    inputs = {k: (v.float() if v is not None and v.is_floating_point() else v)
              for k, v in make_inputs(case, torch.device("cpu")).items()}
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        run(inputs, case, None)


# -- cuda (GPU only) ------------------------------------------------------------------------------

def _cuda_backend_missing() -> str | None:
    return _ext.missing("patch_embed_fwd_cuda", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_cuda_matches_reference(case, dtype, device):
    if _cuda_backend_missing():
        pytest.skip(_cuda_backend_missing())
    check_against_reference(case, dtype, "cuda", device)


@pytest.mark.gpu
def test_cuda_beit_base_shape_matches_triton(device):
    # BEiT-B at 224: 196 patches (not a tile multiple), 75 masked per image, bf16 under autocast.
    if _cuda_backend_missing():
        pytest.skip(_cuda_backend_missing())
    from beitfast import MaskingGenerator

    case = Case(4, 3, 224, 224, 16, 768)
    reference = make_inputs(case, device)
    reference["mask"] = MaskingGenerator((14, 14), 75).batch(4).to(device)
    inputs = cast_inputs(reference, case, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = {b: run(inputs, case, b) for b in ("cuda", "triton")}
    expected = run(reference, case, "eager")
    for backend, out in outs.items():
        assert out.dtype == torch.bfloat16, backend
        assert_close(out, expected, torch.bfloat16, f"{backend} output")


@pytest.mark.skipif(HAS_GPU, reason="the interpreter's bfloat16 refusal only applies on CPU")
def test_triton_refuses_bfloat16_in_the_interpreter():
    case = CASES["48x32_p16_d40"]
    inputs = {k: (v.bfloat16() if v is not None and v.is_floating_point() else v)
              for k, v in make_inputs(case, torch.device("cpu")).items()}
    with pytest.raises(ValueError, match="interpreter computes bfloat16 wrongly"):
        run(inputs, case, "triton")


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
def test_cuda_refuses_cpu_tensors():
    case = CASES["48x32_p16_d40"]
    inputs = {k: (v.float() if v is not None and v.is_floating_point() else v)
              for k, v in make_inputs(case, torch.device("cpu")).items()}
    with pytest.raises(ValueError, match="cuda"):
        run(inputs, case, "cuda")
