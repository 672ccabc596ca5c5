"""Test set-up: Triton kernels run through the interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Where the kernels under test run: the GPU when there is one, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_GPU else "cpu")
