"""Exact resume of segmentation fine-tuning after ``kill -9``: ``beitfast segment train`` on the embedded
scenes in a subprocess, killed in the middle of a step, in the middle of a checkpoint write and from
outside, resumed each time, must end with the metrics, weights and optimizer state of a run never stopped,
bit for bit, with 0 or 2 DataLoader workers (on CPU). The subprocess and kill machinery is
tests/test_resume.py's."""

import importlib.util
import os
import signal
from pathlib import Path

import pytest
import torch

from beitfast import BEiT, BEiTConfig

_spec = importlib.util.spec_from_file_location("resume_helpers", Path(__file__).with_name("test_resume.py"))
resume_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_helpers)

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

STEPS, CHECKPOINT_EVERY = 6, 2
RUN = ["segment", "train", "--data", "embedded", "--crop", "32", "--scale", "48", "32", "--batch-size", "2",
       "--head-channels", "8", "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY),
       "--seed", "1", "--device", "cpu", "--threads", "1", "--no-progress", "--log-every", "1"]


def resumed_step(printed: str) -> int:
    line = next(line for line in printed.splitlines() if line.startswith("segment: resumed from"))
    return int(line.split(" at step ")[1].split()[0])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-resume")
    torch.manual_seed(0)
    BEiT(BEiTConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, vocab_size=0,
                    kernels="eager")).save(root / "pretrained.safetensors")
    return root, [*RUN, "--pretrained", str(root / "pretrained.safetensors")]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_is_exact(pretrained, workers):
    root, args = pretrained
    run = resume_helpers.run_command
    code, printed = run(root, [*args, "--output", str(root / f"straight-{workers}")])
    assert code == 0, printed
    straight = resume_helpers.final_state(root / f"straight-{workers}")

    output = root / f"killed-{workers}"
    args = [*args, "--workers", str(workers), "--output", str(output)]
    # Killed in step 3, after its backward pass: the checkpoint of step 2 is the one to resume from.
    code, printed = run(root, args, kill_at="step:3")
    assert code == -signal.SIGKILL, printed
    # Resumed at step 2, killed while writing the checkpoint of step 4: step 2's must still be there.
    code, printed = run(root, args, kill_at="checkpoint-write:1")
    assert code == -signal.SIGKILL and resumed_step(printed) == CHECKPOINT_EVERY, printed
    # Resumed at step 2 again, killed from outside once step 3 is reported (or finished by then).
    code, printed = run(root, args, kill_after_line="segment step 3/")
    assert code in (-signal.SIGKILL, 0) and resumed_step(printed) == CHECKPOINT_EVERY, printed
    code, printed = run(root, args)
    assert code == 0 and "done: " in printed and resumed_step(printed) >= CHECKPOINT_EVERY, printed

    records, model, optimizer, step = resume_helpers.final_state(output)
    assert records == straight[0] and step == straight[3] == STEPS
    assert model.keys() == straight[1].keys() and all(torch.equal(model[k], straight[1][k]) for k in model)
    assert optimizer.keys() == straight[2].keys()
    for index, state in optimizer.items():
        assert all(torch.equal(state[k], straight[2][index][k]) for k in state)
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]
