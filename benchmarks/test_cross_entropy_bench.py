"""Masked-token LM cross-entropy (LM head + loss): forward+backward time and peak memory of the triton,
cuda, eager and torch.compile'd eager backends, Liger's ``LigerFusedLinearCrossEntropyLoss`` and Cut
Cross-Entropy's ``linear_cross_entropy``.

BEiT pre-training shapes: hidden is the ``x[:, 1:]`` view of a ``[B, 197, D]`` bf16 tensor, 75
blockwise-masked patches of 196 per image (M = 75 B rows), V = 8192, labels ``[B, 196]``; B = 128 and
256, D = 768 (base) and 1024 (large). Everything bf16. The peers take gathered rows, so their timing
includes the ``hidden[mask]`` gather (and its host sync), as a user of them pays it.

Memory: ``peak_memory_bytes`` is the peak above what was allocated before the call (inputs), and
``extra_memory_bytes`` that peak less the gradients the call returns (what the loss itself needs;
the eager logits alone are M * V * 6 bytes: bf16 and fp32 copies). GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch

from beitfast import MaskingGenerator
from beitfast.ops import dispatch, masked_lm_cross_entropy
from beitfast.ops.cross_entropy import cross_entropy_eager

pytestmark = pytest.mark.gpu

SEQ, NUM_MASKED, VOCAB = 196, 75, 8192
BACKENDS = ["triton", "cuda", "eager", "eager-compiled", "liger", "cut-cross-entropy"]
def make_inputs(batch: int, dim: int) -> dict:
    on = dict(device="cuda", dtype=torch.bfloat16)
    tokens = torch.randn(batch, SEQ + 1, dim, **on).requires_grad_()
    weight = (torch.randn(VOCAB, dim, **on) * dim ** -0.5).requires_grad_()
    bias = (torch.randn(VOCAB, **on) * 0.02).requires_grad_()
    mask = MaskingGenerator((14, 14), NUM_MASKED, seed=0).batch(batch).reshape(batch, SEQ).cuda()
    labels = torch.randint(0, VOCAB, (batch, SEQ), device="cuda")
    return dict(tokens=tokens, weight=weight, bias=bias, mask=mask, labels=labels)


def loss_fn(backend: str):
    """``fn(hidden, weight, bias, labels, mask) -> scalar mean loss`` for a backend or a peer, or the
    reason it cannot run here."""
    if backend == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as error:
            return f"liger-kernel is not importable ({error})"
        liger = LigerFusedLinearCrossEntropyLoss(reduction="mean")
        return lambda h, w, b, y, m: liger(w, h[m], y[m], b)
    if backend == "cut-cross-entropy":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as error:
            return f"cut-cross-entropy is not importable ({error})"
        return lambda h, w, b, y, m: linear_cross_entropy(h[m], w, y[m], bias=b, reduction="mean")
    if backend == "eager-compiled":
        compiled = torch.compile(cross_entropy_eager)
        return lambda h, w, b, y, m: compiled(h, w, b, y, m, -100, "mean")[0]
    return lambda h, w, b, y, m: masked_lm_cross_entropy(h, w, b, y, m, backend=backend)


@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("batch", [128, 256])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy(backend, batch, dim, record_result, measure):
    inputs = make_inputs(batch, dim)
    tokens, weight, bias, mask, labels = (inputs[k] for k in ("tokens", "weight", "bias", "mask", "labels"))
    hidden = tokens[:, 1:]
    if backend in dispatch.backends("cross_entropy"):
        why = dispatch.explain("cross_entropy", hidden=hidden, weight=weight, bias=bias, labels=labels,
                               mask=mask, ignore_index=-100, reduction="mean")[backend]
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")
    fn = loss_fn(backend)
    if isinstance(fn, str):
        pytest.skip(fn)
    params = [tokens, weight, bias]

    def forward_backward():
        # The view is taken inside, as the model does, so its backward is part of the timing.
        return torch.autograd.grad(fn(tokens[:, 1:], weight, bias, labels, mask), params)

    grads = forward_backward()
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del grads
    ms, peak = measure(forward_backward)
    rows = int(mask.sum())
    record_result("cross_entropy", backend=backend, mode="fwd+bwd", batch=batch, rows=rows, dim=dim, vocab=VOCAB,
           precision="bf16", ms=ms, peak_memory_bytes=peak, extra_memory_bytes=peak - grad_bytes,
           eager_logits_bytes=rows * VOCAB * 6, triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    assert ms > 0
