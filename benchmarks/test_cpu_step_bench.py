"""BEiT-S forward + backward on the CPU: beitfast (auto backends) against timm's BEiT with the same
weights, per-layer and shared relative position bias tables. A genuine CPU benchmark: rows go to
``results/cpu_step_cpu.json`` with the machine and thread count.

Both models compute the same hidden states (checked first); the runs alternate between the two
models and the fastest run of each is reported (timeit's rule: interference only adds time). Everything runs on one
thread (a per-core comparison): on a shared machine, spinning worker threads of an oversubscribed
pool otherwise dominate the timings.
"""

from __future__ import annotations

import time

import pytest
import torch

from beitfast import BEiT, BEiTConfig

BATCH = 8
REPEATS = 5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def models(shared: bool):
    timm = pytest.importorskip("timm")
    config = BEiTConfig.small(vocab_size=0, num_classes=0, drop_path_rate=0.0, use_rel_pos_bias=not shared,
                              use_shared_rel_pos_bias=shared)
    ours = BEiT(config)
    with torch.no_grad():  # visible tables: the bias must matter for the comparison to mean anything
        for name, p in ours.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    theirs = timm.models.beit.Beit(**ours.timm_kwargs())
    theirs.load_state_dict(ours.to_timm_state_dict())
    return ours, theirs


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer-tables", "shared-table"])
def test_cpu_step_against_timm(shared, record_cpu_result):
    ours, theirs = models(shared)
    images = torch.randn(BATCH, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(images), theirs.forward_features(images),
                                   atol=1e-4, rtol=1e-4)

    def step(model):
        model.zero_grad(set_to_none=True)
        model.forward_features(images).square().mean().backward()

    times = {"beitfast": [], "timm": []}
    for _ in range(2):  # warm-up
        step(ours), step(theirs)
    for _ in range(REPEATS):
        for name, model in (("beitfast", ours), ("timm", theirs)):
            start = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * min(t) for name, t in times.items()}
    ratio = ms["timm"] / ms["beitfast"]
    record_cpu_result("cpu_step", model="beit-small", batch=BATCH, tables="shared" if shared else "per-layer",
                      beitfast_ms=ms["beitfast"], timm_ms=ms["timm"], timm_over_beitfast=ratio,
                      repeats=REPEATS)
    print(f"BEiT-S fwd+bwd on CPU, batch {BATCH}, {'shared' if shared else 'per-layer'} tables: beitfast "
          f"{ms['beitfast']:.0f} ms, timm {ms['timm']:.0f} ms (timm / beitfast = {ratio:.2f})")


@pytest.mark.parametrize("heads", [6, 12], ids=["beit-s", "beit-b"])
def test_cpu_bias_gather_and_fold(heads, record_cpu_result):
    """The part of the step the dense-bias op replaces: gathering the ``[H, N, N]`` bias from the table
    and its backward into the table, ours (cached plan, one index_add_) against timm's (indexing,
    whose backward is an accumulating index_put_)."""
    from beitfast import ops
    from beitfast.model import num_relative_positions, relative_position_index

    grid = (14, 14)
    index = relative_position_index(grid)
    table = torch.randn(num_relative_positions(grid), heads, requires_grad=True)
    N = index.shape[0]
    grad = torch.randn(heads, N, N)

    def ours():
        bias = ops.relative_position_bias(table, index)
        torch.autograd.grad(bias[:, :N, :N], table, grad)

    def timm_style():
        bias = table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
        torch.autograd.grad(bias, table, grad)

    times = {"beitfast": [], "timm": []}
    for _ in range(3):
        ours(), timm_style()
    for _ in range(50):
        for name, fn in (("beitfast", ours), ("timm", timm_style)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    us = {name: 1e6 * min(t) for name, t in times.items()}
    record_cpu_result("cpu_bias_gather", heads=heads, tokens=N, beitfast_us=us["beitfast"], timm_us=us["timm"],
                      timm_over_beitfast=us["timm"] / us["beitfast"])
    print(f"bias gather + fold on CPU, H={heads}, N={N}: beitfast {us['beitfast']:.0f} us, "
          f"timm {us['timm']:.0f} us (timm / beitfast = {us['timm'] / us['beitfast']:.1f})")
