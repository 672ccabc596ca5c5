"""pytest plugin of beitfast's test and benchmark suites (``-p beitfast.testing`` in pyproject.toml):
tests and benchmarks marked ``@pytest.mark.gpu`` are skipped, with the reason, where there is no GPU;
tests that exercise torch's compiler or op registration are marked ``compiler`` (``make test-oldest``
runs them on the oldest supported torch)."""

import contextlib
import inspect
import socket

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class HostReads(TorchDispatchMode):
    """Records every op that, on a CUDA tensor, makes the host wait for the device to read a value
    (``.item()``/``int()``/``bool()``, boolean indexing, nonzero, ...): the device-to-host transfers of
    a step, seen on CPU. Our custom ops run their implementation under the mode."""

    SYNCING = {"_local_scalar_dense", "nonzero", "nonzero_numpy", "argwhere", "masked_select", "unique",
               "_unique", "_unique2", "unique_consecutive", "unique_dim", "is_nonzero", "equal", "allclose",
               "bincount", "histc", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name in ("index", "index_put", "index_put_", "_index_put_impl_") else ()
        boolean_index = any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                            for t in indices or ())
        # repeat_interleave syncs only without output_size (its third argument).
        sized = name == "repeat_interleave" and kwargs.get("output_size", (*args, None, None)[2]) is not None
        if (name in self.SYNCING and not sized) or boolean_index:
            self.reads.append(str(func))
        if func.namespace == "beitfast":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


class StopRun(Exception):
    """Raised by :func:`stop_after`'s callback: a training run cut short, as a kill would."""


def stop_after(last_step: int):
    """A trainer ``on_step`` callback that raises :class:`StopRun` once step ``last_step`` is done."""

    def on_step(step, record):
        if step == last_step:
            raise StopRun

    return on_step


def save_tiny_backbone(path, embed_dim: int = 16):
    """A two-block BEiT for 32-pixel images (patch 8, eager kernels) saved at ``path``: the
    ``--pretrained`` of the segmentation command tests. Its weights follow torch's current seed."""
    from . import BEiT, BEiTConfig

    BEiT(BEiTConfig(img_size=32, patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2, vocab_size=0,
                    kernels="eager")).save(path)
    return path


def free_port() -> int:
    """A free TCP port on the loopback, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def leaving_the_group():
    """Around a spawned test worker's work in a process group: when the work ends well, a barrier
    first (no rank tears its group down while another still has a collective in flight, which can
    abort a gloo worker), then the group destroyed in any case."""
    import torch.distributed as dist

    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()

