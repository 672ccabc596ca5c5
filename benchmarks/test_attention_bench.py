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

The model against the GPU (rows ``attention_calibration``): ``test_read_rates_the_model_assumes``
measures the L2 and HBM read rates of a streaming kernel beside the rates the model assumes, and
``test_our_kernels_against_the_work_model`` profiles our fwd+bwd at the model's four shapes and puts
each kernel's measured time beside the model's prediction at the tile the autotuner kept (and at the
tile the model would keep).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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


# ---------------------------------------------------------------------------------------------------
# The work model against a GPU: the read rates it assumes, and each of our kernels beside its prediction.

# Our tiled kernels as the profiler names them, and the work model's name for each.
MODELLED = {"_fwd_kernel": "fwd", "_bwd_q_kernel": "q", "_bwd_kv_kernel": "kv", "_bwd_bias_kernel": "bias"}
READ_BLOCK = 2048  # fp32 elements a program reads a step


@triton.jit
def _read_kernel(X, OUT, blocks, repeats, BLOCK: tl.constexpr):
    """Program ``p`` reads blocks ``p``, ``p + programs``, ... of ``X``, ``repeats`` times over, and
    stores its sum (so that no read is optimised away)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(repeats):
        for block in range(pid, blocks, tl.num_programs(0)):
            acc += tl.load(X + block * BLOCK + offs)
    tl.store(OUT + pid * BLOCK + offs, acc)


def read_once(x: torch.Tensor, out: torch.Tensor, repeats: int) -> None:
    """``x`` (fp32, a multiple of ``READ_BLOCK`` long) read ``repeats`` times by ``out.numel() //
    READ_BLOCK`` programs; each program's sums in its block of ``out``."""
    _read_kernel[(out.numel() // READ_BLOCK,)](x, out, x.numel() // READ_BLOCK, repeats, BLOCK=READ_BLOCK,
                                                num_warps=8)


@pytest.mark.gpu
@pytest.mark.parametrize("level,mib,repeats", [("L2", 16, 20), ("HBM", 2048, 1)])
def test_read_rates_the_model_assumes(level, mib, repeats, record_result, measure):
    """A buffer that fits in L2 (16 MiB of H100's 50 MB) read 20 times, and one that does not (2 GiB)
    read once, by 8 programs per SM: the read rate beside the work model's assumed rate."""
    rate = work_model().GPU[level.lower()]
    x = torch.randn(mib * 2**20 // 4, device="cuda")
    programs = torch.cuda.get_device_properties(0).multi_processor_count * 8
    out = torch.empty(programs * READ_BLOCK, device="cuda")
    ms, _ = measure(lambda: read_once(x, out, repeats))
    measured = x.numel() * 4 * repeats / (ms * 1e-3)
    record_result("attention_calibration", probe=f"{level} read", buffer_mib=mib, repeats=repeats, ms=ms,
                  measured_tb_per_s=measured / 1e12, model_assumed_tb_per_s=rate / 1e12)
    print(f"{level} read of {mib} MiB x {repeats}: measured {measured / 1e12:.2f} TB/s, the work model "
          f"assumes {rate / 1e12:.2f} TB/s")
    assert measured > 0


def device_kernel_us(events, calls: int) -> dict[str, float]:
    """Microseconds per call of each GPU kernel among a profile's events (``prof.events()``), by name."""
    from torch.autograd import DeviceType

    spent: dict[str, float] = {}
    for event in events:
        if event.device_type == DeviceType.CUDA:
            spent[event.name] = spent.get(event.name, 0.0) + event.device_time_total
    return {name: us / calls for name, us in spent.items()}


def autotuned_tile(kernel: str) -> tuple[int, int, int, int] | None:
    """``(BLOCK_M, BLOCK_N, warps, stages)`` the autotuner kept for one of our tiled kernels at its last
    call; None before any call (and for the bias gradient, whose tile is fixed)."""
    from beitfast.kernels import attention as kernels

    config = getattr(getattr(kernels, kernel), "best_config", None)
    if config is None or "BLOCK_M" not in getattr(config, "kwargs", {}):
        return None
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def calibration_rows(measured_us: dict[str, float], B: int, N: int) -> list[dict]:
    """Per kernel of ours: the measured microseconds per call, the model's prediction at the tile the
    autotuner kept (at the model's own tile when none is known) and its bound, the model's own tile and
    its prediction; then the other kernels of the call (gathers, folds, sums), measured only."""
    model = work_model()
    rows = []
    for kernel, kind in MODELLED.items():
        at = model.predicted(kind, B, N, autotuned_tile(kernel) if kind != "bias" else None)
        own = model.predicted(kind, B, N)
        rows.append(dict(kernel=kernel, measured_us=measured_us.get(kernel), tile=at.config,
                         model_us=1e6 * at.seconds(), model_bound=at.bound(), model_tile=own.config,
                         model_tile_us=1e6 * own.seconds()))
    rows.append(dict(kernel="other kernels",
                     measured_us=sum(us for name, us in measured_us.items() if name not in MODELLED)))
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [name for name in SHAPES if name.startswith("beit-b-")])
def test_our_kernels_against_the_work_model(shape, record_result):
    """Forward and backward of the packed op with a table (its own per layer), profiled over 5 calls
    after 3 (autotuning): every modelled kernel's time beside the model's."""
    from torch.profiler import ProfilerActivity, profile

    B, H, side, D = SHAPES[shape]
    N = 1 + side * side
    qkv, table, rel_index = packed_inputs(shape)
    grad = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16)

    def call():
        out = ops.rel_pos_attention_packed(qkv, table, rel_index, backend="triton")
        torch.autograd.grad(out, [qkv, table], grad.view_as(out))

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    calls = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    measured = device_kernel_us(prof.events(), calls)
    for row in calibration_rows(measured, B, N):
        record_result("attention_calibration", shape=shape, batch=B, tokens=N, **row)
        if "model_us" in row:
            print(f"{shape:13s} {row['kernel']:18s} {row['tile']:28s} "
                  f"measured {row['measured_us'] or 0:8.1f} us, "
                  f"model {row['model_us']:8.1f} us ({row['model_bound']}-bound); model's tile "
                  f"{row['model_tile']} {row['model_tile_us']:.1f} us")
        else:
            print(f"{shape:13s} {row['kernel']:18s} measured {row['measured_us']:8.1f} us")
    assert all(measured.get(kernel) for kernel in MODELLED), sorted(measured)

