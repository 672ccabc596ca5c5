"""The ``beitfast`` command: help texts, a tiny pre-training run end to end, resume, fine-tuning, the
tokenizer and bench commands, and the errors users see."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from beitfast.cli import build_parser, main

TINY = ["--model", "tiny", "--depth", "1", "--img-size", "16", "--patch-size", "4", "--batch-size", "4",
        "--warmup-steps", "1", "--device", "cpu", "--threads", "1", "--no-progress"]
TINY_TOKENIZER = ["--tokenizer-size", "16", "--tokenizer-patch-size", "4", "--vocab-size", "8",
                  "--tokenizer-images", "48", "--tokenizer-iters", "5"]


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def labelled_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(80 + 100 * c, 30, (24, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_every_option_is_explained():
    parsers = list(all_parsers(build_parser()))
    assert {p.prog for p in parsers} >= {"beitfast pretrain", "beitfast finetune", "beitfast tokenizer train",
                                         "beitfast bench"}
    for parser in parsers:
        for action in parser._actions:
            assert action.help, f"{parser.prog}: option {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", [[], ["pretrain"], ["finetune"], ["tokenizer", "train"], ["bench"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: beitfast" in text
    if command == ["pretrain"]:
        assert "--demo" in text and "with a GPU" in text and "on CPU" in text


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "beitfast", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_pretrain_end_to_end_resume_and_finetune(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "embedded", "--steps", "3", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    printed = capsys.readouterr().out
    assert "k-means tokenizer: 8 tokens" in printed and "done: loss" in printed
    for name in ("checkpoint.pt", "metrics.jsonl", "curves.png", "tokenizer.safetensors"):
        assert (out / name).is_file() and str((out / name).resolve()) in printed
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["model_config"]["vocab_size"] == 8

    # Resuming (the default) continues at step 4 with the saved tokenizer.
    assert main(["pretrain", "--data", "embedded", "--steps", "5", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    assert "from the run being resumed" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]

    data = labelled_folder(tmp_path / "labelled")
    ft = tmp_path / "ft"
    assert main(["finetune", "--pretrained", str(out / "checkpoint.pt"), "--data", str(data), "--val-data", str(data),
                 "--output", str(ft), "--steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 0
    assert "validation top-1 accuracy" in capsys.readouterr().out
    assert 0 <= json.loads((ft / "eval.json").read_text())["top1"] <= 1


def test_tokenizer_train_then_pretrain_with_it(tmp_path, capsys):
    path = tmp_path / "tok.safetensors"
    assert main(["tokenizer", "train", "--output", str(path), "--vocab-size", "8", "--tokenizer-size", "16",
                 "--tokenizer-patch-size", "4", "--tokenizer-images", "32", "--tokenizer-iters", "5"]) == 0
    assert path.is_file() and "saved" in capsys.readouterr().out
    assert main(["pretrain", "--tokenizer", str(path), "--steps", "1", "--output", str(tmp_path / "run"), *TINY]) == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model_config"]["vocab_size"] == 8


def test_bench_prints_a_json_row(capsys):
    assert main(["bench", "--model", "tiny", "--depth", "1", "--img-size", "16", "--patch-size", "4",
                 "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["device"] == "cpu" and row["batch_size"] == 2 and row["images_per_s"] > 0


def test_user_errors(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--steps", "1", "--output", str(tmp_path / "o"),
                 *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--steps", "1", "--output", str(blocker / "out"), *TINY, *TINY_TOKENIZER]) == 2
    assert "not writable" in capsys.readouterr().err

    out = str(tmp_path / "run")
    assert main(["pretrain", "--steps", "1", "--output", out, *TINY, *TINY_TOKENIZER]) == 0
    assert main(["pretrain", "--steps", "2", "--output", out, *TINY, *TINY_TOKENIZER, "--depth", "2"]) == 2
    assert "another architecture" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["pretrain", "--model", "huge"])
    assert "invalid choice" in capsys.readouterr().err
