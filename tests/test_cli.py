"""The ``beitfast`` command: help texts, a tiny pre-training run end to end, resume, fine-tuning, the
tokenizer and bench commands, and the errors users see."""

import argparse
import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from beitfast.cli import build_parser, main

TINY_MODEL = ["--model", "tiny", "--depth", "1", "--batch-size", "4", "--device", "cpu", "--threads", "1",
              "--no-progress"]
TINY = [*TINY_MODEL, "--img-size", "16", "--patch-size", "4"]
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


def one_line_error(capsys, *phrases):
    """The error a user sees: one line on stderr naming what is wrong, no traceback."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err
    return err


def test_pretrain_end_to_end_resume_and_finetune(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "embedded", "--steps", "3", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    printed = capsys.readouterr().out
    assert "k-means tokenizer: 8 tokens" in printed and "done: loss" in printed
    # --no-progress: one line per step here (a twentieth of a 3-step run), not silence until the end.
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("pretrain step")] == [
        "pretrain step 1/3", "pretrain step 2/3", "pretrain step 3/3"]
    for name in ("checkpoint.pt", "metrics.jsonl", "curves.png", "tokenizer.safetensors"):
        assert (out / name).is_file() and str((out / name).resolve()) in printed
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3 and checkpoint["model_config"]["vocab_size"] == 8

    # Resuming (the default) continues at step 4 with the saved tokenizer.
    assert main(["pretrain", "--data", "embedded", "--steps", "5", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    printed = capsys.readouterr().out
    assert "from the run being resumed" in printed
    checkpoint_file = out / "checkpoint.pt"
    assert f"pretrain: resumed from {checkpoint_file} at step 3 of 5" in printed  # the progress output says so
    assert f"done: resumed from {checkpoint_file} at step 3; steps 4-5: loss" in printed  # and the summary
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]

    data = labelled_folder(tmp_path / "labelled")
    ft = tmp_path / "ft"
    assert main(["finetune", "--pretrained", str(out / "checkpoint.pt"), "--data", str(data), "--val-data", str(data),
                 "--output", str(ft), "--steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    assert 0 <= json.loads((ft / "eval.json").read_text())["top1"] <= 1


def test_tokenizer_train_then_pretrain_with_it(tmp_path, capsys):
    # A 14x14 token grid, as `tokenizer train` makes by default (112 / 8), on smaller views.
    path = tmp_path / "tok.safetensors"
    assert main(["tokenizer", "train", "--output", str(path), "--vocab-size", "8", "--tokenizer-size", "28",
                 "--tokenizer-patch-size", "2", "--tokenizer-images", "32", "--tokenizer-iters", "5"]) == 0
    assert path.is_file() and "saved" in capsys.readouterr().out
    # On CPU the model's patch grid follows the tokenizer's: 14 patches of 8 pixels (the CPU default).
    run = tmp_path / "run"
    assert main(["pretrain", "--tokenizer", str(path), "--steps", "1", "--batch-size", "2", "--output", str(run),
                 *TINY_MODEL]) == 0
    model_config = torch.load(run / "checkpoint.pt", weights_only=True)["model_config"]
    assert model_config["vocab_size"] == 8 and model_config["patch_size"] == 8 and model_config["img_size"] == 112

    # A grid contradicted explicitly is refused before any work (nothing is written).
    other = tmp_path / "other"
    assert main(["pretrain", "--tokenizer", str(path), "--img-size", "64", "--steps", "1", "--output", str(other),
                 *TINY_MODEL]) == 2
    one_line_error(capsys, "14x14", "8x8", "--img-size 112")
    assert not other.exists()
    # A k-means tokenizer to be fitted follows the model's grid unless its size is given.
    assert main(["pretrain", "--img-size", "24", "--patch-size", "4", "--tokenizer-size", "16", "--steps", "1",
                 "--output", str(other), *TINY_MODEL]) == 2
    one_line_error(capsys, "--tokenizer-size/--tokenizer-patch-size", "4x4", "6x6")
    assert not other.exists()
    assert main(["pretrain", "--mask-ratio", "1.5", "--steps", "1", "--output", str(other), *TINY_MODEL]) == 2
    one_line_error(capsys, "mask_ratio must be in (0, 1)")
    assert not other.exists()


def test_short_run_warmup(tmp_path, capsys):
    # The default warmup is the recipe's share of the run (40 of 400 on CPU): 2 of a 20-step run.
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "20", "--lr", "1e-3", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["train_config"]["warmup_steps"] == 2
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == [0.0, 1e-3] and max(lrs) == 1e-3
    capsys.readouterr()
    # A warmup as long as the run is an error, before any work.
    other = tmp_path / "other"
    assert main(["pretrain", "--steps", "5", "--warmup-steps", "5", "--output", str(other), *TINY,
                 *TINY_TOKENIZER]) == 2
    one_line_error(capsys, "warmup_steps (5) must be smaller than steps (5)")
    assert not other.exists()


def test_missing_gpu_fails_at_once(tmp_path, capsys):
    absent = f"cuda:{torch.cuda.device_count()}"  # "cuda" itself on a machine without a GPU
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "2", "--output", str(out), *TINY, *TINY_TOKENIZER, "--device", absent]) == 2
    captured = capsys.readouterr()
    assert "k-means" not in captured.out and not out.exists()
    assert len(captured.err.strip().splitlines()) == 1 and f"device {absent!r}" in captured.err
    data = labelled_folder(tmp_path / "labelled")
    assert main(["finetune", "--pretrained", str(out / "none.pt"), "--data", str(data), "--output", str(out),
                 "--device", absent]) == 2
    one_line_error(capsys, f"device {absent!r}")
    assert main(["bench", "--device", absent]) == 2
    one_line_error(capsys, f"device {absent!r}")


def test_bench_prints_a_json_row(capsys):
    assert main(["bench", "--model", "tiny", "--depth", "1", "--img-size", "16", "--patch-size", "4",
                 "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["device"] == "cpu" and row["batch_size"] == 2 and row["images_per_s"] > 0


def test_user_errors(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--steps", "1", "--output", str(tmp_path / "o"),
                 *TINY]) == 2
    one_line_error(capsys, "does not exist")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--steps", "1", "--output", str(blocker / "out"), *TINY, *TINY_TOKENIZER]) == 2
    one_line_error(capsys, "not writable")
    assert main(["tokenizer", "train", "--output", str(blocker / "tok.safetensors"), "--vocab-size", "8"]) == 2
    one_line_error(capsys, "not writable")

    # Files that are not there are named before any work (no k-means fit, no data loaded).
    assert main(["pretrain", "--steps", "1", "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "t"),
                 *TINY]) == 2
    one_line_error(capsys, "--tokenizer", "does not exist")
    assert main(["pretrain", "--steps", "1", "--output", str(tmp_path / "o"), "--resume", str(tmp_path / "c.pt"),
                 *TINY, *TINY_TOKENIZER]) == 2
    captured = capsys.readouterr()
    assert "k-means" not in captured.out and "--resume" in captured.err and len(captured.err.splitlines()) == 1
    data = labelled_folder(tmp_path / "labelled")
    finetune = ["finetune", "--data", str(data), "--output", str(tmp_path / "ft"), "--steps", "1", "--batch-size",
                "2", "--device", "cpu", "--threads", "1", "--no-progress"]
    assert main([*finetune, "--pretrained", str(tmp_path / "p.pt")]) == 2
    one_line_error(capsys, "--pretrained", "does not exist")

    out = str(tmp_path / "run")
    assert main(["pretrain", "--steps", "1", "--output", out, *TINY, *TINY_TOKENIZER]) == 0
    assert main(["pretrain", "--steps", "2", "--output", out, *TINY, *TINY_TOKENIZER, "--depth", "2"]) == 2
    one_line_error(capsys, "another architecture")
    other_classes = tmp_path / "other-classes"
    (other_classes / "triangle").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other_classes / "triangle" / "0.png")
    assert main([*finetune, "--pretrained", str(tmp_path / "run" / "checkpoint.pt"), "--val-data",
                 str(other_classes)]) == 2
    one_line_error(capsys, "--val-data classes ['triangle'] differ")

    with pytest.raises(SystemExit):
        main(["pretrain", "--model", "huge"])
    assert "invalid choice" in capsys.readouterr().err


# Runs the command in a fresh interpreter where matplotlib cannot be imported, as after a plain
# `pip install .` (matplotlib is in the data extra only).
WITHOUT_MATPLOTLIB = """
import importlib.abc, sys

