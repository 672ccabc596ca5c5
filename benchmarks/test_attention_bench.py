"""Attention with BEiT's relative position bias: forward, backward and forward+backward time and peak
memory of every backend, bf16, at BEiT-B 224 and BEiT-L 224/384/512 sizes.

Rows: ``triton`` (ours; the backward has no atomics, so it is also the deterministic one), ``eager``,
``sdpa`` (the gathered bias as ``attn_mask``), ``flex`` (FlexAttention compiled with
``max-autotune-no-cudagraphs``, bias as ``score_mod``), ``xformers`` when installed, and bias-free
references: ``flash`` (flash-attn 2, when installed), ``fa3-nobias`` (FlashAttention-3,
``flash_attn_interface``, when installed), ``sdpa-flash-nobias`` and ``sdpa-cudnn-nobias`` (PyTorch's
flash and cuDNN backends). ``triton-packed`` runs ours on the model's packed qkv layout.
Timings need a GPU (the suite's CUDA-event timer); rows at BEiT-B head shapes also carry the work
model's predicted fwd+bwd time for ours (``attention_work_model``: a model, not a measurement), ``sdpa``
rows the backend SDPA picks with the bias, and ``test_work_model_table`` prints the whole model (per
launch: grid, programs, waves, FLOPs, L2 and HBM bytes) on any machine.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from beitfast import ops
from beitfast.model import num_relative_positions, relative_position_index


# name -> (batch, heads, patch grid side, head dim); N = 1 + side^2. Batches fill a 80 GB GPU with
# the eager backend's [B, H, N, N] scores.
SHAPES = {
    "beit-b-224": (128, 12, 14, 64),
    "beit-b-224-b1": (1, 12, 14, 64),
    "beit-b-512": (16, 12, 32, 64),
    "beit-b-640": (8, 12, 40, 64),
    "beit-l-224": (128, 16, 14, 64),
    "beit-l-384": (32, 16, 24, 64),
    "beit-l-512": (16, 16, 32, 64),
}
BIASED = ["triton", "triton-packed", "eager", "sdpa", "flex", "xformers"]
BIAS_FREE = ["flash", "fa3-nobias", "sdpa-flash-nobias", "sdpa-cudnn-nobias"]


def make_inputs(shape: str, biased: bool):
    B, H, side, D = SHAPES[shape]
    N = 1 + side * side
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if not biased:
        return q, k, v, None, None
    table = (torch.randn(num_relative_positions((side, side)), H, device="cuda") * 0.5).requires_grad_()
    return q, k, v, table, relative_position_index((side, side)).cuda()


def attention_fn(backend: str):
    if backend in ("sdpa-flash-nobias", "sdpa-cudnn-nobias"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = SDPBackend.FLASH_ATTENTION if backend == "sdpa-flash-nobias" else SDPBackend.CUDNN_ATTENTION

        def sdpa_no_bias(q, k, v, table, rel_index):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v)

        return sdpa_no_bias
    if backend == "fa3-nobias":
        from flash_attn_interface import flash_attn_func

        def fa3(q, k, v, table, rel_index):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

        return fa3
    return lambda q, k, v, table, rel_index: ops.rel_pos_attention(q, k, v, table, rel_index, backend=backend)


@functools.cache
def work_model():
    """``benchmarks/attention_work_model.py`` (pytest's importlib mode puts no test folder on sys.path)."""
    path = Path(__file__).with_name("attention_work_model.py")
    spec = importlib.util.spec_from_file_location("attention_work_model", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packed_inputs(shape: str):
    """One leaf qkv ``[B, N, 3, H, D]`` (what the model's projection makes) and the table."""
    B, H, side, D = SHAPES[shape]
    N = 1 + side * side
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    table = (torch.randn(num_relative_positions((side, side)), H, device="cuda") * 0.5).requires_grad_()
    return qkv, table, relative_position_index((side, side)).cuda()


def skip_unless_available(backend: str, inputs) -> None:
    if backend == "fa3-nobias":
        pytest.importorskip("flash_attn_interface", reason="FlashAttention-3 is not installed")
        return
    if backend.startswith("sdpa-") or backend == "triton-packed":
        return
    q, k, v, table, rel_index = inputs
    why = ops.explain("attention", q=q, k=k, v=v, bias_table=table, rel_index=rel_index, scale=1.0)[backend]
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")


def sdpa_backend_with_bias(q, k, v, table, rel_index) -> str:
    """The backend SDPA picks for these inputs with the gathered bias as ``attn_mask``."""
    from torch.nn.attention import SDPBackend

    N = q.shape[2]
    bias = ops.relative_position_bias(table, rel_index)[:, :N, :N].unsqueeze(0).to(q.dtype)
    try:
        choice = torch._fused_sdp_choice(q, k, v, bias, 0.0, False, scale=q.shape[-1] ** -0.5)
    except (AttributeError, RuntimeError) as exc:  # a private function: say so rather than fail
        return f"unknown ({type(exc).__name__})"
    return SDPBackend(choice).name


def predicted_us(B: int, H: int, N: int, D: int) -> float | None:
    """The work model's fwd+bwd time for ours (a model), at the BEiT-B head shape it describes."""
    model = work_model()
    if (H, D) != (model.H, model.D):
        return None
    return 1e6 * sum(model.total(part) for part in model.new_design(B, N))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BIASED + BIAS_FREE)
def test_attention(backend, shape, record_result, training_modes, measure):
    B, H, side, D = SHAPES[shape]
    N = 1 + side * side
    extra = {}
    if backend == "triton-packed":
        qkv, table, rel_index = packed_inputs(shape)
        params = [qkv, table]

        def forward():
            return ops.rel_pos_attention_packed(qkv, table, rel_index, backend="triton")
    else:
        inputs = make_inputs(shape, biased=backend in BIASED)
        skip_unless_available(backend, inputs)
        attend = attention_fn(backend)
        params = [t for t in inputs[:4] if t is not None]
        if backend == "sdpa":
            extra["sdpa_backend"] = sdpa_backend_with_bias(*inputs)

        def forward():
            return attend(*inputs)

    model_us = predicted_us(B, H, N, D)
    for mode, fn in training_modes(forward, params):
        ms, peak = measure(fn)
        record_result("attention", backend=backend, mode=mode, shape=shape, batch=B, heads=H, tokens=N,
                      head_dim=D, dtype="bfloat16", bias=backend in BIASED, ms=ms, peak_memory_bytes=peak,
                      model_ours_fwd_bwd_us_h100=model_us, **extra)
        model_note = f"; work model for ours (fwd+bwd, a model): H100 {model_us:.1f} us" if model_us else ""
        print(f"{backend:20s} {shape:13s} {mode:8s} measured {ms:.3f} ms{model_note} {extra}")
        assert ms > 0


def test_work_model_table():
    """The work model (no GPU needed), printed; the structural facts it rests on checked: every kernel
    of this design launches two waves of programs on 132 SMs at the training shapes, the previous
    backward launched 12 programs at N = 1025."""
    model = work_model()
    print(model.table())
    for B, N in model.TRAINING_SHAPES:
        fwd, bwd = model.new_design(B, N)
        assert all(launch.programs >= 2 * 132 for launch in fwd + bwd if launch.config != "torch")
    assert [launch.programs for launch in model.old_design(16, 1025)[1] if "old" in launch.kernel] == [12]
