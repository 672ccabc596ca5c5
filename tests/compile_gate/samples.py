"""Kernels the compile gate must refuse (and one it must pass), as a ``--scenarios`` file for
benchmarks/compile_gate.py; launched on CPU stand-ins like the real scenarios."""
import torch
import triton
import triton.language as tl

SCALE = 2.0  # a plain float global: the interpreter reads it, the compiler refuses it


@triton.jit
def reads_float_global(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) * SCALE)


@triton.jit
def tile_product(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    rows, cols, ks = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * BLOCK_K + ks[None, :])
    b = tl.load(b_ptr + ks[:, None] * BLOCK_N + cols[None, :])
    c = tl.dot(a, b, input_precision=PRECISION)
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], c)


def _product(m, n, k, dtype, precision, warps):
    a, b = torch.empty(m, k, dtype=dtype), torch.empty(k, n, dtype=dtype)
    c = torch.empty(m, n, dtype=torch.float32)
    tile_product[(1,)](a, b, c, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, PRECISION=precision, num_warps=warps,
                       num_stages=1)


def samples():
    yield "float global", lambda: reads_float_global[(1,)](torch.empty(128), BLOCK=128)
    # A 256x256 fp32 accumulator held by one warp: 2,048 values per thread, far over 255 registers.
    yield "spilling", lambda: _product(256, 256, 32, torch.float16, "tf32", 1)
    # fp32 with IEEE precision has no tensor-core instruction: the dot runs on the FMA units.
    yield "fma dot", lambda: _product(64, 64, 32, torch.float32, "ieee", 4)
    yield "clean", lambda: _product(64, 64, 32, torch.float16, "tf32", 4)


SCENARIOS = {"samples": samples}