class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoMatplotlib())
from beitfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_training_without_matplotlib(tmp_path):
    def run(*args):
        result = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("curves.png is not drawn: matplotlib cannot be imported") == 1, result.stdout
        return result

    out = tmp_path / "run"
    run("pretrain", "--steps", "2", "--checkpoint-every", "1", "--output", str(out), *TINY, *TINY_TOKENIZER)
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.jsonl").is_file()
    assert not (out / "curves.png").exists()
    data = labelled_folder(tmp_path / "labelled")
    run("finetune", "--pretrained", str(out / "checkpoint.pt"), "--data", str(data), "--output", str(tmp_path / "ft"),
        "--steps", "1", "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress")
    assert (tmp_path / "ft" / "checkpoint.pt").is_file() and not (tmp_path / "ft" / "curves.png").exists()


@pytest.mark.parametrize("failure,code,phrase", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2.00 GiB"), 2, "smaller --batch-size"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_out_of_memory_and_interrupt(monkeypatch, capsys, failure, code, phrase):
    def fail(args):
        raise failure

    monkeypatch.setattr("beitfast.cli.cmd_pretrain", fail)
    assert main(["pretrain"]) == code
    err = one_line_error(capsys, phrase)
    assert "resumes from the last checkpoint" in err or code == 2


def test_pretrain_reads_shards_written_by_data_pack(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    assert main(["data", "pack", str(images), str(tmp_path / "shards"), "--images-per-shard", "4"]) == 0
    shards = tmp_path / "shards"
    for data in (shards, sorted(shards.glob("*.tar"))[0]):
        out = tmp_path / f"run-{data.name}"
        assert main(["pretrain", "--data", str(data), "--steps", "1", "--output", str(out), *TINY,
                     *TINY_TOKENIZER]) == 0
        assert (out / "checkpoint.pt").is_file()


def test_a_killed_tokenizer_save_leaves_nothing_behind(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".tokenizer.safetensors.k1lLed00.tmp"  # what a kill during the tokenizer's write leaves
    stale.write_bytes(b"partial")
    assert main(["pretrain", "--steps", "1", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    assert not stale.exists() and (out / "tokenizer.safetensors").is_file()


def test_fast_step_options_reach_the_model_and_the_trainer(tmp_path, capsys):
    from beitfast import BEiT

    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "1", "--output", str(out), *TINY, *TINY_TOKENIZER, "--fuse-blocks", "off",
                 "--residual-dtype", "autocast", "--checkpoint-blocks", "-1", "--no-fused-optimizer"]) == 0
    config = BEiT.from_file(out / "checkpoint.pt").config
    assert (config.fuse_blocks, config.residual_dtype, config.checkpoint_blocks) == ("off", "autocast", -1)
    capsys.readouterr()
    assert main(["pretrain", "--steps", "1", "--output", str(tmp_path / "graphs"), *TINY, *TINY_TOKENIZER,
                 "--cuda-graphs"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["beitfast pretrain: error: --cuda-graphs needs a CUDA device, this run is on cpu"]
    assert not (tmp_path / "graphs").exists()  # refused before the tokenizer fit wrote anything


def test_input_path_option_reaches_the_trainer(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "1", "--output", str(out), *TINY, *TINY_TOKENIZER,
                 "--input-path", "device"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["train_config"]["input_path"] == "device"
    assert build_parser().parse_args(["pretrain"]).input_path == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--input-path", "gpu"])
    assert "--input-path: invalid choice: 'gpu'" in capsys.readouterr().err


# -- nothing lost, nothing silent (issue 24) -------------------------------------------------------


def test_a_fresh_run_does_not_replace_an_earlier_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "1", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    (out / "checkpoint-previous.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "checkpoint-previous.pt",
                                                           "metrics.jsonl", "tokenizer.safetensors")}
    capsys.readouterr()
    assert main(["pretrain", "--resume", "none", "--steps", "2", "--output", str(out), *TINY,
                 *TINY_TOKENIZER]) == 2
    captured = capsys.readouterr()
    one_line_error_text(captured.err, "--overwrite", "checkpoint.pt", "checkpoint-previous.pt",
                        "metrics.jsonl")
    assert "k-means" not in captured.out  # refused before any work
    assert all((out / name).read_bytes() == data for name, data in before.items())
    data = labelled_folder(tmp_path / "labelled")
    finetune = ["finetune", "--pretrained", str(out / "checkpoint.pt"), "--data", str(data), "--steps", "1",
                "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress", "--resume", "none"]
    assert main([*finetune, "--output", str(out)]) == 2
    one_line_error(capsys, "--overwrite", "checkpoint.pt")
    assert all((out / name).read_bytes() == data for name, data in before.items())
    # --overwrite says so; a folder without a run needs nothing.
    assert main(["pretrain", "--resume", "none", "--overwrite", "--steps", "2", "--output", str(out), *TINY,
                 *TINY_TOKENIZER]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    (tmp_path / "empty").mkdir()
    assert main([*finetune, "--output", str(tmp_path / "empty")]) == 0


def one_line_error_text(err, *phrases):
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err


# Every count option of every command, with its least value: one less is refused, naming the option.
COUNT_OPTIONS = [(command, option, least) for command, options in {
    "pretrain": {"--depth": 1, "--img-size": 1, "--patch-size": 1, "--vocab-size": 2, "--threads": 1,
                 "--log-every": 1, "--steps": 1, "--batch-size": 1, "--tokenizer-size": 1,
                 "--tokenizer-patch-size": 1, "--tokenizer-images": 1, "--checkpoint-every": 1},
    "finetune": {"--threads": 1, "--log-every": 1, "--steps": 1, "--batch-size": 1},
    "tokenizer train": {"--vocab-size": 2, "--tokenizer-size": 1, "--tokenizer-images": 1},
    "bench": {"--depth": 1, "--patch-size": 1, "--threads": 1, "--steps": 1},
}.items() for option, least in options.items()]


@settings(derandomize=True, database=None, deadline=None, max_examples=40)
@given(case=st.sampled_from(COUNT_OPTIONS), below=st.integers(1, 3))
def test_a_count_option_below_its_least_value_is_refused(tmp_path_factory, case, below):
    command, option, least = case
    out = tmp_path_factory.mktemp("run") / "out"
    base = {"pretrain": [*TINY, *TINY_TOKENIZER, "--steps", "1", "--output", str(out)],
            "finetune": ["--pretrained", str(out / "p.pt"), "--data", str(out), "--output", str(out),
                         "--steps", "1"],
            "tokenizer train": [*TINY_TOKENIZER, "--output", str(out / "t.safetensors")],
            "bench": ["--model", "tiny", "--depth", "1", "--img-size", "16", "--patch-size", "4",
                      "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"]}[command]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*command.split(), *base, option, str(least - below)])
    assert code == 2
    one_line_error_text(err.getvalue(), f"{option} must be at least {least}, got {least - below}")
    assert not out.exists()


def test_min_lr_above_lr_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "2", "--lr", "1e-4", "--min-lr", "1e-3", "--output", str(out), *TINY,
                 *TINY_TOKENIZER]) == 2
    one_line_error(capsys, "--min-lr (0.001) must not exceed --lr (0.0001)")
    assert not out.exists()


def test_finetune_needs_two_classes_and_names_stray_images(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "1", "--output", str(out), *TINY, *TINY_TOKENIZER]) == 0
    data = labelled_folder(tmp_path / "labelled")
    finetune = ["finetune", "--pretrained", str(out / "checkpoint.pt"), "--output", str(tmp_path / "ft"),
                "--steps", "1", "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress"]
    capsys.readouterr()
    one_class = tmp_path / "one"
    (data / "square").rename(one_class)  # one class left
    assert main([*finetune, "--data", str(data)]) == 2
    one_line_error(capsys, "--data", "1 class ['circle']", "at least two")
    assert not (tmp_path / "ft").exists()
    (one_class).rename(data / "square")
    for name in ("stray.png", "other.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / name)
    assert main([*finetune, "--data", str(data)]) == 0
    assert "--data: ignored 2 image(s) beside the class folders, in no class: other.jpg, stray.png" in \
        capsys.readouterr().out


def test_resume_with_another_tokenizer_is_refused_unless_allowed(tmp_path, capsys):
    """Two k-means tokenizers of the same vocabulary (other seeds): the checkpoint records its tokenizer's
    checksum; a checkpoint of an older version, without one, still resumes."""
    tokenizers = []
    for seed in (1, 2):
        tokenizers.append(tmp_path / f"tok{seed}.safetensors")
        assert main(["tokenizer", "train", "--output", str(tokenizers[-1]), *TINY_TOKENIZER, "--seed",
                     str(seed)]) == 0
    out = tmp_path / "run"
    pretrain = ["pretrain", "--output", str(out), *TINY]
    assert main([*pretrain, "--steps", "1", "--tokenizer", str(tokenizers[0])]) == 0
    capsys.readouterr()
    assert main([*pretrain, "--steps", "2", "--tokenizer", str(tokenizers[1])]) == 2
    one_line_error(capsys, "another tokenizer", "--allow-tokenizer-change")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert main([*pretrain, "--steps", "2", "--tokenizer", str(tokenizers[1]),
                 "--allow-tokenizer-change"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    # The same tokenizer resumes without a word; so does a checkpoint without the checksum.
    assert main([*pretrain, "--steps", "3", "--tokenizer", str(tokenizers[1])]) == 0
    from beitfast._files import DIGEST_KEY, add_digest

    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(payload.pop("tokenizer_sha256")) == 64
    payload.pop(DIGEST_KEY)
    torch.save(add_digest(payload), out / "checkpoint.pt")
    assert main([*pretrain, "--steps", "4", "--tokenizer", str(tokenizers[0])]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


def test_the_resume_line_says_when_the_schedule_changes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "2", "--warmup-steps", "1", "--output", str(out), *TINY,
                 *TINY_TOKENIZER]) == 0
    assert main(["pretrain", "--steps", "3", "--warmup-steps", "1", "--output", str(out), *TINY,
                 *TINY_TOKENIZER]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "resumed from" in line]
    assert lines[0].endswith("at step 2 of 3 (schedule re-planned: steps 2 -> 3)"), lines


@pytest.mark.parametrize("source", ["beitfast", "timm", "hugging-face-folder"])
def test_finetune_from_a_classifier_of_another_class_count_drops_its_head(tmp_path, capsys, source):
    from beitfast import BEiT, BEiTConfig
    from beitfast import checkpoint as formats

    classes = {"beitfast": 5, "timm": 1000, "hugging-face-folder": 10}[source]
    config = BEiTConfig.tiny(img_size=16, patch_size=4, depth=1, vocab_size=0, num_classes=classes,
                             use_mean_pooling=True)
    model = BEiT(config)
    if source == "beitfast":
        pretrained = tmp_path / "classifier.pt"
        model.save(pretrained)
    elif source == "timm":
        pretrained = tmp_path / "timm.pth"
        torch.save(formats.to_timm_state_dict(model), pretrained)
    else:
        import safetensors.torch
        import transformers

        pretrained = tmp_path / "hf"
        transformers.BeitConfig(**model.to_hf_config(), architectures=["BeitForImageClassification"]
                                ).save_pretrained(pretrained)
        safetensors.torch.save_file(model.to_hf_state_dict(), pretrained / "model.safetensors")
    data = labelled_folder(tmp_path / "labelled")
    out = tmp_path / "ft"
    assert main(["finetune", "--pretrained", str(pretrained), "--data", str(data), "--output", str(out),
                 "--steps", "1", "--batch-size", "2", "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"head has {classes} classes, this one 2: its head is dropped" in printed
    tuned = BEiT.from_file(out / "checkpoint.pt")
    assert tuned.config.num_classes == 2
    # The backbone is the pre-trained one, moved by one step of AdamW (lr 1e-3 at most).
    for name, weight in model.state_dict().items():
        if name.startswith(("blocks.", "patch_embed.")) and weight.dim() == 2:
            assert (tuned.state_dict()[name] - weight).abs().max() < 3e-3, name


def undecodable_folder(root, count=4):
    root.mkdir()
    for i in range(count):
        (root / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really" * (i + 1))
    return root


@pytest.mark.parametrize("command", ["pretrain", "tokenizer train"])
def test_a_folder_of_only_undecodable_images_is_one_line(tmp_path, capsys, command):
    data = undecodable_folder(tmp_path / "broken")
    out = tmp_path / ("run" if command == "pretrain" else "tok.safetensors")
    extra = TINY if command == "pretrain" else []
    assert main([*command.split(), "--data", str(data), "--output", str(out), *extra, *TINY_TOKENIZER]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1] == (f"beitfast {command}: error: BatchStream: none of the 4 images of the data set can be "
                         f"decoded")
    # Each image skipped is named in one warning line.
    assert all(line.startswith(f"beitfast {command}: warning: ImageFolder: skipping") for line in lines[:-1])
    assert len(lines) == 5


def test_an_unsafe_tokenizer_pickle_is_refused_in_one_line(tmp_path, capsys):
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (print, ("this ran while loading",))

    path = tmp_path / "encoder.pkl"
    path.write_bytes(pickle.dumps({"encoder": RunsCode()}))
    assert main(["pretrain", "--tokenizer", str(path), "--steps", "1", "--output", str(tmp_path / "run"),
                 *TINY]) == 2
    captured = capsys.readouterr()
    one_line_error_text(captured.err, "--tokenizer", str(path), "refusing to load global 'builtins.print'")
    assert "this ran" not in captured.out


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("step 3 went well\n")
    assert main(["pretrain", "--resume", str(text), "--steps", "1", "--output", str(tmp_path / "run"), *TINY,
                 *TINY_TOKENIZER]) == 2
    one_line_error(capsys, "--resume", "notes.txt", "is not a checkpoint")


def test_a_default_batch_larger_than_the_data_set_is_said_not_refused(tmp_path, capsys):
    # The demo's default batch (32 on CPU) of the 16 embedded photographs: the copies are augmented anew.
    data = labelled_folder(tmp_path / "labelled")  # 6 images
    out = tmp_path / "run"
    no_batch = [a for i, a in enumerate(TINY) if "--batch-size" not in TINY[max(i - 1, 0):i + 1]]
    assert main(["pretrain", "--data", str(data), "--output", str(out), *no_batch, *TINY_TOKENIZER,
                 "--steps", "1"]) == 0
    assert "note: the default batch of 32 repeats the 6 images" in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists()


@settings(derandomize=True, database=None, deadline=None, max_examples=6)
@given(extra=st.integers(1, 100_000))
def test_a_batch_larger_than_the_data_set_is_refused_before_any_work(tmp_path_factory, extra):
    tmp_path = tmp_path_factory.mktemp("data")
    data = labelled_folder(tmp_path / "labelled")  # 6 images
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["pretrain", "--data", str(data), "--output", str(out), *TINY, *TINY_TOKENIZER, "--steps",
                     "1", "--batch-size", str(6 + extra)])
    assert code == 2 and "k-means" not in printed.getvalue() and not out.exists()
    one_line_error_text(err.getvalue(), f"--batch-size {6 + extra} is larger than the data set (6 images")
    pretrained = tmp_path / "p.pt"
    pretrained.write_bytes(b"unused")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["finetune", "--pretrained", str(pretrained), "--data", str(data), "--output", str(out),
                     "--steps", "1", "--device", "cpu", "--batch-size", str(6 + extra)])
    assert code == 2 and not out.exists()
    one_line_error_text(err.getvalue(), f"--batch-size {6 + extra} is larger than the data set (6 images")


def test_finetune_on_labelled_shards_reports_its_files_and_validation_numbers(tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    drawn = []
    for name in ("axvline", "plot"):
        def record(self, *args, _name=name, _original=getattr(matplotlib.axes.Axes, name), **kwargs):
            drawn.append((_name, args, kwargs.get("label")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, record)
    run = tmp_path / "run"
    assert main(["pretrain", "--steps", "1", "--output", str(run), *TINY, *TINY_TOKENIZER]) == 0
    data = labelled_folder(tmp_path / "labelled")
    shards = tmp_path / "shards"
    assert main(["data", "pack", str(data), str(shards), "--labelled", "--images-per-shard", "4"]) == 0
    out = tmp_path / "ft"
    finetune = ["finetune", "--pretrained", str(run / "checkpoint.pt"), "--data", str(shards), "--val-data",
                str(data), "--output", str(out), "--batch-size", "2", "--device", "cpu", "--threads", "1",
                "--no-progress", "--warmup-steps", "1"]
    assert main([*finetune, "--steps", "2"]) == 0
    capsys.readouterr()
    drawn.clear()
    assert main([*finetune, "--steps", "3"]) == 0  # resumed at step 2
    printed = capsys.readouterr().out
    for name, what in (("checkpoint.pt", "checkpoint"), ("metrics.jsonl", "metrics"), ("curves.png", "plot"),
                       ("eval.json", "validation")):
        assert f"{what:>10}: {(out / name).resolve()}" in printed
    numbers = json.loads((out / "eval.json").read_text())
    assert numbers["step"] == 3 and numbers["images"] == 6
    assert set(numbers["per_class"]) == {"circle", "square"}
    assert all(0 <= numbers[key] <= 1 for key in ("top1", "top5")) and numbers["loss"] > 0
    assert numbers["top5"] == 1.0  # two classes: the top 2 hold every label
    assert numbers["top1"] == sum(numbers["per_class"].values()) / 2  # three images per class
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r.get("resumed") for r in records] == [None, True, None]
    # The last drawing marks the resume in each panel and the validation numbers on loss and accuracy.
    assert [args for name, args, _ in drawn if name == "axvline"][-3:] == [(2,)] * 3
    assert ("plot", ([3], [numbers["top1"]], "o"), "validation") in drawn
    assert ("plot", ([3], [numbers["loss"]], "o"), "validation") in drawn

    # Shards without labels cannot be fine-tuned on: one line.
    unlabelled = tmp_path / "unlabelled"
    assert main(["data", "pack", str(data), str(unlabelled)]) == 0
    assert main([*finetune, "--data", str(unlabelled), "--output", str(tmp_path / "ft2"),
                 "--steps", "2"]) == 2
    one_line_error(capsys, "--data", "no class labels", "--labelled")


def test_bench_pytest_runs_the_checkout_suite_or_says_what_it_needs(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    import beitfast.cli

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command, **options: calls.append((command, options)) or 0)
    monkeypatch.chdir(tmp_path)  # not a checkout: the suite of the editable install's checkout is found
    suite = Path(beitfast.cli.__file__).resolve().parents[1] / "benchmarks"
    assert main(["bench", "--pytest", "--", "-k", "masking"]) == 0
    assert calls == [([sys.executable, "-m", "pytest", str(suite), "-k", "masking"], {"cwd": suite})]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark"
                        else find_spec(name, *a))
    assert main(["bench", "--pytest"]) == 2
    one_line_error(capsys, "needs pytest-benchmark", "pip install 'beitfast[dev]'")
    # An installed package (pip install beitfast) has no suite: what to do instead, in one line.
    monkeypatch.setattr(beitfast.cli, "_benchmarks_folder", lambda: None, raising=False)
    assert main(["bench", "--pytest"]) == 2
    one_line_error(capsys, "source checkout", "pip install -e '.[dev]'", "without --pytest")
    assert len(calls) == 1


def test_the_demo_replaces_its_own_earlier_run_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = ["pretrain", "--demo", "--steps", "1", *TINY, *TINY_TOKENIZER]
    assert main(demo) == 0
    assert "replacing" not in capsys.readouterr().out
    assert main(demo) == 0
    assert "replacing the earlier demo run in demo-output/" in capsys.readouterr().out
    # A folder the user names is another matter: the demo starts afresh there only with --overwrite.
    assert main([*demo, "--output", "demo-output"]) == 2
    one_line_error(capsys, "--overwrite", "checkpoint.pt")


@pytest.mark.parametrize("argv,target,resumable", [
    (["finetune", "--pretrained", "p.pt", "--data", "d"], "cmd_finetune", True),
    (["segment", "train"], "cmd_segment_train", True),
    (["segment", "eval", "--model", "m.safetensors", "--data", "d"], "cmd_segment_eval", False),
])
def test_interrupt_says_whether_the_command_resumes(monkeypatch, capsys, argv, target, resumable):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"beitfast.cli.{target}", interrupted)
    assert main(argv) == 130
    err = one_line_error(capsys, "interrupted")
    assert ("resumes from the last checkpoint" in err) == resumable, err
