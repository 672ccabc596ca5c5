"""rel_pos_attention: the Triton kernels (through the interpreter on CPU) and the other backends against
the eager definition computed in float64; gradients of q, k, v and the bias table; the dense bias
gather and its fold; packed layouts; bad input."""

import pytest
import torch

from beitfast import BEiT, BEiTConfig, ops
from beitfast.model import num_relative_positions, relative_position_index
from beitfast.ops import attention as attention_op
from beitfast.ops import dispatch

HAS_GPU = torch.cuda.is_available()
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(B, H, N, D, dtype, device, index="random", num_rows=None):
    """Random q, k, v, table and index; ``index`` is "random", "beit" (N = 1 + Wh*Ww) or None."""
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    if index is None:
        return q, k, v, None, None
    if index == "beit":
        side = round((N - 1) ** 0.5)
        grid = (side, (N - 1) // side)
        assert 1 + grid[0] * grid[1] == N
        rel_index = relative_position_index(grid).to(device)
        num_rows = num_relative_positions(grid)
    else:
        num_rows = num_rows or 2 * N + 3
        rel_index = torch.randint(0, num_rows, (N, N), device=device)
    table = (torch.randn(num_rows, H, device=device) * 2).requires_grad_()
    return q, k, v, table, rel_index


def run(backend, q, k, v, table, rel_index, scale=None, grad_out=None):
    """Output and the gradients of every differentiable input (None where there is no table)."""
    inputs = [t for t in (q, k, v, table) if t is not None]
    out = ops.rel_pos_attention(q, k, v, table, rel_index, scale, backend=backend)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return [out, *grads]


def as_reference(tensors, dtype):
    """Detached copies in ``dtype`` (None: their own), differentiable like the originals."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
            for t in tensors]


def assert_close_to_reference(backend, q, k, v, table, rel_index, scale=None, grad_out=None):
    """Flash-attention's criterion: the backend's error against the float64 eager result is at most
    twice that of the eager computation in the inputs' precision, plus a small per-dtype term."""
    grad_out = torch.randn_like(q) if grad_out is None else grad_out
    got = run(backend, q, k, v, table, rel_index, scale, grad_out)
    ref64 = run("eager", *as_reference([q, k, v, table], torch.float64), rel_index, scale, grad_out.double())
    # The inputs' precision: q, k, v as they are, the table in its own dtype.
    same_precision = run("eager", *as_reference([q, k, v], q.dtype), *as_reference([table], None), rel_index,
                         scale, grad_out)
    assert_errors_within(["out", "dq", "dk", "dv", "dtable"], got, ref64, same_precision, q.dtype)


def assert_errors_within(names, got, ref64, same_precision, dtype):
    for name, x, ref, eager in zip(names, got, ref64, same_precision):
        assert x.shape == ref.shape and x.dtype == eager.dtype, name
        assert torch.isfinite(x).all(), name
        err = (x.double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        allowed = 2 * eager_err + TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
        assert err <= allowed, f"{name}: error {err:.3g} > {allowed:.3g} (eager's error {eager_err:.3g})"


# ---------------------------------------------------------------------------------------------------
# triton through the interpreter (or on the GPU when there is one)

CASES = [
    # B, H, N, D, dtype, index
    (1, 1, 7, 32, torch.float32, "random"),
    (2, 3, 17, 64, torch.float16, "random"),
    (1, 3, 50, 80, torch.float32, "beit"),
    (3, 2, 50, 64, torch.float16, "beit"),
    (2, 1, 17, 128, torch.float16, "beit"),
    (2, 2, 50, 64, torch.float32, None),
    (1, 3, 7, 80, torch.float16, None),
    (1, 1, 197, 64, torch.float32, "beit"),
    (2, 1, 197, 32, torch.float16, "beit"),
]


@pytest.mark.parametrize("B,H,N,D,dtype,index", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_triton_matches_reference(device, B, H, N, D, dtype, index):
    assert_close_to_reference("triton", *make_inputs(B, H, N, D, dtype, device, index))


def test_triton_groups_of_images_sum_the_table_gradient(device, monkeypatch):
    """A batch split into groups for the bias gradient (the last group short): each program sums its
    group's images, the launcher adds the groups."""
    from beitfast.kernels import attention as kernels

    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    assert kernels.bias_groups(5, 2, 17, 1, kernels.bias_tile(torch.device(device))) == 2  # 3 + 2 images
    assert_close_to_reference("triton", *make_inputs(5, 2, 17, 32, torch.float32, device, "beit"))


def tile_cases():
    from beitfast.kernels import attention as kernels

    for kernel, tiles in (("_fwd_kernel", kernels._union(kernels._FWD_TILES)),
                          ("_bwd_kv_kernel", kernels._union(kernels._KV_TILES)),
                          ("_bwd_q_kernel", kernels._union(kernels._Q_TILES))):
        for tile in tiles:
            yield pytest.param(kernel, tile, id=f"{kernel}-{'x'.join(map(str, tile))}")


def test_autotuning_keys_on_the_number_of_images_and_heads():
    # A batch of one (inference: 12 programs per query block at BEiT-B) and a training batch (1536) keep
    # their own autotuned tiles: B * H, bucketed, is part of each tiled kernel's key.
    from beitfast.kernels import attention as kernels

    for name in ("_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"):
        assert "batch_heads" in getattr(kernels, name).keys, name
    assert [kernels._batch_heads(B, 12) for B in (1, 8, 128, 1024)] == [16, 128, 2048, 4096]


@pytest.mark.parametrize("kernel,tile", list(tile_cases()))
def test_triton_every_gpu_tile_config(device, monkeypatch, kernel, tile):
    """The tile shapes autotuning may pick on a GPU (the interpreter otherwise runs one config), each
    at N = 37 (full tiles and a tail in both directions) and at N = 16 (no tail)."""
    import triton

    from beitfast.kernels import attention as kernels

    tuner = getattr(kernels, kernel)
    m, n, warps, stages = tile
    config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
    monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(tuner, "cache", {})
    for N in (37, 16):
        assert_close_to_reference("triton", *make_inputs(2, 1, N, 32, torch.float32, device, "random"))


@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 16)], ids=lambda t: "x".join(map(str, t)))
def test_triton_bias_gradient_tile_and_tails(device, monkeypatch, tile):
    """The bias gradient's fixed tile, square and rectangular either way (the GPUs' are 128 x 64 and 64 x
    64), at 16 and 32: full tiles, tails, zero padding beside the last ones, at N = 197 (12 full tiles
    and a 16-row tail of 16, 6 and a tail of 16 of 32) and N = 48."""
    from beitfast.kernels import attention as kernels

    monkeypatch.setattr(kernels, "_BIAS_TILE", (*tile, 4))
    for N in (197, 48):
        q, k, v, table, rel_index = make_inputs(1, 1, N, 16, torch.float32, device, "random")
        assert_close_to_reference("triton", q, k, v, table, rel_index)


