"""Exact resume after ``kill -9``: the ``beitfast pretrain`` command in a subprocess is killed in the
middle of a step, in the middle of a checkpoint write and at an arbitrary moment from outside, resumed
each time, and must end with the metrics and the weights of a run never stopped, bit for bit, with 0 or
2 DataLoader workers (on CPU), and with the device input path (views made in the training process)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.cli import main

STEPS, CHECKPOINT_EVERY = 8, 3
RUN = ["pretrain", "--model", "tiny", "--depth", "1", "--img-size", "16", "--patch-size", "4", "--batch-size", "4",
       "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY), "--device", "cpu", "--threads", "1",
       "--no-progress", "--log-every", "1"]

# The command with a kill -9 of its own process at a chosen moment (KILL_AT="<moment>:<n>"):
#   step:n              the n-th step, after the backward pass and before the optimizer step;
#   checkpoint-write:n  the n-th write of checkpoint.pt, its temporary file complete but not yet renamed.
KILLABLE_COMMAND = """
import os, signal, sys
import torch

moment, _, n = os.environ.get("KILL_AT", "").partition(":")
calls = 0

def kill_on_call(function, applies=lambda *args, **kwargs: True):
    def wrapper(*args, **kwargs):
        global calls
        if applies(*args, **kwargs):
            calls += 1
            if calls == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

if moment == "step":
    torch.nn.utils.clip_grad_norm_ = kill_on_call(torch.nn.utils.clip_grad_norm_)
elif moment == "checkpoint-write":
    os.replace = kill_on_call(os.replace, lambda src, dst: os.path.basename(dst) == "checkpoint.pt")
from beitfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_command(folder, args, kill_at="", kill_after_line=None):
    """Run the command in a session of its own (DataLoader workers included); returns (exit code, stdout).
    ``kill_after_line``: kill -9 the session from here once stdout shows a line starting with it."""
    log = folder / f"stdout-{time.monotonic_ns()}.txt"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", KILLABLE_COMMAND, *args], cwd=folder, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "KILL_AT": kill_at},
                                   start_new_session=True)
    try:
        if kill_after_line is not None:
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                if any(line.startswith(kill_after_line) for line in log.read_text().splitlines()):
                    os.killpg(process.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        code = process.wait(timeout=300)
    finally:
        try:  # workers left behind by a killed main process
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code, log.read_text()


def resumed_step(output: str, command: str = "pretrain") -> int:
    line = next(line for line in output.splitlines() if line.startswith(f"{command}: resumed from"))
    return int(line.split(" at step ")[1].split()[0])


def final_state(output_dir):
    """The numbers of every step (not the timings) and the final model and optimizer state."""
    keys = ("step", "loss", "accuracy", "lr", "weight_decay", "grad_norm")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    payload = torch.load(output_dir / "checkpoint.pt", weights_only=True)
    return ([tuple(r[k] for k in keys) for r in records], payload["model"], payload["optimizer"]["state"],
            payload["step"])


def kill_and_resume(root, args, *, command, kill_step, report_step, checkpoint_every):
    """Runs the command three times killed and once to the end, each run after the first resuming from
    the checkpoint of step ``checkpoint_every``: killed -9 in step ``kill_step`` after its backward pass,
    then while writing its next checkpoint (the one before must still be there), then from outside once
    step ``report_step`` is reported, wherever it is by then (on a very busy machine it may even have
    finished: then the last run has nothing left to do)."""
    code, printed = run_command(root, args, kill_at=f"step:{kill_step}")
    assert code == -signal.SIGKILL, printed
    code, printed = run_command(root, args, kill_at="checkpoint-write:1")
    assert code == -signal.SIGKILL and resumed_step(printed, command) == checkpoint_every, printed
    code, printed = run_command(root, args, kill_after_line=f"{command} step {report_step}/")
    assert code in (-signal.SIGKILL, 0) and resumed_step(printed, command) == checkpoint_every, printed
    code, printed = run_command(root, args)
    assert code == 0 and "done: " in printed and resumed_step(printed, command) >= checkpoint_every, printed


def assert_identical(got, expected, steps=STEPS):
    records, model, optimizer, step = got
    assert records == expected[0] and step == expected[3] == steps
    assert model.keys() == expected[1].keys() and all(torch.equal(model[k], expected[1][k]) for k in model)
    assert optimizer.keys() == expected[2].keys()
    for index, state in optimizer.items():
        assert all(torch.equal(state[k], expected[2][index][k]) for k in state)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A few images (PNG and JPEG files) and a k-means tokenizer fitted on them: the command's arguments."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(6):
        name = f"{i}.png" if i % 2 else f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "images" / name)
    assert main(["tokenizer", "train", "--data", str(root / "images"), "--output", str(root / "tok.safetensors"),
                 "--vocab-size", "16", "--tokenizer-size", "16", "--tokenizer-patch-size", "4",
                 "--tokenizer-images", "48", "--tokenizer-iters", "5"]) == 0
    return root, [*RUN, "--data", str(root / "images"), "--tokenizer", str(root / "tok.safetensors")]


@pytest.mark.slow
@pytest.mark.parametrize("workers,input_path", [(0, "cpu"), (2, "cpu"), (2, "device")])
def test_kill_and_resume_is_exact(setup, workers, input_path):
    root, args = setup
    args = [*args, "--input-path", input_path]
    # The uninterrupted run, without workers.
    code, printed = run_command(root, [*args, "--output", str(root / f"straight-{workers}-{input_path}")])
    assert code == 0, printed
    straight = final_state(root / f"straight-{workers}-{input_path}")

    output = root / f"killed-{workers}-{input_path}"
    args = [*args, "--workers", str(workers), "--output", str(output)]
    # Killed in step 5 (resumed from step 3's checkpoint), while writing step 6's, and after step 4.
    kill_and_resume(root, args, command="pretrain", kill_step=5, report_step=4,
                    checkpoint_every=CHECKPOINT_EVERY)
    assert_identical(final_state(output), straight)
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]  # what the kills left is gone
