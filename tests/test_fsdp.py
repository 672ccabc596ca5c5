"""FSDP (``fully_shard``, ``TrainConfig.parallel="fsdp"``): two gloo processes on CPU, each holding half
of every parameter and half of the batch, make the updates of one process with the whole batch."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from beitfast.testing import free_port, leaving_the_group
from beitfast.train import CHECKPOINT_NAME, TrainConfig, pretrain


def _run(output: str, **overrides):
    from tests.test_train import MeanBrightnessTokenizer, photos, tiny_config

    config = TrainConfig(output_dir=output, steps=4, batch_size=4, warmup_steps=1, lr=2e-3,
                         checkpoint_every=2, progress=False, **overrides)
    return pretrain(tiny_config(drop_path_rate=0.0), MeanBrightnessTokenizer(), photos(), config)


def _fsdp_worker(rank, world_size, port, output):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with leaving_the_group():
        model, records = _run(output, parallel="fsdp")
        shards = {name: type(p).__name__ for name, p in model.named_parameters()}
        if rank == 0:
            with open(os.path.join(output, "run.json"), "w") as f:
                json.dump({"losses": [r["loss"] for r in records], "parameter_types": shards}, f)


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # Spawned workers unpickle this module by its import name (tests.test_fsdp) and import the
    # training helpers from tests.test_train, with the parent's sys.path: the root goes there for the
    # duration of this test only.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    torch.set_num_threads(1)
    _, single = _run(str(tmp_path / "one"))
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    # The parameters really were sharded (DTensors), not replicated.
    assert set(run["parameter_types"].values()) == {"DTensor"}
    np.testing.assert_allclose(run["losses"], [r["loss"] for r in single], rtol=1e-5)
    one = torch.load(tmp_path / "one" / CHECKPOINT_NAME, weights_only=True)
    two = torch.load(tmp_path / "two" / CHECKPOINT_NAME, weights_only=True)
    assert two["world_size"] == 2
    # The checkpoint holds whole (gathered) parameters and optimizer moments, as one process's.
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-6)
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in one["optimizer"]["state"].values()]
    assert len(two["optimizer"]["state"]) == len(moments)
    for state, (exp_avg, exp_avg_sq) in zip(two["optimizer"]["state"].values(), moments):
        torch.testing.assert_close(state["exp_avg"], exp_avg, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"], exp_avg_sq, rtol=1e-4, atol=1e-10)
