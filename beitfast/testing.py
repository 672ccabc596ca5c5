"""pytest plugin of beitfast's test and benchmark suites (``-p beitfast.testing`` in pyproject.toml):
tests and benchmarks marked ``@pytest.mark.gpu`` are skipped, with the reason, where there is no GPU;
tests that exercise torch's compiler or op registration are marked ``compiler`` (``make test-oldest``
runs them on the oldest supported torch)."""

import inspect

import pytest
import torch

# What a test's source calls when it depends on torch's compiler or on how our ops are registered.
COMPILER_CALLS = ("torch.compile", "opcheck", "torch.ops.beitfast", "_dynamo", "register_fake", "counters[",
                  'fuse_blocks="compile"', "compile=True")


def uses_the_compiler(function) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(call in source for call in COMPILER_CALLS)


def pytest_configure(config):
    config.addinivalue_line("markers", "compiler: exercises torch's compiler or op registration")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if uses_the_compiler(getattr(item, "function", None)):
            item.add_marker(pytest.mark.compiler)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
