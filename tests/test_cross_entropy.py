"""Masked-token cross-entropy: the fused backends against the float64 eager definition.

On CPU the Triton backend runs through the interpreter (small shapes: it is slow) and the CUDA backend's
Python side (custom ops, autograd) through a stand-in for its C++ op; the CUDA kernels themselves and
bfloat16 only run on a GPU. Each check judges a backend's error against the error of the eager backend
in the same precision, both measured against float64 (tolerances per dtype on top).
"""

import contextlib
import dataclasses

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from beitfast import _ext
from beitfast.testing import HostReads
from beitfast.ops import cross_entropy as cross_entropy_ops
from beitfast.ops import dispatch, masked_lm_cross_entropy

HAS_GPU = torch.cuda.is_available()

IGNORE = -100
# Absolute slack per dtype, relative to the largest reference value.
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(B, N, D, V, dtype, device, *, masked=0.4, labels_2d=True, with_bias=True, hit_rate=0.5,
                ignored=2, strided_hidden=True, transposed_weight=False):
    """Random BEiT-like inputs; hidden is the ``x[:, 1:]`` view of a ``[B, N+1, D]`` tensor and about
    ``hit_rate`` of the rows get their float64 argmax as label (so accuracy is not trivially 0)."""
    full = torch.randn(B, N + 1, D, device=device).to(dtype)
    hidden = full[:, 1:] if strided_hidden else full[:, 1:].contiguous()
    if transposed_weight:
        weight = (torch.randn(D, V, device=device) * D ** -0.5).to(dtype).t()
    else:
        weight = (torch.randn(V, D, device=device) * D ** -0.5).to(dtype)
    # A strided view: the kernels must not assume a contiguous bias.
    bias = (torch.randn(2 * V, device=device) * 0.5).to(dtype)[::2] if with_bias else None
    mask = torch.rand(B, N, device=device) < masked
    mask[0, 0] = True  # never empty by chance
    best = (hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())).argmax(-1)
    random_labels = torch.randint(0, V, (B, N), device=device)
    labels = torch.where(torch.rand(B, N, device=device) < hit_rate, best, random_labels)
    flat = labels[mask]
    flat[torch.randperm(flat.numel(), device=device)[:ignored]] = IGNORE
    labels[mask] = flat
    if not labels_2d:
        labels = labels[mask]
    return hidden, weight, bias, labels, mask


def run(backend, hidden, weight, bias, labels, mask, reduction="mean", upstream=None, cast=None, bound=None):
    """Loss, accuracy and the gradients of hidden, weight and bias (on leaf copies, optionally cast);
    ``bound``: the op's ``max_masked_per_image``."""
    h, w, b = (None if t is None else (t.to(cast) if cast else t).detach().requires_grad_(True)
               for t in (hidden, weight, bias))
    h_in = h
    if not hidden.is_contiguous():
        # Keep the layout of the x[:, 1:] view: the leaf is the full [B, N+1, D] tensor.
        h = torch.cat([torch.zeros_like(h[:, :1]), h], dim=1).detach().requires_grad_(True)
        h_in = h[:, 1:]
    loss, accuracy = masked_lm_cross_entropy(
        h_in, w, b, labels, mask, ignore_index=IGNORE, reduction=reduction, backend=backend,
        return_accuracy=True, max_masked_per_image=bound,
    )
    # Not 1: a backward that drops grad_output shows.
    (loss * (upstream if upstream is not None else 0.75)).sum().backward()
    grad_hidden = h.grad if h_in is h else h.grad[:, 1:]
    return loss.detach(), accuracy, [grad_hidden, w.grad, None if b is None else b.grad]


