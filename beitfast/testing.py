"""pytest plugin of beitfast's test and benchmark suites (``-p beitfast.testing`` in pyproject.toml):
tests and benchmarks marked ``@pytest.mark.gpu`` are skipped, with the reason, where there is no GPU."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
