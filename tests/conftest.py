"""Test set-up: Triton kernels run through the interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel is imported. Tests that need a GPU carry
``@pytest.mark.gpu`` and are skipped, with the reason, where there is none.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _interpreter_stays_on():
    """A test that drops TRITON_INTERPRET from the process (importing benchmarks/compile_gate.py does)
    would make every later Triton test of its worker refuse CPU tensors: it fails itself instead."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    after = os.environ.get("TRITON_INTERPRET")
    if after != before:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        pytest.fail(f"the test changed TRITON_INTERPRET from {before!r} to {after!r} for the whole process")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the machine is shared by the test processes, and more
    threads per process stall on oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def each_damage():
    """``each_damage(path, check)``: rewrites the file at ``path`` as copies of its bytes damaged
    anywhere (1 to 64 bytes overwritten, or the file cut) and calls ``check()`` after each; 60
    derandomised Hypothesis cases."""
    from hypothesis import given, settings, strategies as st

    def run(path, check):
        data = path.read_bytes()

        @settings(max_examples=60, deadline=None, derandomize=True)
        @given(offset=st.integers(0, len(data) - 1), new=st.binary(min_size=1, max_size=64),
               cut=st.booleans())
        def damaged_copy(offset, new, cut):
            overwritten = (data[:offset] + new + data[offset + len(new):])[:len(data)]
            path.write_bytes(data[:offset] if cut else overwritten)
            check()

        damaged_copy()

    return run


@pytest.fixture
def device():
    """Where the kernels under test run: the GPU when there is one, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_GPU else "cpu")
