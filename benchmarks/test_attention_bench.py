"""Attention with BEiT's relative position bias: forward, backward and forward+backward time and peak
memory of every backend, bf16, at BEiT-B 224 and BEiT-L 224/384/512 sizes.

Rows: ``triton`` (atomic table gradient), ``triton-deterministic``, ``eager``, ``sdpa`` (the gathered
bias as ``attn_mask``), ``flex`` (compiled FlexAttention, bias as ``score_mod``), ``xformers`` when
installed, and two bias-free lines for reference: ``flash`` (flash-attn, when installed) and
``sdpa-flash-nobias`` (PyTorch's flash backend without bias: the speed of light for this shape).
GPU only; times from ``triton.testing.do_bench``.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from beitfast import ops
from beitfast.model import num_relative_positions, relative_position_index

pytestmark = pytest.mark.gpu

# name -> (batch, heads, patch grid side, head dim); N = 1 + side^2. Batches fill a 80 GB GPU with
# the eager backend's [B, H, N, N] scores.
SHAPES = {
    "beit-b-224": (128, 12, 14, 64),
    "beit-l-224": (128, 16, 14, 64),
    "beit-l-384": (32, 16, 24, 64),
    "beit-l-512": (16, 16, 32, 64),
}
BIASED = ["triton", "triton-deterministic", "eager", "sdpa", "flex", "xformers"]
BIAS_FREE = ["flash", "sdpa-flash-nobias"]
def make_inputs(shape: str, biased: bool):
    B, H, side, D = SHAPES[shape]
    N = 1 + side * side
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if not biased:
        return q, k, v, None, None
    table = (torch.randn(num_relative_positions((side, side)), H, device="cuda") * 0.5).requires_grad_()
    return q, k, v, table, relative_position_index((side, side)).cuda()


def attention_fn(backend: str, monkeypatch):
    if backend == "sdpa-flash-nobias":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash_sdpa(q, k, v, table, rel_index):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        return flash_sdpa
    name = backend
    if backend == "triton-deterministic":
        monkeypatch.setenv("BEITFAST_DETERMINISTIC", "1")
        name = "triton"
    else:
        monkeypatch.setenv("BEITFAST_DETERMINISTIC", "0")
    return lambda q, k, v, table, rel_index: ops.rel_pos_attention(q, k, v, table, rel_index, backend=name)


def peak_bytes(fn) -> int:
    """Peak memory one call allocates above what was already allocated."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BIASED + BIAS_FREE)
def test_attention(backend, shape, record_result, training_modes, monkeypatch):
    from triton.testing import do_bench

    inputs = make_inputs(shape, biased=backend in BIASED)
    if backend != "sdpa-flash-nobias":
        q, k, v, table, rel_index = inputs
        reasons = ops.explain("attention", q=q, k=k, v=v, bias_table=table, rel_index=rel_index, scale=1.0)
        why = reasons[backend.removesuffix("-deterministic")]
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")
    attend = attention_fn(backend, monkeypatch)
    params = [t for t in inputs[:4] if t is not None]

    def forward():
        return attend(*inputs)

    B, H, side, D = SHAPES[shape]
    for mode, fn in training_modes(forward, params):
        ms = do_bench(fn, warmup=25, rep=100)
        record_result("attention", backend=backend, mode=mode, shape=shape, batch=B, heads=H, tokens=1 + side * side,
               head_dim=D, dtype="bfloat16", bias=backend in BIASED, ms=ms, peak_memory_bytes=peak_bytes(fn))
        assert ms > 0
