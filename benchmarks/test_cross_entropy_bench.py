"""Masked-token LM cross-entropy (LM head + loss): forward+backward time and extra memory, kernel
against kernel. On a GPU; ``--smoke`` runs tiny shapes on the CPU (no timing claims).

Two cases at BEiT pre-training shapes (75 of 196 patches masked per image, V = 8192):

* ``gathered``: every contestant gets the same pre-gathered bf16 rows ``[M, D]``, labels ``[M]``,
  bf16 weight and bias; the gather happens outside the timed region (peers need it, ours do not).
  Contestants: our ``triton`` and ``cuda`` backends, ``eager`` (gather-free linear + cross-entropy),
  ``eager-compiled`` (the same under ``torch.compile``), Liger's ``LigerFusedLinearCrossEntropyLoss``
  and Cut Cross-Entropy's ``linear_cross_entropy``, each at its defaults, and Liger with fp32
  gradient accumulation (our precision).
* ``model``: what ``beitfast.BEiT`` really passes: the fp32 ``x[:, 1:]`` view of the final norm's
  ``[B, 197, D]`` output, the fp32 ``lm_head`` weight and bias, ``[B, N]`` labels and the mask, under bf16
  autocast; the selection of the masked rows is part of the timed call (``eager`` pays ``x[mask]``).

Memory: ``peak_memory_bytes`` is the peak above what was allocated before the call, and
``extra_memory_bytes`` that peak less the gradients the call returns; ``eager_logits_bytes`` is the
eager ``[M, V]`` logits (bf16 and their fp32 copy, 6 bytes an element), the reference of the goal
"extra memory under a tenth of the eager logits".

``NUMERICS`` states what each contestant computes in (the peers at their documented defaults); every
row carries it as ``numerics``, and the peers' rows their package version. ``triton_launches`` is the
number of Triton kernels one warm forward+backward launches (counted by wrapping Triton's launchers);
the model case bounds the rows by the masking (``max_masked_per_image``), as the trainer does.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from beitfast import MaskingGenerator
from beitfast.ops import dispatch, masked_lm_cross_entropy

SHAPES = {"full": dict(grid=14, num_masked=75, min_block=16, vocab=8192),
          "smoke": dict(grid=4, num_masked=6, min_block=2, vocab=64, batch=2, dim=32)}
NUMERICS = {
    "triton": "bf16 GEMMs with fp32 accumulation, logits rounded to bf16 as eager, softmax in fp32, "
              "dW and db summed in fp32 (one chunk at these shapes) and rounded once",
    "cuda": "as triton (cuBLAS GEMMs, dW with fp32 output)",
    "eager": "F.linear in bf16, cross-entropy on the fp32 copy of the logits, bf16 gradient GEMMs",
    "eager-compiled": "eager under torch.compile (inductor may fuse the softmax into fewer passes)",
    "liger": "defaults (accum_dtype=None): logits chunks in the input dtype, softmax in fp32, dW and db "
             "summed over chunks in the weight's dtype (bf16 here)",
    "liger-fp32-accum": "liger with accum_dtype=torch.float32: dW and db summed in fp32, as ours",
    "cut-cross-entropy": "defaults (filter_eps='auto'): gradient blocks whose softmax is below a "
                         "dtype-based threshold are skipped (approximate gradients)",
}
PEER_PACKAGES = {"liger": "liger-kernel", "liger-fp32-accum": "liger-kernel",
                 "cut-cross-entropy": "cut-cross-entropy"}
GATHERED = ["triton", "cuda", "eager", "eager-compiled", "liger", "liger-fp32-accum", "cut-cross-entropy"]
MODEL = ["triton", "cuda", "eager"]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gathered_loss(contestant: str, smoke: bool):
    """``fn(rows, weight, bias, labels) -> mean loss`` on gathered rows, or why it cannot run here."""
    if contestant.startswith("liger"):
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as error:
            return f"liger-kernel is not importable ({error})"
        try:
            liger = LigerFusedLinearCrossEntropyLoss(
                **({"accum_dtype": torch.float32} if contestant == "liger-fp32-accum" else {}))
        except TypeError as error:
            return f"this liger-kernel has no fp32 accumulation option ({error})"
        return lambda h, w, b, y: liger(w, h, y, b)
    if contestant == "cut-cross-entropy":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as error:
            return f"cut-cross-entropy is not importable ({error})"
        if "bias" in inspect.signature(linear_cross_entropy).parameters:
            return lambda h, w, b, y: linear_cross_entropy(h, w, y, bias=b)
        return lambda h, w, b, y: linear_cross_entropy(*_bias_folded(h, w, b), y)
    if contestant == "eager-compiled":
        return torch.compile(lambda h, w, b, y: F.cross_entropy(F.linear(h, w, b).float(), y),
                             **({"backend": "eager"} if smoke else {}))
    return lambda h, w, b, y: masked_lm_cross_entropy(h, w, b, y, backend=contestant)


def _bias_folded(hidden, weight, bias):
    """The classifier's bias as an extra input column, for a peer without a bias argument (Cut
    Cross-Entropy 25.x): ``[h, 1, 0..] @ [w, b, 0..]^T = h @ w^T + b``, padded to a multiple of 8 columns
    for its tensor-core tiles. The copies are part of what a user of that peer runs, so they are timed."""
    rows, dim = hidden.shape
    width = -(-(dim + 1) // 8) * 8
    folded_hidden = hidden.new_zeros(rows, width)
    folded_hidden[:, :dim] = hidden
    folded_hidden[:, dim] = 1
    folded_weight = weight.new_zeros(weight.shape[0], width)
    folded_weight[:, :dim] = weight
    folded_weight[:, dim] = bias
    return folded_hidden, folded_weight


def _skip_unless_backend_takes(backend: str, **inputs) -> None:
    if backend in dispatch.backends("cross_entropy"):
        why = dispatch.explain("cross_entropy", ignore_index=-100, reduction="mean", **inputs)[backend]
        if why:
            pytest.skip(f"{backend}: {'; '.join(why)}")


def _case(smoke: bool, batch: int, dim: int) -> dict:
    shape = SHAPES["smoke" if smoke else "full"]
    if smoke:
        batch, dim = shape["batch"], shape["dim"]
    return dict(shape, batch=batch, dim=dim)


def _masks(case: dict, device: torch.device) -> torch.Tensor:
    grid = (case["grid"], case["grid"])
    generator = MaskingGenerator(grid, case["num_masked"], min_num_patches=case["min_block"], seed=0)
    return generator.batch(case["batch"]).reshape(case["batch"], -1).to(device)


@contextlib.contextmanager
def _counting_triton_launches():
    """A list that gets one entry per Triton kernel launched while active (the kernels still run)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launched = []
    with contextlib.ExitStack() as stack:
        for kind in (JITFunction, InterpretedFunction):
            def counted(fn, *args, _run=kind.run, **kwargs):
                if not kwargs.get("warmup"):
                    launched.append(fn)
                return _run(fn, *args, **kwargs)
            stack.enter_context(mock.patch.object(kind, "run", counted))
        yield launched