def test_triton_launches_the_planned_grids(device, monkeypatch):
    """The launchers start the kernels and grids ``launch_plan`` lists (the work model reads it)."""
    import triton

    from beitfast.kernels import attention as kernels

    for name in ("_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"):  # one 32 x 32 config, GPU or not
        tuner = getattr(kernels, name)
        monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)])
        monkeypatch.setattr(tuner, "cache", {})

    names = {"_fwd_kernel": "fwd", "_bwd_kv_kernel": "kv", "_bwd_q_kernel": "q",
             "_bwd_bias_kernel": "bias"}
    launched = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            meta = {"BLOCK_M": 32, "BLOCK_N": 32}
            launched.append((names[self.name], grid(meta) if callable(grid) else grid))
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(kernels, name, Recorder(name, getattr(kernels, name)))
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    B, H, N = 5, 2, 45
    inputs = make_inputs(B, H, N, 32, torch.float32, device, "random")
    run("triton", *inputs, None, torch.randn_like(inputs[0]))
    tiles = {**{k: (32, 32) for k in ("fwd", "kv", "q")}, "bias": kernels.bias_tile(torch.device(device))}
    assert launched == kernels.launch_plan(B, H, N, tiles, sms=1)


@pytest.mark.slow
@pytest.mark.parametrize("N", [577, 1025, 1601])
def test_triton_long_sequences(device, monkeypatch, N):
    """Fine-tuning lengths (384, 512 and 640 px): BEiT's index, 64-wide tiles in every kernel (the GPU's)."""
    import triton

    from beitfast.kernels import attention as kernels

    for name in ("_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"):
        tuner = getattr(kernels, name)
        monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)])
        monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(kernels, "_BIAS_TILE", (64, 64, 4))
    assert_close_to_reference("triton", *make_inputs(1, 1, N, 16, torch.float32, device, "beit"))


@pytest.mark.parametrize("backend", ["blas", "sdpa"])
@pytest.mark.parametrize("N", [577, 1025, 1601])
def test_cpu_backends_at_segmentation_lengths(backend, N):
    """384, 512 and 640 px (tables of 47x47, 63x63, 79x79 offsets): forward and every gradient against
    float64 (eager is the reference itself; Triton at these lengths is the test above)."""
    assert_close_to_reference(backend, *make_inputs(1, 2, N, 16, torch.float32, torch.device("cpu"), "beit"))


def test_triton_custom_scale_and_sparse_table(device):
    """A non-default scale; a table with rows no index uses (their gradient must be exactly 0)."""
    q, k, v, table, rel_index = make_inputs(2, 2, 17, 32, torch.float32, device)
    table = (torch.randn(40, 2, device=device)).requires_grad_()
    rel_index = torch.randint(0, 20, (17, 17), device=device)
    assert_close_to_reference("triton", q, k, v, table, rel_index, scale=0.37)
    grad_table = run("triton", q, k, v, table, rel_index, 0.37, torch.randn_like(q))[-1]
    unused = torch.ones(40, dtype=torch.bool, device=device)
    unused[rel_index.flatten()] = False
    assert torch.equal(grad_table[unused], torch.zeros_like(grad_table[unused]))