def check_against_reference(backend, inputs, reduction="mean", upstream=None, bound=None):
    hidden, weight, bias, labels, mask = inputs
    dtype = hidden.dtype
    ref_loss, ref_acc, ref_grads = run("eager", *inputs, reduction=reduction, upstream=upstream,
                                       cast=torch.float64)
    same_loss, _, same_grads = run("eager", *inputs, reduction=reduction, upstream=upstream)
    loss, acc, grads = run(backend, *inputs, reduction=reduction, upstream=upstream, bound=bound)

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert torch.equal(acc, ref_acc.float()), (acc, ref_acc)
    named = [("loss", loss, same_loss, ref_loss)] + [
        (name, g, s, r) for name, g, s, r in zip(("hidden", "weight", "bias"), grads, same_grads, ref_grads)
        if r is not None
    ]
    for name, ours, eager, ref in named:
        assert ours.dtype == eager.dtype and ours.shape == ref.shape, name
        assert torch.isfinite(ours).all(), name
        err = (ours.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        slack = SLACK[dtype] * max(ref.abs().max().item(), 1e-3)
        assert err <= 2 * eager_err + slack, f"{name}: error {err:.3g}, eager's {eager_err:.3g}"


@pytest.fixture
def poisoned(monkeypatch):
    """Buffers the op allocates with torch.empty start as NaN (or garbage), so unwritten ones show."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(True) if t.dtype == torch.bool else t.fill_(-12345)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def chunks_of(rows, V, dtype, monkeypatch):
    """Sets the fused backends' logits budget to ``rows`` rows of ``[rows, V]`` logits in ``dtype``."""
    monkeypatch.setattr(cross_entropy_ops, "LOGITS_BUDGET_BYTES", rows * V * dtype.itemsize)


# ---------------------------------------------------------------------------------------------------
# triton (interpreter on CPU)

TRITON_CASES = {
    # B, N, D, V, options: masked rows with [B, N] labels, tails everywhere (M, D, V)
    "mask-2d": (3, 37, 48, 1000, {}),
    "mask-1d-no-bias": (2, 45, 32, 257, {"labels_2d": False, "with_bias": False}),
    "rows-multi-d-tile": (2, 40, 192, 300, {"transposed_weight": True}),
    # A budget of 64 rows: 200 rows in chunks of 64, three hold selected rows (the weight gradient
    # adds the later ones to the first), the last one only rows past the count
    "many-chunks": (4, 50, 40, 130, {"masked": 0.6, "chunk_rows": 64}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_float64(case, dtype, device, poisoned, monkeypatch):
    B, N, D, V, options = TRITON_CASES[case]
    options = dict(options)
    if "chunk_rows" in options:
        chunks_of(options.pop("chunk_rows"), V, dtype, monkeypatch)
    check_against_reference("triton", make_inputs(B, N, D, V, dtype, device, **options))


def bounded_mask(B, N, most, device):
    """A mask selecting at most ``most`` positions per image (exactly ``most`` in all but the last)."""
    mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    for b in range(B):
        mask[b, torch.randperm(N, device=device)[: most - (b == B - 1)]] = True
    return mask


@pytest.mark.parametrize("chunk_rows", [None, 64], ids=["one-chunk", "chunks-of-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_rows_bounded_by_the_masking(chunk_rows, dtype, device, poisoned, monkeypatch):
    # max_masked_per_image plans B * 23 rows instead of B * N: the same function as without a bound.
    B, N, D, V, most = 5, 61, 40, 300, 23
    if chunk_rows:
        chunks_of(chunk_rows, V, dtype, monkeypatch)
    hidden, weight, bias, labels, _ = make_inputs(B, N, D, V, dtype, device)
    mask = bounded_mask(B, N, most, device)
    planned = cross_entropy_ops.plan_rows(labels, mask, IGNORE, V, most)
    assert planned.row_labels.shape == (B * most,) and planned.bounded
    for reduction in ("mean", "sum"):
        check_against_reference("triton", (hidden, weight, bias, labels, mask), reduction=reduction,
                                bound=most)


def test_rows_past_the_bound_are_an_error(device, monkeypatch):
    hidden, weight, bias, labels, _ = make_inputs(3, 20, 16, 50, torch.float32, device)
    mask = bounded_mask(3, 20, 6, device)
    with pytest.raises(ValueError, match=r"max_masked_per_image=5.*6 rows"):
        masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton", max_masked_per_image=5)
    with pytest.raises(ValueError, match="max_masked_per_image"):
        masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton", max_masked_per_image=-1)
    # Where values are not read (a GPU), the dropped rows make the loss NaN: the trainer stops on it.
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            loss = masked_lm_cross_entropy(hidden.requires_grad_(grad), weight, bias, labels, mask,
                                           backend="triton", max_masked_per_image=5)
        assert loss.isnan(), grad
    fits = masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton",
                                   max_masked_per_image=6)
    assert fits.isfinite()


def test_chunk_plan_at_beit_b():
    # 128 images x 75 masked rows at V = 8192: one chunk of logits in 16-bit, two in fp32; without the
    # bound (B * N = 25,088 rows) three 16-bit chunks, most of them past the count.
    from beitfast.ops.cross_entropy import LOGITS_BUDGET_BYTES, rows_per_chunk

    assert rows_per_chunk(128 * 75, 8192, 2) == 9600
    assert rows_per_chunk(128 * 75, 8192, 4) == 4800
    assert rows_per_chunk(128 * 196, 8192, 2) == 8384
    assert 9600 * 8192 * 2 <= LOGITS_BUDGET_BYTES < 9600 * 8192 * 4
    # A chunk never exceeds the budget, and is at least one tile of rows.
    for rows, vocab, size, budget in [(10**5, 50257, 2, 2**26), (1000, 8192, 2, 1), (7, 100, 4, 10**9)]:
        chunk = rows_per_chunk(rows, vocab, size, budget)
        assert 1 <= chunk <= rows and (chunk * vocab * size <= budget or chunk == 64)


def test_triton_without_mask(device, poisoned):
    hidden, weight, bias, labels, mask = make_inputs(1, 70, 48, 1000, torch.float32, device)
    rows = hidden[0]
    # A strided view: the kernels must not assume contiguous labels.
    labels = torch.stack([labels[0], labels[0]], dim=1)[:, 0]
    labels[3] = IGNORE
    check_against_reference("triton", (rows, weight, bias, labels, None))


def test_triton_vocab_tiles(device, poisoned):
    # 2500 columns: the row pass walks two 2048-column tiles, the second one short.
    check_against_reference("triton", make_inputs(1, 20, 32, 2500, torch.float32, device, masked=0.5))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_reductions(reduction, device, poisoned):
    inputs = make_inputs(2, 33, 48, 500, torch.float32, device)
    upstream = None
    if reduction == "none":
        # A different weight per row, so the backward sees per-row gradients.
        upstream = torch.rand(int(inputs[4].sum()), device=device) + 0.5
    check_against_reference("triton", inputs, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("labels_2d", [True, False])
def test_triton_empty_selection(labels_2d, device, poisoned):
    hidden, weight, bias, labels, mask = make_inputs(2, 9, 32, 100, torch.float32, device)
    mask = torch.zeros_like(mask)
    if not labels_2d:
        labels = labels[mask]
    for reduction in ("mean", "sum"):
        loss, acc, grads = run("triton", hidden, weight, bias, labels, mask, reduction=reduction)
        assert loss.item() == 0 and acc.item() == 0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    loss, _, _ = run("triton", hidden, weight, bias, labels, mask, reduction="none")
    assert loss.shape == (0,)


def test_triton_all_rows_ignored(device, poisoned):
    hidden, weight, bias, labels, mask = make_inputs(2, 9, 32, 100, torch.float32, device)
    labels = torch.full_like(labels, IGNORE)
    loss, acc, grads = run("triton", hidden, weight, bias, labels, mask)
    assert loss.item() == 0 and acc.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    loss, _, _ = run("triton", hidden, weight, bias, labels, mask, reduction="none")
    assert torch.equal(loss, torch.zeros(int(mask.sum()), device=device))


@pytest.mark.skipif(HAS_GPU, reason="CPU autocast case; the GPU tests cover CUDA autocast")
def test_triton_autocast_float16(device):
    # fp32 activations and parameters under autocast, as the model passes them: the GEMMs run in fp16
    # and the gradients come back in the parameters' dtype, as with the eager linear.
    hidden, weight, bias, labels, mask = make_inputs(2, 30, 48, 300, torch.float32, device)
    ref_loss, _, ref_grads = run("eager", hidden.half(), weight.half(), bias.half(), labels, mask,
                                 cast=torch.float64)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _, grads = run("triton", hidden, weight, bias, labels, mask)
        same_loss, _, same_grads = run("eager", hidden, weight, bias, labels, mask)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for name, ours, eager, ref in zip(("loss", "hidden", "weight", "bias"), [loss, *grads],
                                      [same_loss, *same_grads], [ref_loss, *ref_grads]):
        err = (ours.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        assert err <= 2 * eager_err + 2e-3 * ref.abs().max().item(), (name, err, eager_err)


def test_triton_gradients_are_bitwise_reproducible(device):
    inputs = make_inputs(4, 50, 40, 130, torch.float16, device, masked=0.6)
    first, second = (run("triton", *inputs) for _ in range(2))
    for a, b in zip([first[0], *first[2]], [second[0], *second[2]]):
        assert torch.equal(a, b)


def test_triton_kernels_use_no_atomics():
    # Deterministic by construction: every sum has one owner (the interpreter runs atomics in order,
    # so a rerun could not show them).
    import inspect

    from beitfast.kernels import cross_entropy as kernels

    assert "tl.atomic_" not in inspect.getsource(kernels)


def test_triton_compiles_without_graph_breaks(device):
    hidden, weight, bias, labels, mask = make_inputs(2, 17, 32, 100, torch.float32, device)
    hidden = hidden.detach().requires_grad_(True)

    def loss_fn(h, w, b):
        return masked_lm_cross_entropy(h, w, b, labels, mask, ignore_index=IGNORE, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, weight, bias)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref = loss_fn(hidden, weight, bias)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_triton_refusals(device):
    hidden, weight, bias, labels, mask = make_inputs(1, 5, 16, 20, torch.float64, device)
    inputs = dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask,
                  ignore_index=IGNORE, reduction="mean")
    reasons = dispatch.explain("cross_entropy", **inputs)
    assert any("float64" in r for r in reasons["triton"]), reasons
    assert reasons["eager"] == []
    if not HAS_GPU:
        assert reasons["cuda"], reasons
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden32 = hidden.float()
            reasons = dispatch.explain("cross_entropy", **{**inputs, "hidden": hidden32,
                                                            "weight": weight.float(), "bias": bias.float()})
        assert any("bfloat16" in r for r in reasons["triton"]), reasons


# ---------------------------------------------------------------------------------------------------
# memory: every allocation of the triton backend's forward and backward at BEiT-B shapes, with the
# kernel launches skipped (the launch code allocates; kernels only write into what it allocated)


class AllocatedBytes(TorchDispatchMode):
    """Bytes of every storage allocated under the mode (an op output whose storage is none of its
    inputs'), frees ignored: an upper bound of the peak memory the code under the mode added."""

    def __init__(self):
        super().__init__()
        self.total = 0
        # Held, so that no address is freed and reused by a later allocation while the mode records.
        self._storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "beitfast":
            # Our custom ops: run their implementation under the mode, so its allocations are seen.
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in inputs and storage.data_ptr() not in self._storages:
                self._storages[storage.data_ptr()] = storage
                self.total += storage.nbytes()
        return out


def test_allocated_bytes_sees_a_temporary():
    # The accounting itself: a [1000, 1000] float32 temporary counts, a view and an in-place op do not.
    x = torch.randn(1000, 10)
    with AllocatedBytes() as mode:
        y = (x @ x.t()).sum()
        x.t().mul_(2)
    assert 4 * 1000 * 1000 <= mode.total < 4 * 1000 * 1000 + 1000, mode.total
    del y


@pytest.mark.skipif(HAS_GPU, reason="CPU accounting; the GPU test measures the CUDA allocator")
@pytest.mark.parametrize("dtype, autocast, gathered, budget", [
    # the model: fp32 hidden and weight under 16-bit autocast, the trainer's bound, the default budget
    (torch.float32, torch.float16, False, None),
    # a budget that needs many chunks: the buffers fall under a tenth of the logits
    (torch.float32, torch.float16, False, 1 / 20),
    (torch.float16, None, False, 1 / 20),
    (torch.float32, None, False, 1 / 20),
    (torch.float16, None, True, 1 / 20),  # pre-gathered rows: the exact row count
], ids=["fp32-autocast-fp16-default-budget", "fp32-autocast-fp16", "fp16", "fp32", "fp16-gathered"])
def test_triton_extra_memory(dtype, autocast, gathered, budget, monkeypatch):
    from beitfast.kernels import cross_entropy as kernels

    for name in dir(kernels):
        if name.endswith("_kernel"):
            monkeypatch.setattr(getattr(kernels, name), "run", lambda *args, **kwargs: None)
    B, N, D, V, masked = 128, 196, 768, 8192, 75
    compute = autocast or dtype
    # The eager logits: the linear's output in the compute dtype and, for 16-bit, its float32 copy.
    logits_bytes = B * masked * V * (4 + (compute.itemsize if compute != torch.float32 else 0))
    if budget is not None:
        monkeypatch.setattr(cross_entropy_ops, "LOGITS_BUDGET_BYTES", int(B * masked * V * 4 * budget))
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, torch.randperm(N)[:masked]] = True
    labels = torch.randint(0, V, (B, N))
    hidden = torch.randn(B, N, D, dtype=dtype)
    if gathered:
        hidden, labels, mask = hidden[mask], labels[mask], None
    hidden.requires_grad_(True)
    weight = torch.randn(V, D, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True)
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with AllocatedBytes() as mode, context:
        loss = masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton",
                                       max_masked_per_image=masked if budget is None else None)
        loss.backward()
    grad_bytes = sum(t.grad.nbytes for t in (hidden, weight, bias))
    extra = mode.total - grad_bytes
    # One chunk of logits within the budget, everything else under a tenth of the eager logits.
    logits_buffer = B * masked * V * compute.itemsize if budget is None else 0
    assert logits_buffer <= cross_entropy_ops.LOGITS_BUDGET_BYTES
    assert 0 < extra - logits_buffer < logits_bytes / 10, (extra / logits_bytes, extra, logits_bytes)


# ---------------------------------------------------------------------------------------------------
# invalid labels: on a GPU nothing is read on the host, so a counted label outside [0, V) is treated
# as ignored and counted on the device (CPU and BEITFAST_CHECKS=1 raise instead, see below)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_invalid_labels_are_ignored_and_counted(backend, device, monkeypatch, request):
    if backend == "cuda":
        request.getfixturevalue("cuda_backend_on_cpu")
        device = torch.device("cpu")
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    hidden, weight, bias, labels, mask = make_inputs(2, 30, 24, 90, torch.float32, device)
    selected = mask.nonzero()
    broken = labels.clone()
    for (b, n), bad in zip(selected[1:4].tolist(), (90, -1, 10**6)):
        broken[b, n] = bad
    ignored = labels.clone()
    ignored[broken != labels] = IGNORE
    cross_entropy_ops.reset_invalid_label_count()
    ours = run(backend, hidden, weight, bias, broken, mask)
    assert cross_entropy_ops.invalid_label_count(device).item() == 3
    ref = run("eager", hidden, weight, bias, ignored, mask)
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])
    for g, r in zip(ours[2], ref[2]):
        torch.testing.assert_close(g, r)
    cross_entropy_ops.reset_invalid_label_count()
    assert cross_entropy_ops.invalid_label_count(device).item() == 0


# ---------------------------------------------------------------------------------------------------
# cuda backend's Python side (custom ops, autograd, reductions) on CPU, through a stand-in for the C++
# op beitfast::lm_cross_entropy_chunked with the same schema and semantics

CHUNKED_SCHEMA = (
    "lm_cross_entropy_chunked(Tensor hidden, Tensor weight, Tensor? bias, Tensor row_labels, "
    "Tensor? source_rows, Tensor? row_count, Tensor? row_scale, int ignore_index, ScalarType compute_dtype, "
    "int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


STAND_IN_CHUNKS: list[int] = []


def _chunked_stand_in(hidden, weight, bias, row_labels, source_rows, row_count, row_scale, ignore_index,
                      compute_dtype, chunk_rows):
    STAND_IN_CHUNKS.append(chunk_rows)
    B, N, D = hidden.shape
    R = row_labels.shape[0]
    source = source_rows if source_rows is not None else torch.arange(R)
    rows = hidden.reshape(B * N, D)[source].to(compute_dtype)
    weight_c = weight.to(compute_dtype)
    logits = rows @ weight_c.t() + (0 if bias is None else bias.to(compute_dtype))
    logits = logits.float()
    counted = cross_entropy_ops.counted_labels(row_labels, ignore_index, weight.shape[0])
    safe_labels = torch.where(counted, row_labels, 0)
    lse = logits.logsumexp(-1)
    loss = torch.where(counted, lse - logits.gather(1, safe_labels[:, None])[:, 0], 0.0)
    hits = counted & (logits.argmax(-1) == row_labels)
    if row_scale is None:
        empty = hidden.new_empty(0)
        return loss, hits, empty, empty, empty
    onehot = torch.nn.functional.one_hot(safe_labels, weight.shape[0])
    scale = torch.where(counted, row_scale.expand(R), 0.0)
    dlogits = ((logits - lse[:, None]).exp() - onehot) * scale[:, None]
    grad_hidden = torch.zeros(B * N, D, dtype=hidden.dtype)
    grad_hidden[source] = (dlogits.to(compute_dtype) @ weight_c).to(hidden.dtype)
    grad_weight = (dlogits.to(compute_dtype).float().t() @ rows.float()).to(weight.dtype)
    grad_bias = dlogits.sum(0).to(bias.dtype) if bias is not None else torch.empty(0)
    return loss, hits, grad_hidden.view(B, N, D), grad_weight, grad_bias


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """The cuda backend's Python side running the stand-in on CPU tensors."""
    _ext.load()
    if hasattr(torch.ops.beitfast, "lm_cross_entropy_chunked"):
        # A CUDA build defines the op with a CUDA kernel only: add the CPU stand-in beside it.
        library = torch.library.Library("beitfast", "IMPL")
    else:
        library = torch.library.Library("beitfast", "FRAGMENT")
        library.define(CHUNKED_SCHEMA)
    library.impl("lm_cross_entropy_chunked", _chunked_stand_in, "CPU")
    backend = dispatch._REGISTRY["cross_entropy"]["cuda"]
    monkeypatch.setitem(dispatch._REGISTRY["cross_entropy"], "cuda",
                        dataclasses.replace(backend, check=dispatch.accepts_all, available=lambda: None))
    # Availability is looked up once per process: an earlier test may have recorded a build without CUDA.
    monkeypatch.setitem(dispatch._MISSING, ("cross_entropy", "cuda"), None)
    yield
    library._destroy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labels_2d", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_python_side_matches_float64(reduction, labels_2d, dtype, cuda_backend_on_cpu):
    inputs = make_inputs(3, 29, 24, 50, dtype, "cpu", labels_2d=labels_2d, with_bias=reduction != "sum")
    upstream = torch.rand(int(inputs[4].sum())) + 0.5 if reduction == "none" else None
    check_against_reference("cuda", inputs, reduction=reduction, upstream=upstream)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_python_side_without_mask(reduction, cuda_backend_on_cpu):
    hidden, weight, bias, labels, mask = make_inputs(1, 40, 24, 50, torch.float32, "cpu")
    upstream = torch.rand(40) + 0.5 if reduction == "none" else None
    check_against_reference("cuda", (hidden[0], weight, bias, labels[0], None), reduction=reduction,
                            upstream=upstream)


def test_cuda_python_side_without_grad_and_empty(cuda_backend_on_cpu):
    hidden, weight, bias, labels, mask = make_inputs(2, 9, 16, 30, torch.float32, "cpu")
    with torch.no_grad():
        ours, ref = (masked_lm_cross_entropy(hidden, weight, bias, labels, mask, ignore_index=IGNORE,
                                             backend=backend) for backend in ("cuda", "eager"))
    torch.testing.assert_close(ours, ref)
    loss, acc, grads = run("cuda", hidden, weight, bias, labels, torch.zeros_like(mask))
    assert loss.item() == 0 and acc.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---------------------------------------------------------------------------------------------------
# validation: clear errors naming the argument, the expected and the received


def _valid(device):
    return make_inputs(2, 6, 8, 10, torch.float32, device)


@pytest.mark.parametrize("broken, error, words", [
    (lambda h, w, b, y, m: (h, w, b, torch.where(m, 10, y), m), ValueError, ["labels", "[0, V=10)", "10"]),
    (lambda h, w, b, y, m: (h, w, b, torch.where(m, -3, y), m), ValueError, ["labels", "-3"]),
    (lambda h, w, b, y, m: (h[..., :7], w, b, y, m), ValueError, ["hidden", "D=8", "(2, 6, 7)"]),
    (lambda h, w, b, y, m: (h, w, b, y[:, :5], m), ValueError, ["labels", "[2, 6]", "(2, 5)"]),
    (lambda h, w, b, y, m: (h, w, b, y[m][:-1], m), ValueError, ["labels", "rows"]),
    (lambda h, w, b, y, m: (h, w, b, y, m[:, :5]), ValueError, ["mask", "(2, 5)"]),
    (lambda h, w, b, y, m: (h, w, b, y, m.int()), ValueError, ["mask", "bool", "torch.int32"]),
    (lambda h, w, b, y, m: (h.long(), w, b, y, m), TypeError, ["hidden", "torch.int64"]),
    (lambda h, w, b, y, m: (h, w, b, y.float(), m), TypeError, ["labels", "torch.float32"]),
    (lambda h, w, b, y, m: (h, w, b[:9], y, m), ValueError, ["bias", "V=10", "(9,)"]),
    (lambda h, w, b, y, m: (h, w.half(), b, y, m), TypeError, ["weight", "torch.float32", "torch.float16"]),
    (lambda h, w, b, y, m: (h[0], w, b, y[0], m), ValueError, ["hidden", "[B, N, D]"]),
])
def test_bad_inputs_raise_clear_errors(broken, error, words, device):
    args = broken(*_valid(device))
    for backend in ("eager", "triton"):
        with pytest.raises(error) as info:
            masked_lm_cross_entropy(*args, ignore_index=IGNORE, backend=backend)
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_bad_reduction(device):
    with pytest.raises(ValueError, match="reduction"):
        masked_lm_cross_entropy(*_valid(device), reduction="avg")


# ---------------------------------------------------------------------------------------------------
# GPU: triton and cuda, every dtype, BEiT-like shapes and the model's autocast setting

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_unless(backend):
    missing = _ext.missing("lm_cross_entropy_chunked", "cuda") if backend == "cuda" else None
    if missing:
        pytest.skip(f"cuda backend unavailable: {missing}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 196, 768, 8192), (3, 97, 200, 21841), (5, 50, 1024, 8000)], ids=str)
def test_gpu_matches_float64(backend, dtype, shape):
    _skip_unless(backend)
    B, N, D, V = shape
    check_against_reference(backend, make_inputs(B, N, D, V, dtype, "cuda", masked=75 / 196))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labels_2d", [True, False])
def test_gpu_reductions_and_labels(backend, reduction, labels_2d):
    _skip_unless(backend)
    inputs = make_inputs(3, 61, 192, 1000, torch.float32, "cuda", labels_2d=labels_2d, with_bias=False)
    upstream = torch.rand(int(inputs[4].sum()), device="cuda") + 0.5 if reduction == "none" else None
    check_against_reference(backend, inputs, reduction=reduction, upstream=upstream)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_empty_selection(backend):
    _skip_unless(backend)
    hidden, weight, bias, labels, mask = make_inputs(2, 9, 64, 300, torch.bfloat16, "cuda")
    mask = torch.zeros_like(mask)
    loss, acc, grads = run(backend, hidden, weight, bias, labels, mask)
    assert loss.item() == 0 and acc.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_autocast_bfloat16_like_the_model(backend):
    # The model: fp32 LayerNorm output and fp32 parameters under bf16 autocast.
    _skip_unless(backend)
    hidden, weight, bias, labels, mask = make_inputs(8, 196, 768, 8192, torch.float32, "cuda",
                                                     masked=75 / 196)
    ref_loss, ref_acc, ref_grads = run("eager", hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), labels,
                                       mask, cast=torch.float64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        same_loss, _, same_grads = run("eager", hidden, weight, bias, labels, mask)
        loss, acc, grads = run(backend, hidden, weight, bias, labels, mask)
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for ours, eager, ref in zip([loss, *grads], [same_loss, *same_grads], [ref_loss, *ref_grads]):
        err = (ours.double() - ref).abs().max().item()
        assert err <= 2 * (eager.double() - ref).abs().max().item() + 1e-2 * ref.abs().max().item()
    assert abs(acc.item() - ref_acc.item()) <= 2 / int(mask.sum())  # bf16 near-ties may flip


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_compile_fullgraph(backend):
    _skip_unless(backend)
    hidden, weight, bias, labels, mask = make_inputs(4, 196, 256, 1000, torch.bfloat16, "cuda")
    hidden = hidden.detach().requires_grad_(True)

    def loss_fn(h):
        return masked_lm_cross_entropy(h, weight, bias, labels, mask, ignore_index=IGNORE, backend=backend)

    torch._dynamo.reset()
    loss = torch.compile(loss_fn, fullgraph=True)(hidden)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref = loss_fn(hidden)
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.gpu
@pytest.mark.parametrize("bounded", [False, True], ids=["rows-unbounded", "rows-bounded"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_no_host_sync_and_invalid_labels_counted(backend, bounded):
    _skip_unless(backend)
    hidden, weight, bias, labels, mask = make_inputs(4, 196, 256, 1000, torch.bfloat16, "cuda")
    hidden = hidden.detach().requires_grad_(True)
    bound = int(mask.sum(1).max()) if bounded else None  # read before the sync check, as a trainer knows it

    def loss_of(labels):
        return masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend=backend,
                                       max_masked_per_image=bound)

    loss_of(labels).backward()  # warm up
    broken = labels.clone()
    broken[mask.nonzero()[:2].unbind(1)] = torch.tensor([1000, -7], device="cuda")
    cross_entropy_ops.reset_invalid_label_count()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_of(broken)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert cross_entropy_ops.invalid_label_count("cuda").item() == 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_gradients_are_bitwise_reproducible(backend):
    _skip_unless(backend)
    inputs = make_inputs(16, 196, 768, 8192, torch.bfloat16, "cuda", masked=75 / 196)
    first, second = (run(backend, *inputs) for _ in range(2))
    for a, b in zip([first[0], *first[2]], [second[0], *second[2]]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_extra_memory_under_a_tenth_of_the_logits(backend, monkeypatch):
    # The model's case at BEiT-B shapes: fp32 hidden and weight under bf16 autocast, 75 of 196 masked,
    # with a triton logits budget that needs several chunks (the cuda backend has its own plan).
    _skip_unless(backend)
    chunks_of(128 * 75 // 20, 8192, torch.float32, monkeypatch)
    B, N, D, V, masked = 128, 196, 768, 8192, 75
    hidden = torch.randn(B, N, D, device="cuda", requires_grad=True)
    weight = (torch.randn(V, D, device="cuda") * D ** -0.5).requires_grad_()
    bias = torch.zeros(V, device="cuda", requires_grad=True)
    mask = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    mask[:, torch.randperm(N)[:masked]] = True
    labels = torch.randint(0, V, (B, N), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend=backend).backward()

    step()  # autotuning and the invalid-label counter, outside the measurement
    for t in (hidden, weight, bias):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    grad_bytes = sum(t.grad.nbytes for t in (hidden, weight, bias))
    extra = torch.cuda.max_memory_allocated() - before - grad_bytes
    logits_bytes = B * masked * V * (2 + 4)  # eager: bf16 logits and their float32 copy
    assert extra < logits_bytes / 10, (extra / logits_bytes, extra)


# ---------------------------------------------------------------------------------------------------
# launches and host reads of a pre-training step, on CPU: Triton's launchers intercepted as in
# benchmarks/compile_gate.py (nothing runs, so BEiT-B shapes cost nothing), torch ops seen by a mode


class Launches:
    """Counts Triton launches per kernel name (``module.kernel``) while active; no kernel runs."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def _count(self, fn):
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"
        self.counts[name] = self.counts.get(name, 0) + 1

    def of(self, module: str) -> int:
        return sum(n for name, n in self.counts.items() if name.startswith(module + "."))

    @contextlib.contextmanager
    def active(self):
        from unittest import mock

        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        # A kernel is a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction.
        with mock.patch.object(JITFunction, "run", lambda fn, *a, **k: self._count(fn)), \
                mock.patch.object(InterpretedFunction, "run", lambda fn, *a, **k: self._count(fn)), \
                mock.patch.object(Autotuner, "run", lambda tuner, *a, **k: self._count(tuner.fn)):
            yield self


# The loss's budget per pre-training step (forward and backward), DESIGN "Kernel goals".
LOSS_LAUNCH_BUDGET = 8


def test_loss_launches_per_step_at_beit_b():
    # The trainer's case: fp32 final-norm output and lm_head under 16-bit autocast (bf16 on a GPU, fp16
    # here: the same plan), rows bounded by the masking's 75 patches: one chunk, five launches.
    B, N, D, V, masked = 128, 196, 768, 8192, 75
    hidden = torch.empty(B, N, D, requires_grad=True)
    weight, bias = torch.empty(V, D, requires_grad=True), torch.empty(V, requires_grad=True)
    labels = torch.randint(0, V, (B, N))
    mask = bounded_mask(B, N, masked, "cpu")
    with Launches().active() as launches, torch.autocast("cpu", dtype=torch.float16):
        masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton",
                                max_masked_per_image=masked).backward()
    assert launches.of("cross_entropy") <= LOSS_LAUNCH_BUDGET, launches.counts
    assert set(launches.counts.values()) == {1}, launches.counts  # one chunk: each kernel once
    # Without the bound, B * N rows: three chunks, most of them past the count.
    with Launches().active() as launches, torch.autocast("cpu", dtype=torch.float16):
        masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton").backward()
    assert launches.of("cross_entropy") == 15, launches.counts


def _tiny_mim_model(**overrides):
    from beitfast.config import BEiTConfig
    from beitfast.model import BEiT

    return BEiT(BEiTConfig.tiny(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2, vocab_size=16,
                                **overrides))


def test_model_passes_the_masking_bound_to_the_loss(monkeypatch):
    # The model's pre-training forward and backward with the trainer's arguments: the loss plans
    # B * max_masked_per_image rows and stays within its launch budget.
    model = _tiny_mim_model(kernels="triton")
    B, most = 3, 5
    planned = []
    plan_rows = cross_entropy_ops.plan_rows
    monkeypatch.setattr(cross_entropy_ops, "plan_rows",
                        lambda *a: planned.append(plan_rows(*a)) or planned[-1])
    images, mask = torch.randn(B, 3, 16, 16), bounded_mask(B, 16, most, "cpu")
    tokens = torch.randint(0, 16, (B, 16))
    with Launches().active() as launches:
        loss = model(images, bool_masked_pos=mask, labels=tokens, max_masked_per_image=most)
        loss.backward()
    assert [p.row_labels.shape[0] for p in planned] == [B * most]
    assert 0 < launches.of("cross_entropy") <= LOSS_LAUNCH_BUDGET, launches.counts


def test_host_reads_sees_a_boolean_index():
    x, mask = torch.randn(4, 3), torch.tensor([True, False, True, True])
    with HostReads() as mode:
        x[mask]
        x.sum().item()
        x[:2] * 2
    assert len(mode.reads) == 2, mode.reads


@pytest.mark.parametrize("case", ["mean", "sum", "no-grad", "none-1d-labels", "unbounded"])
def test_loss_reads_nothing_on_the_host(case, monkeypatch):
    # What a GPU run does: values are not inspected (no BEITFAST_CHECKS), kernels launch asynchronously.
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    hidden, weight, bias, labels, mask = make_inputs(3, 20, 16, 50, torch.float32, "cpu")
    mask = bounded_mask(3, 20, 7, "cpu")
    bound = None if case == "unbounded" else 7
    reduction = {"sum": "sum", "none-1d-labels": "none"}.get(case, "mean")
    if case == "none-1d-labels":
        labels = labels[mask]
    hidden.requires_grad_(case != "no-grad")
    with Launches().active(), HostReads() as mode:
        loss, accuracy = masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="triton",
                                                 reduction=reduction, max_masked_per_image=bound,
                                                 return_accuracy=True)
        if hidden.requires_grad:
            loss.sum().backward()
    assert mode.reads == [], mode.reads


def test_model_pretraining_step_reads_nothing_on_the_host(monkeypatch):
    # The model's forward and backward with the trainer's arguments, every op on its Triton backend.
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    model = _tiny_mim_model(kernels="triton")
    images, mask = torch.randn(3, 3, 16, 16), bounded_mask(3, 16, 5, "cpu")
    tokens = torch.randint(0, 16, (3, 16))
    with Launches().active(), HostReads() as mode:
        loss, accuracy = model(images, bool_masked_pos=mask, labels=tokens, return_accuracy=True,
                               max_masked_per_image=5)
        loss.backward()
    assert mode.reads == [], mode.reads


def test_model_padded_masked_logits_equal_the_masked_rows():
    # labels=None with a bound: each image's masked positions in order, then NaN padding; the same values
    # as the [num_masked, V] logits of the syncing path (float64: the GEMM's shapes differ, so 1e-12).
    torch.manual_seed(0)
    model = _tiny_mim_model().double().eval()
    images, mask = torch.randn(4, 3, 16, 16, dtype=torch.float64), bounded_mask(4, 16, 6, "cpu")
    mask[1] = False  # an image with nothing masked
    with torch.no_grad():
        rows = model(images, bool_masked_pos=mask)
        for bound in (6, 9, 40):
            padded = model(images, bool_masked_pos=mask, max_masked_per_image=bound)
            K = min(bound, 16)
            assert padded.shape == (4, K, 16)
            valid = torch.arange(K) < mask.sum(1, keepdim=True)
            torch.testing.assert_close(padded[valid], rows, rtol=1e-12, atol=1e-12)
            assert padded[~valid].isnan().all()
    with pytest.raises(ValueError, match="max_masked_per_image=5, but bool_masked_pos masks 6"):
        model(images, bool_masked_pos=mask, max_masked_per_image=5)
    with pytest.raises(ValueError, match="max_masked_per_image must be an int"):
        model(images, bool_masked_pos=mask, max_masked_per_image=2.5)


def test_model_padded_masked_logits_poison_an_image_over_the_bound(monkeypatch):
    # Where the mask cannot be read (a GPU without BEITFAST_CHECKS), an image over the bound is all NaN.
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    model = _tiny_mim_model().eval()
    images, mask = torch.randn(3, 3, 16, 16), bounded_mask(3, 16, 4, "cpu")
    mask[0, :7] = True
    with torch.no_grad():
        padded = model(images, bool_masked_pos=mask, max_masked_per_image=4)
    assert padded[0].isnan().all() and not padded[1].isnan().any()


def test_model_masked_logits_with_a_bound_read_nothing_on_the_host(monkeypatch):
    monkeypatch.setattr(dispatch, "may_inspect_values", lambda t: False)
    model = _tiny_mim_model(kernels="triton")
    images, mask = torch.randn(3, 3, 16, 16), bounded_mask(3, 16, 5, "cpu")
    with Launches().active(), HostReads() as mode:
        logits = model(images, bool_masked_pos=mask, max_masked_per_image=5)
        logits.nan_to_num().sum().backward()
    assert mode.reads == [], mode.reads
    with HostReads() as mode:
        model(images, bool_masked_pos=mask)
    assert mode.reads, "the unpadded form reads the mask's count"


def test_cuda_backend_gets_the_shared_chunk_rule(cuda_backend_on_cpu, monkeypatch):
    # Both fused backends chunk by one rule, rows_per_chunk (a logits budget): the C++ op is handed it.
    B, N, D, V, most = 4, 60, 16, 200, 40
    hidden, weight, bias, labels, _ = make_inputs(B, N, D, V, torch.float32, "cpu")
    mask = bounded_mask(B, N, most, "cpu")
    for budget_rows in (10**6, 64):
        chunks_of(budget_rows, V, torch.float32, monkeypatch)
        STAND_IN_CHUNKS.clear()
        masked_lm_cross_entropy(hidden, weight, bias, labels, mask, backend="cuda", max_masked_per_image=most)
        assert STAND_IN_CHUNKS == [cross_entropy_ops.rows_per_chunk(B * most, V, 4)]
    assert STAND_IN_CHUNKS == [64]