def _record(record_result, measure, name, contestant, case, rows, forward_backward, on_gpu):
    grads = forward_backward()  # warm: autotuning done, so each launch below is one kernel
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    del grads
    launches = None
    if contestant in ("triton", "liger", "liger-fp32-accum", "cut-cross-entropy"):
        with _counting_triton_launches() as launched:
            forward_backward()
        launches = len(launched)
    ms, peak = measure(forward_backward)
    package = PEER_PACKAGES.get(contestant)
    record_result(
        "cross_entropy", case=name, backend=contestant, mode="fwd+bwd", batch=case["batch"], rows=rows,
        dim=case["dim"], vocab=case["vocab"], ms=ms, peak_memory_bytes=peak if on_gpu else None,
        extra_memory_bytes=peak - grad_bytes if on_gpu else None, eager_logits_bytes=rows * case["vocab"] * 6,
        numerics=NUMERICS[contestant], peer_version=_version(package) if package else None,
        triton_launches=launches,
    )
    assert ms > 0


def _skip_in_smoke(smoke: bool, batch: int, dim: int) -> None:
    if smoke and (batch, dim) != (128, 768):
        pytest.skip("smoke mode runs one tiny configuration per contestant")


@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("batch", [128, 256])
@pytest.mark.parametrize("contestant", GATHERED)
def test_cross_entropy_gathered(contestant, batch, dim, bench_device, smoke, record_result, measure):
    _skip_in_smoke(smoke, batch, dim)
    case = _case(smoke, batch, dim)
    on = dict(device=bench_device, dtype=torch.bfloat16)
    mask = _masks(case, bench_device)
    vocab, dim = case["vocab"], case["dim"]
    rows = torch.randn(int(mask.sum()), dim, **on).requires_grad_()
    weight = (torch.randn(vocab, dim, **on) * dim ** -0.5).requires_grad_()
    bias = (torch.randn(vocab, **on) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (rows.shape[0],), device=bench_device)
    _skip_unless_backend_takes(contestant, hidden=rows, weight=weight, bias=bias, labels=labels, mask=None)
    fn = gathered_loss(contestant, smoke)
    if isinstance(fn, str):
        pytest.skip(fn)
    params = [rows, weight, bias]
    _record(record_result, measure, "gathered", contestant, case, rows.shape[0],
            lambda: torch.autograd.grad(fn(rows, weight, bias, labels), params), bench_device.type == "cuda")


@pytest.mark.parametrize("dim", [768, 1024])
@pytest.mark.parametrize("batch", [128, 256])
@pytest.mark.parametrize("contestant", MODEL)
def test_cross_entropy_model(contestant, batch, dim, bench_device, smoke, record_result, measure):
    _skip_in_smoke(smoke, batch, dim)
    case = _case(smoke, batch, dim)
    vocab, dim = case["vocab"], case["dim"]
    mask = _masks(case, bench_device)
    tokens = torch.randn(case["batch"], mask.shape[1] + 1, dim, device=bench_device, requires_grad=True)
    weight = (torch.randn(vocab, dim, device=bench_device) * dim ** -0.5).requires_grad_()
    bias = torch.zeros(vocab, device=bench_device, requires_grad=True)
    labels = torch.randint(0, vocab, mask.shape, device=bench_device)
    def autocast():
        return torch.autocast(bench_device.type, dtype=torch.bfloat16)

    with autocast():
        _skip_unless_backend_takes(contestant, hidden=tokens[:, 1:], weight=weight, bias=bias, labels=labels,
                                   mask=mask)
    params = [tokens, weight, bias]

    def forward_backward():
        # The view is taken inside, as the model does, so its backward is part of the timing.
        with autocast():
            loss = masked_lm_cross_entropy(tokens[:, 1:], weight, bias, labels, mask, backend=contestant,
                                           max_masked_per_image=case["num_masked"])
        return torch.autograd.grad(loss, params)

    _record(record_result, measure, "model", contestant, case, int(mask.sum()), forward_backward,
            bench_device.type == "cuda")