def test_triton_strided_inputs(device):
    """q, k, v as the model's views of one qkv tensor, a transposed table, int32 index, and a
    non-contiguous output gradient: everything is read through its strides."""
    B, N, H, D = 2, 17, 3, 32
    qkv = torch.randn(B, N, 3 * H * D, device=device, requires_grad=True)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    table = torch.randn(H, 25, device=device).t().requires_grad_()  # transposed storage
    rel_index = torch.randint(0, 25, (N, N), device=device, dtype=torch.int32)
    grad_out = torch.randn(B, N, H, D, device=device).transpose(1, 2)
    out = ops.rel_pos_attention(q, k, v, table, rel_index, backend="triton")
    got = torch.autograd.grad(out, (qkv, table), grad_out)
    ref_qkv, ref_table = qkv.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    rq, rk, rv = ref_qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    ref_out = ops.rel_pos_attention(rq, rk, rv, ref_table, rel_index.long(), backend="eager")
    ref = torch.autograd.grad(ref_out, (ref_qkv, ref_table), grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    for x, r in zip(got, ref):
        torch.testing.assert_close(x.double(), r, atol=1e-4, rtol=1e-5)
    # The output is stored [B, N, H, D]: the model's transpose and reshape are views.
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_packed_layouts(device, dtype):
    """Packed qkv in (a strided slice of a wider buffer), [B, N, H, D] out, and the qkv gradient
    written packed: the same numbers as the eager definition on the unpacked views."""
    B, N, H, D = 2, 50, 2, 32
    wide = torch.randn(B, N, 3, H, D + 8, device=device, dtype=dtype)
    qkv = wide[..., :D].detach().requires_grad_()  # a leaf, still strided
    qkv_strided = wide[..., :D]
    table = torch.randn(2 * N + 3, H, device=device, requires_grad=True)
    rel_index = torch.randint(0, 2 * N + 3, (N, N), device=device)
    grad_out = torch.randn(B, N, H, D, device=device, dtype=dtype)

    out = ops.rel_pos_attention_packed(qkv_strided, table, rel_index, backend="triton")
    assert out.shape == (B, N, H, D) and out.is_contiguous()

    def grads(backend, qkv, table):
        out = ops.rel_pos_attention_packed(qkv, table, rel_index, backend=backend)
        return [out, *torch.autograd.grad(out, (qkv, table), grad_out.to(qkv.dtype))]

    got = grads("triton", qkv, table)
    assert got[1].is_contiguous()  # the packed gradient buffer itself, not a stack of three
    ref64 = grads("eager", *as_reference([qkv, table], torch.float64))
    same_precision = grads("eager", *as_reference([qkv], dtype), *as_reference([table], None))
    assert_errors_within(["out", "dqkv", "dtable"], got, ref64, same_precision, dtype)


def test_triton_takes_a_dense_bias(device):
    """``bias=`` as an unpadded [H, N, N] tensor (gradient included) and as the padded tensor
    relative_position_bias returns."""
    q, k, v, table, rel_index = make_inputs(2, 2, 17, 32, torch.float32, device, "beit")
    grad_out = torch.randn_like(q)
    dense = table.detach()[rel_index].permute(2, 0, 1).contiguous().requires_grad_()

    def grads(backend, q, k, v, bias):
        out = ops.rel_pos_attention(q, k, v, bias=bias, backend=backend)
        return [out, *torch.autograd.grad(out, (q, k, v, bias), grad_out.to(q.dtype))]

    got = grads("triton", q, k, v, dense)
    ref64 = grads("eager", *as_reference([q, k, v, dense], torch.float64))
    same_precision = grads("eager", *as_reference([q, k, v, dense], torch.float32))
    assert_errors_within(["out", "dq", "dk", "dv", "dbias"], got, ref64, same_precision, torch.float32)
    padded = ops.relative_position_bias(table, rel_index)
    assert padded.shape == (2, 128, 128)
    torch.testing.assert_close(ops.rel_pos_attention(q, k, v, bias=padded, backend="triton"), got[0])


def test_triton_repeats_bit_for_bit(device, monkeypatch):
    """No atomics: two backward passes give identical gradients (the bias gradient summed in groups)."""
    from beitfast.kernels import attention as kernels

    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    inputs = make_inputs(3, 2, 37, 32, torch.float32, device, "beit")
    grad_out = torch.randn_like(inputs[0])
    first = run("triton", *inputs, None, grad_out)
    second = run("triton", *inputs, None, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def poison(monkeypatch):
    from beitfast.kernels import attention as kernels

    def poisoned(like, shape, dtype=None):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype or like.dtype)

    monkeypatch.setattr(kernels, "_new_buffer", poisoned)


def test_triton_writes_every_output(device, monkeypatch):
    """Buffers are poisoned with NaN before the kernels run: any entry they skip shows up."""
    poison(monkeypatch)
    # 33 rows and 30 table rows, 10 of them unused: tails in every block and empty segments.
    q, k, v, _, _ = make_inputs(2, 3, 33, 40, torch.float32, device)
    table = torch.randn(30, 3, device=device, requires_grad=True)
    rel_index = torch.randint(0, 20, (33, 33), device=device)
    assert_close_to_reference("triton", q, k, v, table, rel_index)
    assert_close_to_reference("triton", q, k, v, None, None)


def test_triton_padded_bias_gradient_is_zero_outside(device, monkeypatch):
    """Given the padded dense bias, its gradient (poisoned buffers, two groups of images) is the
    score gradient in the [N, N] corner and exactly zero in the padding."""
    from beitfast.kernels import attention as kernels

    poison(monkeypatch)
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    q, k, v, table, rel_index = make_inputs(4, 2, 33, 32, torch.float16, device, "random")
    bias = ops.relative_position_bias(table, rel_index).detach().requires_grad_()
    grad_out = torch.randn_like(q)
    out = ops.rel_pos_attention(q, k, v, bias=bias, backend="triton")
    (grad,) = torch.autograd.grad(out, bias, grad_out)
    N = q.shape[2]
    assert grad.shape == bias.shape and grad.dtype == torch.float32
    assert torch.equal(grad[:, N:], torch.zeros_like(grad[:, N:]))
    assert torch.equal(grad[:, :, N:], torch.zeros_like(grad[:, :, N:]))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref_out = ops.rel_pos_attention(*ref[:3], bias=ref[3], backend="eager")
    (ref_grad,) = torch.autograd.grad(ref_out, ref[3], grad_out.double())
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-2, rtol=1e-2)


