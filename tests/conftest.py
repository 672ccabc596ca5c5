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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the machine is shared by the test processes, and more
    threads per process stall on oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    """Where the kernels under test run: the GPU when there is one, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_GPU else "cpu")
