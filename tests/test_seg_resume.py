"""Exact resume of segmentation fine-tuning after ``kill -9``: ``beitfast segment train`` on the embedded
scenes in a subprocess, killed in the middle of a step, in the middle of a checkpoint write and from
outside, resumed each time, must end with the metrics, weights and optimizer state of a run never stopped,
bit for bit, with 0 or 2 DataLoader workers (on CPU). The subprocess and kill machinery is
tests/test_resume.py's."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from beitfast.testing import save_tiny_backbone

_spec = importlib.util.spec_from_file_location("resume_helpers", Path(__file__).with_name("test_resume.py"))
resume_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_helpers)

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

STEPS, CHECKPOINT_EVERY = 6, 2
RUN = ["segment", "train", "--data", "embedded", "--crop", "32", "--scale", "48", "32", "--batch-size", "2",
       "--head-channels", "8", "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY),
       "--seed", "1", "--device", "cpu", "--threads", "1", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-resume")
    torch.manual_seed(0)
    save_tiny_backbone(root / "pretrained.safetensors")
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
    # Killed in step 3 (resumed from step 2's checkpoint), while writing step 4's, and after step 3.
    resume_helpers.kill_and_resume(root, args, command="segment", kill_step=3, report_step=3,
                                   checkpoint_every=CHECKPOINT_EVERY)
    resume_helpers.assert_identical(resume_helpers.final_state(output), straight, steps=STEPS)
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]