def test_triton_fully_masked_rows_give_zeros(device):
    """A user bias of -inf: a fully masked query row gives a zero output and no gradient (not NaN);
    a row whose first key block is masked, and single masked scores, are exact softmaxes."""
    B, H, N, D = 2, 2, 45, 32
    q, k, v, _, _ = make_inputs(B, H, N, D, torch.float32, device, None)
    bias = torch.randn(H, N, N, device=device)
    bias[0, 3] = float("-inf")  # a fully masked row in head 0
    bias[1, 5, :40] = float("-inf")  # the first key blocks of a row masked, the last ones not
    bias[:, 7, 11] = float("-inf")
    bias.requires_grad_()
    grad_out = torch.randn_like(q)
    got = grads_of("triton", q, k, v, bias, grad_out)
    assert all(torch.isfinite(x).all() for x in got)
    assert not got[0][:, 0, 3].any() and not got[1][:, 0, 3].any()
    # The reference: the masked row's bias finite and its output gradient zero (so it adds nothing).
    ref_bias = bias.detach().double().clone()
    ref_bias[0, 3] = 0.0
    ref_grad_out = grad_out.double().clone()
    ref_grad_out[:, 0, 3] = 0.0
    ref_inputs = (t.detach().double().requires_grad_() for t in (q, k, v, ref_bias))
    ref = grads_of("eager", *ref_inputs, ref_grad_out)
    ref[0][:, 0, 3] = 0.0
    ref[4] = torch.where(torch.isinf(bias.detach()), 0.0, ref[4])
    for name, x, r in zip(["out", "dq", "dk", "dv", "dbias"], got, ref):
        torch.testing.assert_close(x.double(), r, atol=1e-4, rtol=1e-4, msg=name)


def grads_of(backend, q, k, v, bias, grad_out):
    """Output and the gradients of q, k, v and a dense bias."""
    out = ops.rel_pos_attention(q, k, v, bias=bias, backend=backend)
    return [out, *torch.autograd.grad(out, (q, k, v, bias), grad_out.to(q.dtype))]


def test_triton_under_autocast(device):
    """Under autocast q, k, v are computed in the autocast dtype; the fp32 table keeps its dtype."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    q, k, v, table, rel_index = make_inputs(1, 2, 17, 32, torch.float32, device, "beit")
    with torch.autocast(device.type, dtype=dtype):
        out = ops.rel_pos_attention(q, k, v, table, rel_index, backend="triton")
    assert out.dtype == dtype
    grad_table, = torch.autograd.grad(out.float().sum(), table)
    assert grad_table.dtype == torch.float32
    cast = [t.detach().to(dtype).double() for t in (q, k, v)]
    ref = ops.rel_pos_attention(*cast, table.detach().double(), rel_index, backend="eager")
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_custom_ops_pass_opcheck(device):
    from beitfast.kernels import attention as kernels

    q, k, v, table, rel_index = (None if t is None else t.detach()
                                 for t in make_inputs(2, 2, 7, 32, torch.float32, device))
    bias = ops.relative_position_bias(table, rel_index)
    qkv = torch.stack([q, k, v], dim=2).transpose(1, 3)  # [B, N, 3, H, D], strided
    torch.library.opcheck(attention_op.gather_bias, (table.requires_grad_(), rel_index))
    torch.library.opcheck(attention_op.fold_bias_grad, (torch.randn_like(bias), rel_index, table.shape[0]))
    for b in (bias, None):
        torch.library.opcheck(kernels.attention_fwd, (q, k, v, b, 0.2))
        torch.library.opcheck(kernels.attention_packed_fwd, (qkv, b, 0.2))
        out, lse, read = kernels.attention_fwd(q, k, v, b, 0.2)
        assert read.numel() == 0  # fp32 q with an fp32 bias: nothing cast
        torch.library.opcheck(kernels.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, b, 0.2))
    # 16-bit q, k, v with the fp32 bias: the op returns the copy it read, for the backward.
    half = tuple(t.half() for t in (q, k, v))
    torch.library.opcheck(kernels.attention_fwd, (*half, bias, 0.2))
    torch.library.opcheck(kernels.attention_packed_fwd, (qkv.half(), bias, 0.2))
    out, lse, read = kernels.attention_fwd(*half, bias, 0.2)
    assert read.dtype == torch.float16 and torch.equal(read, bias.half())


def test_backward_reads_the_forwards_cast_bias(device, monkeypatch):
    # One cast of the fp32 bias per layer: the forward's fp16 copy is what the backward reads (and what
    # autograd keeps), and the gradient is still the fp32 sum.
    from beitfast.kernels import attention as kernels

    given = []
    bias_args = kernels._bias_args
    monkeypatch.setattr(kernels, "_bias_args",
                        lambda b, dtype, *rest: (given.append(b.dtype), bias_args(b, dtype, *rest))[1])
    q, k, v, table, rel_index = make_inputs(2, 2, 7, 32, torch.float16, device)
    bias = ops.relative_position_bias(table.float(), rel_index).detach().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = kernels.attention(q, k, v, bias, 0.2)
    assert given == [torch.float32]  # cast in the forward
    assert not any(t is bias for t in saved) and any(t.dtype == torch.float16 and t.dim() == 3 for t in saved)
    out.float().square().sum().backward()
    assert given == [torch.float32, torch.float16]  # the backward got the forward's copy: no cast
    assert bias.grad.dtype == torch.float32
    ref_bias = bias.detach().double().requires_grad_()
    ref = ops.rel_pos_attention(*(t.detach().double() for t in (q, k, v)), bias=ref_bias, scale=0.2,
                                backend="eager")
    ref.square().sum().backward()
    torch.testing.assert_close(bias.grad.double(), ref_bias.grad, atol=5e-3, rtol=5e-3)


def _heads_first(qkv):
    """q, k, v as ``[B, H, N, D]`` views of a packed ``[B, N, 3, H, D]`` qkv."""
    return (t.transpose(1, 2) for t in qkv.unbind(2))


@pytest.mark.parametrize("packed", [False, True])
def test_a_layers_own_table_is_gathered_straight_into_the_compute_dtype(device, monkeypatch, packed):
    # The triton backend given a table (a layer with its own, as in fine-tuning): the launcher gathers
    # it into an fp16 [H, P, P] (no fp32 dense bias, no cast), autograd keeps that copy and the index,
    # and the table's gradient is the fp32 fold of the score gradient.
    from beitfast.kernels import attention as kernels

    dense_gathers = []
    gather = attention_op.gather_bias
    monkeypatch.setattr(attention_op, "gather_bias", lambda *a: dense_gathers.append(1) or gather(*a))
    read = []
    bias_args = kernels._bias_args
    monkeypatch.setattr(kernels, "_bias_args",
                        lambda b, dtype, *rest: (lambda r: read.append(r[0]) or r)(bias_args(b, dtype, *rest)))
    B, H, N, D = 2, 3, 50, 32
    q, k, v, table, rel_index = make_inputs(B, H, N, D, torch.float16, device)
    table = table.float().requires_grad_()
    qkv = torch.stack([q, k, v], 2).permute(0, 3, 2, 1, 4).detach().requires_grad_()  # [B, N, 3, H, D]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if packed:
            out = ops.rel_pos_attention_packed(qkv, table, rel_index, scale=0.2, backend="triton").transpose(1, 2)
        else:
            out = ops.rel_pos_attention(*_heads_first(qkv), table, rel_index, scale=0.2, backend="triton")
    assert dense_gathers == []
    assert [(t.dtype, tuple(t.shape)) for t in read] == [(torch.float16, (H, 128, 128))]
    assert not any(t.dtype == torch.float32 and tuple(t.shape) == (H, 128, 128) for t in saved)
    assert any(t.dtype == torch.float16 and tuple(t.shape) == (H, 128, 128) for t in saved)
    grad_out = torch.randn_like(out, dtype=torch.float32)
    (out.float() * grad_out).sum().backward()
    assert table.grad.dtype == torch.float32
    assert len(read) == 2 and read[1].data_ptr() == read[0].data_ptr()  # the backward read the forward's copy
    ref_table = table.detach().double().requires_grad_()
    ref_qkv = qkv.detach().double().requires_grad_()
    ref = ops.rel_pos_attention(*_heads_first(ref_qkv), ref_table, rel_index, scale=0.2, backend="eager")
    (ref * grad_out.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(qkv.grad.double(), ref_qkv.grad, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(table.grad.double(), ref_table.grad, atol=1e-2, rtol=5e-3)


def test_triton_compiles_without_graph_breaks_with_real_strides(device):
    """fullgraph compile of the unpacked and packed ops: same values, gradients and output strides
    as eager (the fake kernels promise the real layouts)."""
    q, k, v, table, rel_index = make_inputs(1, 2, 7, 32, torch.float32, device)
    qkv = torch.randn(1, 7, 3, 2, 32, device=device, requires_grad=True)

    def fn(q, k, v, table):
        return ops.rel_pos_attention(q, k, v, table, rel_index, backend="triton")

    def packed(qkv, table):
        return ops.rel_pos_attention_packed(qkv, table, rel_index, backend="triton")

    for f, args in ((fn, (q, k, v, table)), (packed, (qkv, table))):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        got_out, out = compiled(*args), f(*args)
        assert got_out.stride() == out.stride()
        got = torch.autograd.grad(got_out.sum(), args)
        ref = torch.autograd.grad(out.sum(), args)
        for x, r in zip(got, ref):
            assert x.stride() == r.stride()
            torch.testing.assert_close(x, r)
    # The autocast cast in front of the custom op traces too.
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cuda" else torch.float16):
        assert compiled(q, k, v, table).dtype != torch.float32


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared"])
def test_model_with_triton_attention_matches_eager(device, monkeypatch, shared):
    """A small BEiT whose attention runs on the Triton kernels: same hidden states and table
    gradients as with the eager attention, for per-layer tables and a shared one (gathered once,
    all layers' gradients folded together)."""
    config = BEiTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, vocab_size=0,
                        use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared, drop_path_rate=0.0,
                        kernels="eager")
    model = BEiT(config).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    tables = ([model.rel_pos_bias.relative_position_bias_table] if shared
              else [b.attn.relative_position_bias_table for b in model.blocks])
    images = torch.randn(2, 3, 32, 32, device=device)
    results = []
    for backend in ("eager", "triton"):
        monkeypatch.setenv("BEITFAST_BACKEND", f"attention={backend}")
        model.zero_grad()
        hidden = model.forward_features(images)
        hidden.square().mean().backward()
        results.append((hidden, [t.grad.clone() for t in tables]))
    (eager_hidden, eager_grads), (triton_hidden, triton_grads) = results
    torch.testing.assert_close(triton_hidden, eager_hidden, atol=1e-4, rtol=1e-4)
    for got, want in zip(triton_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------
# the dense bias: gather and fold


@pytest.mark.parametrize("N,dtype", [(7, torch.float32), (50, torch.float64), (197, torch.bfloat16)])
def test_relative_position_bias_gathers_and_folds(N, dtype):
    """The padded dense bias holds table[index] in its [N, N] corner and zeros elsewhere; its
    gradient is the float64 sum of the score gradient over each row's positions."""
    R, H = 2 * N + 3, 3
    table = torch.randn(R, H, dtype=dtype, requires_grad=True)
    rel_index = torch.randint(0, R - 2, (N, N))  # the last two rows unused
    bias = ops.relative_position_bias(table, rel_index)
    P = attention_op.padded_size(N)
    assert bias.shape == (H, P, P) and bias.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(bias[:, :N, :N], table.detach()[rel_index].permute(2, 0, 1).to(bias.dtype))
    assert not bias[:, N:].any() and not bias[:, :, N:].any()
    grad = torch.randn(H, P, P, dtype=bias.dtype)
    got, = torch.autograd.grad(bias, table, grad)
    want = torch.zeros(R, H, dtype=torch.float64).index_put_(
        (rel_index.flatten(),), grad[:, :N, :N].double().reshape(H, -1).t(), accumulate=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.to(dtype).double(), atol=1e-5, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2)
    assert not got[-2:].any()


def test_fold_paths_agree():
    """The CPU fold (index_add_) and the one used on GPUs (cached permutation + segmented sum) both
    equal the float64 sum, and ignore the padding."""
    N, R, H = 37, 60, 4
    P = attention_op.padded_size(N)
    rel_index = torch.randint(0, R - 5, (N, N))
    plan = attention_op._plan(rel_index, R)
    grad = torch.randn(H, P, P)
    want = torch.zeros(R, H, dtype=torch.float64).index_add_(
        0, rel_index.flatten(), grad[:, :N, :N].double().reshape(H, -1).t())
    for fold in (attention_op._fold_scatter, attention_op._fold_sorted):
        torch.testing.assert_close(fold(grad, plan, R).double(), want, atol=1e-5, rtol=1e-6)


@pytest.mark.gpu
def test_gather_and_fold_on_the_gpu_do_not_synchronise():
    """After the plan is made once, the bias gather and its fold issue no host synchronisation."""
    grid = (14, 14)
    rel_index = relative_position_index(grid).cuda()
    table = torch.randn(num_relative_positions(grid), 12, device="cuda", requires_grad=True)
    ops.relative_position_bias(table, rel_index)  # plans (and checks the index) once
    grad = torch.randn(12, attention_op.padded_size(197), attention_op.padded_size(197), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bias = attention_op.gather_bias(table, rel_index)
        (folded,) = torch.autograd.grad(bias, table, grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = attention_op._fold_scatter(grad.cpu(), attention_op._plan(rel_index.cpu(), table.shape[0]), table.shape[0])
    torch.testing.assert_close(folded.cpu(), want, atol=1e-4, rtol=1e-5)


def test_fold_plan_is_cached_per_index():
    """The permutation is computed once per index tensor; changing the index in place renews it."""
    rel_index = torch.randint(0, 20, (9, 9))
    first = attention_op._plan(rel_index, 20)
    assert attention_op._plan(rel_index, 20) is first
    rel_index[0, 0] = 19 - int(rel_index[0, 0])
    renewed = attention_op._plan(rel_index, 20)
    assert renewed is not first and int(renewed.gather[0]) == int(rel_index[0, 0])


# ---------------------------------------------------------------------------------------------------
# bad input and the dispatcher's reasons


def test_bad_shapes_name_the_argument():
    q, k, v, table, rel_index = make_inputs(1, 2, 7, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"q \(1, 2, 7, 32\), k \(1, 2, 6, 32\)"):
        ops.rel_pos_attention(q, k[:, :, :6], v, table, rel_index)
    with pytest.raises(ValueError, match=r"bias_table must be \[R, H=2\], got \(17, 3\)"):
        ops.rel_pos_attention(q, k, v, torch.randn(17, 3), rel_index)
    with pytest.raises(ValueError, match=r"rel_index must be \[N, N\] = \[7, 7\], got \(7, 6\)"):
        ops.rel_pos_attention(q, k, v, table, rel_index[:, :6])
    with pytest.raises(ValueError, match=r"rel_index values must lie in \[0, R=17\), got \[0, 17\]"):
        ops.rel_pos_attention(q, k, v, table, torch.full((7, 7), 17).index_fill_(0, torch.tensor([0]), 0))
    with pytest.raises(TypeError, match="rel_index must be int32 or int64, got torch.float32"):
        ops.rel_pos_attention(q, k, v, table, rel_index.float())
    with pytest.raises(ValueError, match="give both bias_table and rel_index"):
        ops.rel_pos_attention(q, k, v, table, None)
    with pytest.raises(ValueError, match=r"bias must be \[H=2, M, M\] with M >= N=7, got \(2, 6, 6\)"):
        ops.rel_pos_attention(q, k, v, bias=torch.randn(2, 6, 6))
    with pytest.raises(TypeError, match="bias must be floating point, got torch.int64"):
        ops.rel_pos_attention(q, k, v, bias=torch.ones(2, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="give bias, or bias_table and rel_index, not both"):
        ops.rel_pos_attention(q, k, v, table, rel_index, bias=torch.randn(2, 7, 7))
    with pytest.raises(ValueError, match=r"qkv must be a \[B, N, 3, H, D\] tensor, got \(1, 7, 2, 2, 32\)"):
        ops.rel_pos_attention_packed(torch.randn(1, 7, 2, 2, 32))
    with pytest.raises(TypeError, match="scale must be a number or None, got str"):
        ops.rel_pos_attention(q, k, v, scale="0.3")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.1, 0.0])
@pytest.mark.parametrize("packed", [False, True])
def test_scale_must_be_finite_and_positive(scale, packed):
    """A NaN, infinite, zero or negative scale is refused by name on every backend (it gave NaN on
    some and finite garbage on blas)."""
    q, k, v, table, rel_index = make_inputs(1, 2, 7, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got"):
        if packed:
            qkv = torch.stack([q, k, v], 2).transpose(1, 3)
            ops.rel_pos_attention_packed(qkv, table, rel_index, scale=scale)
        else:
            ops.rel_pos_attention(q, k, v, table, rel_index, scale=scale)


def test_triton_refusals_are_explained(monkeypatch):
    q, k, v, table, rel_index = make_inputs(1, 2, 7, 20, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiples of 8 from 16 to 128, got 20"):
        ops.rel_pos_attention(q, k, v, table, rel_index, backend="triton")
    wide = torch.randn(1, 2, 7, 256)
    reasons = ops.explain("attention", q=wide, k=wide, v=wide, bias_table=None, rel_index=None, scale=0.1)
    assert any("got 256" in r for r in reasons["triton"])
    assert reasons["eager"] == []
    double = torch.randn(1, 2, 7, 32, dtype=torch.float64)
    reasons = ops.explain("attention", q=double, k=double, v=double, bias_table=None, rel_index=None,
                          scale=0.1)
    assert any("got torch.float64" in r for r in reasons["triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = ops.explain("attention", q=q, k=k, v=v, bias_table=table, rel_index=rel_index, scale=0.1)
    assert any("needs CUDA tensors" in r for r in reasons["triton"])


@pytest.mark.skipif(HAS_GPU, reason="the interpreter's bfloat16 refusal only applies on CPU")
def test_triton_refuses_bfloat16_in_interpreter():
    x = torch.randn(1, 2, 7, 32, dtype=torch.bfloat16)
    reasons = ops.explain("attention", q=x, k=x, v=x, bias_table=None, rel_index=None, scale=0.1)
    assert any("bfloat16" in r for r in reasons["triton"])
    # float32 inputs that bfloat16 autocast would cast before the kernels run
    x = x.float()
    assert not any("bfloat16" in r for r in ops.explain("attention", q=x, k=x, v=x, bias_table=None,
                                                         rel_index=None, scale=0.1)["triton"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reasons = ops.explain("attention", q=x, k=x, v=x, bias_table=None, rel_index=None, scale=0.1)
    assert any("bfloat16" in r for r in reasons["triton"])


# ---------------------------------------------------------------------------------------------------
# the other backends


@pytest.mark.parametrize("index", ["beit", None])
def test_sdpa_matches_reference(device, index):
    assert_close_to_reference("sdpa", *make_inputs(2, 3, 17, 32, torch.float32, device, index))


@pytest.mark.parametrize("B,H,N,D,index", [(2, 3, 17, 32, "beit"), (3, 2, 50, 64, "random"), (1, 2, 7, 80, None),
                                             (2, 1, 197, 64, "beit")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blas_matches_reference(B, H, N, D, index, dtype):
    q, k, v, table, rel_index = make_inputs(B, H, N, D, torch.float32, "cpu", index)
    q, k, v = as_reference([q, k, v], dtype)
    if dtype == torch.float64 and table is not None:
        (table,) = as_reference([table], dtype)
    grad_out = torch.randn_like(q)
    got = run("blas", q, k, v, table, rel_index, 0.3, grad_out)
    ref64 = run("eager", *as_reference([q, k, v, table], torch.float64), rel_index, 0.3, grad_out.double())
    if dtype == torch.float64:
        for name, x, ref in zip(["out", "dq", "dk", "dv", "dtable"], got, ref64):
            torch.testing.assert_close(x, ref, atol=1e-10, rtol=1e-10, msg=name)
    else:
        same_precision = run("eager", q, k, v, table, rel_index, 0.3, grad_out)
        assert_errors_within(["out", "dq", "dk", "dv", "dtable"], got, ref64, same_precision, dtype)


def test_blas_on_strided_and_packed_layouts():
    """Strided views (the model's packed qkv, a transposed one) give eager's output and gradients; the
    packed entry point returns the qkv gradient contiguous, in the qkv layout."""
    B, N, H, D = 2, 17, 3, 32
    table, rel_index = torch.randn(37, H), torch.randint(0, 37, (N, N))
    for qkv in (torch.randn(B, N, 3, H, D), torch.randn(B, N, 3, D, H).transpose(-1, -2)):
        qkv.requires_grad_()
        grad_out = torch.randn(B, N, H, D)
        out = ops.rel_pos_attention_packed(qkv, table, rel_index, backend="blas")
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
        ref_qkv = qkv.detach().double().requires_grad_()
        q, k, v = ref_qkv.permute(2, 0, 3, 1, 4)
        ref = ops.rel_pos_attention(q, k, v, table.double(), rel_index, backend="eager").transpose(1, 2)
        (ref_grad,) = torch.autograd.grad(ref, ref_qkv, grad_out.double())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
        assert out.shape == (B, N, H, D) and grad.is_contiguous()
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # the unpacked entry point on the same strided views
        torch.testing.assert_close(ops.rel_pos_attention(q, k, v, table, rel_index, backend="blas").transpose(1, 2),
                                   out)


def test_blas_dense_bias_gradient_keeps_the_padding_zero():
    """Given the padded dense bias, blas returns its gradient padded with zeros."""
    q, k, v, table, rel_index = make_inputs(2, 2, 17, 32, torch.float32, "cpu", "beit")
    bias = ops.relative_position_bias(table, rel_index).detach().requires_grad_()
    ops.rel_pos_attention(q, k, v, bias=bias, backend="blas").square().sum().backward()
    N = q.shape[2]
    assert bias.grad.shape == bias.shape and bias.grad[:, :N, :N].abs().sum() > 0
    assert not bias.grad[:, N:].any() and not bias.grad[:, :, N:].any()
    # A second derivative through blas is refused clearly (sdpa and eager give one).
    out = ops.rel_pos_attention(q, k, v, bias=bias, backend="blas")
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_q.sum().backward()
    # The bias alone needs a gradient (frozen q, k, v): the same bias gradient.
    frozen = [t.detach() for t in (q, k, v)]
    (grad,) = torch.autograd.grad(ops.rel_pos_attention(*frozen, bias=bias, backend="blas").square().sum(), bias)
    torch.testing.assert_close(grad, bias.grad)


def test_blas_refuses_16_bit_inputs_and_autocast():
    """Scores in 16 bits would round before the softmax: those go to sdpa, which auto picks next."""
    x = torch.randn(1, 2, 7, 32, dtype=torch.bfloat16)
    assert ops.explain("attention", q=x, k=x, v=x, bias_table=None, rel_index=None, scale=0.1)["blas"]
    x = x.float()
    assert ops.explain("attention", q=x, k=x, v=x, bias_table=None, rel_index=None, scale=0.1)["blas"] == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.explain("attention", q=x, k=x, v=x, bias_table=None, rel_index=None, scale=0.1)["blas"]
    assert dispatch.select("attention", None, q=x, k=x, v=x, bias_table=None, rel_index=None, bias=None,
                           scale=0.1).name == "blas"


def test_flex_score_mod_matches_reference():
    """The flex backend's score_mod, run by FlexAttention's eager path on CPU (forward only there;
    its gradients, the table's included, are checked on the GPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, table, rel_index = (
        None if t is None else t.detach() for t in make_inputs(2, 3, 17, 32, torch.float32, "cpu", "beit")
    )
    bias = ops.relative_position_bias(table, rel_index)
    out = flex_attention(q, k, v, score_mod=attention_op.bias_score_mod(bias), scale=0.3)
    ref = ops.rel_pos_attention(q, k, v, table, rel_index, 0.3, backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "blas"])
def test_packed_op_on_other_backends(backend):
    """The packed entry point runs the other backends on the unpacked views: [B, N, H, D] out."""
    qkv = torch.randn(2, 17, 3, 2, 32, requires_grad=True)
    table, rel_index = torch.randn(37, 2), torch.randint(0, 37, (17, 17))
    out = ops.rel_pos_attention_packed(qkv, table, rel_index, backend=backend)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(out, ops.rel_pos_attention(q, k, v, table, rel_index, backend="eager").transpose(1, 2))


# ---------------------------------------------------------------------------------------------------
# GPU only: bfloat16, BEiT sizes, the compiled and third-party backends

GPU_CASES = [
    (2, 3, 17, 32, torch.bfloat16, "random"),
    (2, 3, 50, 80, torch.bfloat16, "beit"),
    (3, 2, 197, 128, torch.bfloat16, "beit"),
    (2, 4, 197, 64, torch.float32, "beit"),
    (8, 12, 197, 64, torch.bfloat16, "beit"),
    (8, 12, 197, 64, torch.float16, "beit"),
    (2, 16, 577, 64, torch.bfloat16, "beit"),
    (4, 12, 197, 64, torch.bfloat16, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,D,dtype,index", GPU_CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_triton_gpu_matches_reference(B, H, N, D, dtype, index):
    assert_close_to_reference("triton", *make_inputs(B, H, N, D, dtype, torch.device("cuda"), index))


@pytest.mark.gpu
def test_triton_gpu_repeats_bit_for_bit_at_beit_b_shapes():
    """No atomics anywhere: the backward (table gradient included) is bitwise reproducible."""
    inputs = make_inputs(32, 12, 197, 64, torch.bfloat16, torch.device("cuda"), "beit")
    grad_out = torch.randn_like(inputs[0])
    first = run("triton", *inputs, None, grad_out)
    second = run("triton", *inputs, None, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def skip_unless_backend_takes(backend, q, k, v, table, rel_index):
    why = ops.explain("attention", q=q, k=k, v=v, bias_table=table, rel_index=rel_index, scale=1.0)[backend]
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "sdpa", "xformers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_backends_with_bias_match_reference(backend, dtype):
    inputs = make_inputs(2, 12, 197, 64, dtype, torch.device("cuda"), "beit")
    skip_unless_backend_takes(backend, *inputs)
    assert_close_to_reference(backend, *inputs)


@pytest.mark.gpu
def test_flash_without_bias_matches_reference():
    inputs = make_inputs(2, 12, 197, 64, torch.bfloat16, torch.device("cuda"), None)
    skip_unless_backend_takes("flash", *inputs)
    assert_close_to_reference("flash", *inputs)


@pytest.mark.gpu
def test_triton_model_under_bf16_autocast_and_compile(monkeypatch):
    """BEiT-B-shaped blocks in bf16 autocast, eager and compiled, with the Triton attention."""
    config = BEiTConfig(embed_dim=768, depth=2, num_heads=12, vocab_size=0, use_rel_pos_bias=True,
                        use_shared_rel_pos_bias=False, drop_path_rate=0.0, kernels="eager")
    model = BEiT(config).cuda()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.relative_position_bias_table.normal_(0, 0.5)
    images = torch.randn(4, 3, 224, 224, device="cuda")
    monkeypatch.setenv("BEITFAST_BACKEND", "attention=triton")
    compiled = torch.compile(model.forward_features, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hidden = model.forward_features(images)
        hidden_compiled = compiled(images)
    hidden_compiled.float().square().mean().backward()
    monkeypatch.delenv("BEITFAST_BACKEND")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = model.forward_features(images)
    torch.testing.assert_close(hidden.float(), reference.float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(hidden_compiled.float(), reference.float(), atol=5e-2, rtol=5e-2)
    assert all(torch.isfinite(b.attn.relative_position_bias_table.grad).all() for b in model.blocks)
