"""The trainer: schedules, parameter groups, exact resume, the non-finite-loss stop, DDP equivalence,
fine-tuning and bad input."""

import json
import math
import os
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beitfast import BEiT, BEiTConfig
from beitfast.data import ClassifyTransform, EvalTransform, ImageFolder, ImageList, classify_stream
from beitfast.testing import StopRun, free_port, leaving_the_group, stop_after
from beitfast.train import (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, Classification, MaskedImageModeling,
                            NonFiniteLossError, TrainConfig, Trainer, classifier_from_pretrained, cosine_schedule,
                            evaluate, layer_id, param_groups, pretrain, pretraining_trainer, resolve_device)


pytestmark = pytest.mark.usefixtures("one_thread")


class MeanBrightnessTokenizer(torch.nn.Module):
    """A stand-in tokenizer: the token of a patch is its quantised mean brightness."""

    def __init__(self, vocab_size=16, input_size=16, patch_size=4):
        super().__init__()
        self.vocab_size, self.input_size, self.patch_size = vocab_size, input_size, patch_size

    @torch.no_grad()
    def tokenize(self, images):
        means = F.avg_pool2d(images.float().mean(1, keepdim=True), self.patch_size)[:, 0]
        return (means * self.vocab_size).long().clamp(0, self.vocab_size - 1)


def photos(n=6, size=(37, 29), labels=None):
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        base = rng.integers(0, 256, (3,))
        noise = rng.integers(-40, 40, (size[1], size[0], 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return ImageList(images, labels)


def tiny_config(**overrides):
    return BEiTConfig.tiny(**{"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2,
                              "vocab_size": 16, "drop_path_rate": 0.1, **overrides})


def train_config(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path), "steps": 6, "batch_size": 4, "warmup_steps": 2, "lr": 2e-3,
              "checkpoint_every": 3, "progress": False, **overrides}
    return TrainConfig(**values)


# -- schedules and groups --------------------------------------------------------------------------


def official_cosine(base, final, total, warmup, start_warmup=0.0):
    """The official schedule array (BEiT's utils.cosine_scheduler with one iteration per epoch)."""
    warm = np.linspace(start_warmup, base, warmup)
    iters = np.arange(total - warmup)
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 0), (50, 1), (9, 8)])
def test_cosine_schedule_matches_official(total, warmup):
    expected = official_cosine(1.5e-3, 1e-5, total, warmup, start_warmup=1e-6)
    got = [cosine_schedule(s, 1.5e-3, 1e-5, total, warmup, start_warmup=1e-6) for s in range(total)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert cosine_schedule(total + 5, 1.5e-3, 1e-5, total, warmup) == 1e-5


def test_cosine_schedule_values():
    assert cosine_schedule(0, 1.0, 0.0, 110, 11) == 0.0
    assert cosine_schedule(5, 1.0, 0.0, 110, 11) == pytest.approx(0.5)
    assert cosine_schedule(10, 1.0, 0.0, 110, 11) == 1.0
    assert cosine_schedule(11, 1.0, 0.0, 110, 11) == 1.0
    assert cosine_schedule(11 + 50, 1.0, 0.2, 111, 11) == pytest.approx(0.6, abs=1e-12)  # half way
    values = [cosine_schedule(s, 1.0, 0.1, 110, 11) for s in range(11, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_param_groups_no_decay_sets():
    model = BEiT(tiny_config(use_abs_pos_emb=True))
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["decay"] for n in g["names"]}
    plain = {n for g in groups if not g["decay"] for n in g["names"]}
    assert {"cls_token", "mask_token", "pos_embed", "blocks.0.attn.q_bias", "blocks.1.gamma_1",
            "blocks.0.norm1.weight", "lm_head.bias", "patch_embed.proj.bias", "norm.weight"} <= plain
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "lm_head.weight",
            "rel_pos_bias.relative_position_bias_table", "blocks.1.mlp.fc2.weight"} <= decayed
    assert decayed | plain == {n for n, _ in model.named_parameters()}
    assert all(g["weight_decay"] == (0.05 if g["decay"] else 0.0) for g in groups)
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_param_groups_layer_decay():
    model = BEiT(tiny_config(vocab_size=0, num_classes=5, depth=3))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.65)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert scale["rel_pos_bias.relative_position_bias_table"] == 1.0
    assert scale["blocks.2.mlp.fc1.weight"] == pytest.approx(0.65)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 3)
    assert scale["cls_token"] == pytest.approx(0.65 ** 4) and scale["patch_embed.proj.weight"] == pytest.approx(0.65 ** 4)
    assert layer_id("blocks.11.attn.proj.weight", 14) == 12 and layer_id("pos_embed", 14) == 0


def test_param_groups_skip_frozen():
    model = BEiT(tiny_config(vocab_size=0, num_classes=3))
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
    names = {n for g in param_groups(model, 0.05) for n in g["names"]}
    assert names == {"head.weight", "head.bias"}


# -- pre-training runs -----------------------------------------------------------------------------


def run_pretrain(tmp_path, config=None, tokenizer=None, source=None, **train_overrides):
    return pretrain(config or tiny_config(), tokenizer or MeanBrightnessTokenizer(), source or photos(),
                    train_config(tmp_path, **train_overrides))


def jpeg_photos(folder, truncated=False):
    """``photos()`` as JPEG files (decoded on the device by the device input path) and one PNG file
    (decoded in the workers); with ``truncated``, also a JPEG cut in half (its header whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = photos().images
    for i, image in enumerate(images[:-1]):
        image.save(folder / f"{i}.jpg", quality=90)
    images[-1].save(folder / "last.png")
    if truncated:
        (folder / "0.jpg").write_bytes((folder / "0.jpg").read_bytes()[:500])
    return ImageFolder(folder)


def test_pretrain_writes_outputs_and_learns(tmp_path):
    model, records = run_pretrain(tmp_path, steps=12, checkpoint_every=5, lr=5e-3)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in records)
    assert np.mean([r["loss"] for r in records[-3:]]) < np.mean([r["loss"] for r in records[:3]])
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(5e-3)
    lines = (tmp_path / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))
    assert (tmp_path / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    payload = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert payload["step"] == 12
    assert all(torch.equal(payload["model"][k], v) for k, v in model.state_dict().items())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("input_path", ["auto", "device"])
def test_resume_is_exact(tmp_path, input_path):
    """On CPU "auto" is the CPU input path; "device" makes the views in the training process (with
    JPEG files decoded by decode_jpeg)."""
    source = jpeg_photos(tmp_path / "images") if input_path == "device" else photos()
    _, straight = run_pretrain(tmp_path / "straight", steps=6, source=source, input_path=input_path)

    # Stopped after step 4, which was logged but not checkpointed: resume must redo it.
    with pytest.raises(StopRun):
        pretrain(tiny_config(), MeanBrightnessTokenizer(), source,
                 train_config(tmp_path / "resumed", steps=6, input_path=input_path), on_step=stop_after(4))
    model, rest = run_pretrain(tmp_path / "resumed", steps=6, source=source, input_path=input_path)
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert [r["loss"] for r in rest] == [r["loss"] for r in straight[3:]]  # bit-identical on CPU
    assert [r["accuracy"] for r in rest] == [r["accuracy"] for r in straight[3:]]
    lines = (tmp_path / "resumed" / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))
    final = torch.load(tmp_path / "straight" / CHECKPOINT_NAME, weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_workers_do_not_change_the_run(tmp_path):
    """Batches from 0, 1 or 2 DataLoader workers: the same run bit for bit, drop path included."""
    runs = {}
    for workers in (0, 1, 2):
        model, records = run_pretrain(tmp_path / str(workers), steps=3, num_workers=workers)
        runs[workers] = [(r["loss"], r["accuracy"], r["grad_norm"]) for r in records], model.state_dict()
    assert tiny_config().drop_path_rate > 0
    for workers in (1, 2):
        assert runs[workers][0] == runs[0][0]
        assert all(torch.equal(value, runs[0][1][key]) for key, value in runs[workers][1].items())


class RecordingTask(MaskedImageModeling):
    """Masked image modeling that keeps a copy of every batch the step gives it."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.batches = []

    def __call__(self, model, batch):
        self.batches.append([t.clone() for t in batch])
        return super().__call__(model, batch)


def test_device_input_path_feeds_the_step(tmp_path):
    """With input_path "device" (on CPU here: the same code, decode_jpeg on CPU) the step gets exactly
    the stream's batches as ``prepare`` makes them on the device (tests/test_pipeline.py checks those
    against DeviceTwoView), a truncated JPEG skipped with a warning; with 2 DataLoader workers the run
    is the same, bit for bit."""
    from beitfast.data import TwoViewTransform, masking_for, pretrain_stream
    from beitfast.pipeline import DevicePretrainSample

    source = jpeg_photos(tmp_path / "images", truncated=True)
    trainer = pretraining_trainer(tiny_config(), MeanBrightnessTokenizer(), source,
                                  train_config(tmp_path / "0", steps=2, warmup_steps=1, input_path="device"))
    assert isinstance(trainer.stream.make_sample, DevicePretrainSample)
    trainer.task = RecordingTask(trainer.task.tokenizer)
    with pytest.warns(UserWarning, match=r"skipping .*0\.jpg"):
        records = trainer.fit()
    assert source.skipped == 1
    stream = pretrain_stream(jpeg_photos(tmp_path / "again", truncated=True), TwoViewTransform(16, 16),
                             masking_for(tiny_config().grid), 4, on_device=True)
    for step, batch in enumerate(trainer.task.batches):
        with warnings.catch_warnings():  # a fresh source finds the truncated file again
            warnings.simplefilter("ignore")
            expected = stream.prepare(stream.batch(step), torch.device("cpu"))
        assert len(batch) == 3 and all(torch.equal(a, b) for a, b in zip(batch, expected))
    _, with_workers = run_pretrain(tmp_path / "2", steps=2, warmup_steps=1, source=jpeg_photos(tmp_path / "b"),
                                   input_path="device", num_workers=2)
    _, without = run_pretrain(tmp_path / "0b", steps=2, warmup_steps=1, source=jpeg_photos(tmp_path / "b"),
                              input_path="device")
    assert [r["loss"] for r in with_workers] == [r["loss"] for r in without]
    assert all(math.isfinite(r["loss"]) for r in records + with_workers)


def test_input_path_auto_is_the_cpu_path_on_cpu(tmp_path):
    from beitfast.pipeline import FastPretrainSample

    trainer = pretraining_trainer(tiny_config(), MeanBrightnessTokenizer(), photos(), train_config(tmp_path))
    assert trainer.config.input_path == "auto" and isinstance(trainer.stream.make_sample, FastPretrainSample)


@pytest.mark.gpu
def test_input_path_auto_decodes_on_the_gpu(tmp_path):
    """On CUDA the default input path decodes the JPEGs with nvJPEG and makes the views on the GPU."""
    from beitfast.pipeline import DevicePretrainSample

    trainer = pretraining_trainer(tiny_config(), MeanBrightnessTokenizer(), jpeg_photos(tmp_path / "images"),
                                  train_config(tmp_path / "run", steps=2, warmup_steps=1, device="cuda"))
    assert isinstance(trainer.stream.make_sample, DevicePretrainSample)
    batch = trainer.stream.batch(0)
    assert any(isinstance(image, bytes) for image in batch.images)
    views = trainer.stream.prepare(batch, trainer.device)
    assert all(t.is_cuda for t in views)
    decoded = trainer.stream.make_sample._views.decode(batch.images)
    assert all(image.is_cuda for image in decoded)
    assert all(math.isfinite(r["loss"]) for r in trainer.fit())


def test_progress_lines_and_resume_notice(tmp_path, capsys):
    with pytest.raises(StopRun):
        pretrain(tiny_config(), MeanBrightnessTokenizer(), photos(), train_config(tmp_path, log_every=2),
                 on_step=stop_after(4))

    def step_lines(text):
        return [line.split(":")[0] for line in text.splitlines() if line.startswith("pretrain step")]

    assert step_lines(capsys.readouterr().out) == ["pretrain step 2/6", "pretrain step 4/6"]
    trainer = pretraining_trainer(tiny_config(), MeanBrightnessTokenizer(), photos(),
                                  train_config(tmp_path, log_every=2))
    assert [r["step"] for r in trainer.fit()] == [4, 5, 6]
    assert trainer.resumed_from == (tmp_path / CHECKPOINT_NAME, 3)
    printed = capsys.readouterr().out
    assert f"pretrain: resumed from {tmp_path / CHECKPOINT_NAME} at step 3 of 6" in printed
    assert step_lines(printed) == ["pretrain step 4/6", "pretrain step 6/6"]


def test_ignored_invalid_labels_are_reported(tmp_path, monkeypatch, capsys):
    # On a GPU the fused losses ignore a masked token whose label lies outside [0, V) and count it on the
    # device (no host sync); the trainer reads the count in its one sync per step. On CPU such a label
    # is an error at once, so the device counter is stood in for here: 3 at step 2, none elsewhere.
    import beitfast.train as train_module

    counts = iter([0, 3, 0, 0, 0, 0])
    resets = []
    monkeypatch.setattr(train_module, "invalid_label_count", lambda device: torch.tensor(next(counts)))
    monkeypatch.setattr(train_module, "reset_invalid_label_count", lambda: resets.append(True))
    _, records = run_pretrain(tmp_path, steps=4, checkpoint_every=4)
    assert [r["invalid_labels"] for r in records] == [0, 3, 0, 0]
    assert resets == [True]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "outside [0, vocab_size)" in line]
    assert len(warnings) == 1 and "step 2: 3 masked token(s)" in warnings[0]


class NaNAtStep(MaskedImageModeling):
    def __init__(self, tokenizer, bad_call):
        super().__init__(tokenizer)
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, model, batch):
        loss, accuracy, count = super().__call__(model, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.bad_call else loss), accuracy, count


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    from beitfast.data import TwoViewTransform, masking_for, pretrain_stream

    config = tiny_config()
    tc = train_config(tmp_path, steps=8, checkpoint_every=2)
    stream = pretrain_stream(photos(), TwoViewTransform(16, 16), masking_for(config.grid), 4)
    saved = {}

    def remember(step, record):
        if step % tc.checkpoint_every == 0:
            saved[step] = (tmp_path / CHECKPOINT_NAME).read_bytes()

    trainer = Trainer(BEiT(config), NaNAtStep(MeanBrightnessTokenizer(), bad_call=5), stream, tc, on_step=remember)
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5.*last good checkpoint.*step 4"):
        trainer.fit()
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == saved[4]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 4
    assert max(saved) == 4


class InfiniteGradientAtStep(MaskedImageModeling):
    """A finite loss whose gradient is infinite from call ``bad_call`` on."""

    def __init__(self, tokenizer, bad_call):
        super().__init__(tokenizer)
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.bad_call:
            model.cls_token.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return super().__call__(model, batch)


@pytest.mark.parametrize("poisoned", ["loss", "gradient"])
def test_non_finite_step_is_skipped_on_the_device_and_read_after_the_optimizer(tmp_path, monkeypatch,
                                                                                poisoned):
    # The step's one synchronisation (where invalid_label_count is read) comes after optimizer.step(),
    # which skips a non-finite step itself; the run stops there with the last good checkpoint intact and
    # the model and optimizer as that checkpoint has them.
    import beitfast.train as train_module
    from beitfast.data import TwoViewTransform, masking_for, pretrain_stream

    config = tiny_config()
    tc = train_config(tmp_path, steps=8, checkpoint_every=2)
    stream = pretrain_stream(photos(), TwoViewTransform(16, 16), masking_for(config.grid), 4)
    poisoning = NaNAtStep if poisoned == "loss" else InfiniteGradientAtStep
    task = poisoning(MeanBrightnessTokenizer(), bad_call=5)
    trainer = Trainer(BEiT(config), task, stream, tc)
    events = []
    step, count = trainer.optimizer.step, train_module.invalid_label_count
    monkeypatch.setattr(trainer.optimizer, "step", lambda: (events.append("optimizer"), step())[1])
    monkeypatch.setattr(train_module, "invalid_label_count",
                        lambda device: (events.append("sync"), count(device))[1])
    if poisoned == "loss":
        message = r"nan at step 5"
    else:
        message = r"gradient norm became (inf|nan) \(loss [0-9.]+\) at step 5"
    message += r".*update was skipped.*last good checkpoint.*step 4"
    with pytest.raises(NonFiniteLossError, match=message):
        trainer.fit()
    assert events == ["optimizer", "sync"] * 5
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 4
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    state = trainer.optimizer.state_dict()["state"]
    assert all(float(s["step"]) == 4 for s in state.values())
    for key, s in state.items():
        assert torch.equal(s["exp_avg"], saved["optimizer"]["state"][key]["exp_avg"]), key


# -- DDP -------------------------------------------------------------------------------------------


def _ddp_worker(rank, world_size, port, output):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with leaving_the_group():
        _, records = pretrain(tiny_config(drop_path_rate=0.0), MeanBrightnessTokenizer(), photos(),
                              TrainConfig(output_dir=output, steps=4, batch_size=4, warmup_steps=1, lr=2e-3,
                                          checkpoint_every=2, progress=False))
        if rank == 0:
            with open(os.path.join(output, "losses.json"), "w") as f:
                json.dump([r["loss"] for r in records], f)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    _, single = pretrain(tiny_config(drop_path_rate=0.0), MeanBrightnessTokenizer(), photos(),
                         TrainConfig(output_dir=str(tmp_path / "one"), steps=4, batch_size=4, warmup_steps=1,
                                     lr=2e-3, checkpoint_every=2, progress=False))
    # Spawned workers unpickle this module by its import name (tests.test_train) with the parent's
    # sys.path: put the root there for the duration of this test only.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    np.testing.assert_allclose(losses, [r["loss"] for r in single], rtol=1e-5)
    one = torch.load(tmp_path / "one" / CHECKPOINT_NAME, weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / CHECKPOINT_NAME, weights_only=True)
    assert two["world_size"] == 2 and len(two["rng"]) == 2
    for key, value in one.items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-6)


# -- fine-tuning -----------------------------------------------------------------------------------


def test_finetune_from_checkpoint_and_linear_probe(tmp_path):
    run_pretrain(tmp_path / "pre", steps=2, warmup_steps=1, checkpoint_every=2)
    labelled = photos(n=8, labels=[0, 1, 2, 0, 1, 2, 0, 1])
    model = classifier_from_pretrained(tmp_path / "pre" / CHECKPOINT_NAME, num_classes=3)
    pre = torch.load(tmp_path / "pre" / CHECKPOINT_NAME, weights_only=True)["model"]
    assert torch.equal(model.blocks[1].mlp.fc1.weight, pre["blocks.1.mlp.fc1.weight"])
    assert model.head.out_features == 3 and model.lm_head is None

    stream = classify_stream(labelled, ClassifyTransform(16), batch_size=4)
    tc = train_config(tmp_path / "ft", steps=3, layer_decay=0.65, label_smoothing=0.1)
    records = Trainer(model, Classification(tc.label_smoothing), stream, tc).fit()
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    eval_transform = EvalTransform(16, crop_pct=1.0)
    accuracy = evaluate(model, labelled, eval_transform, batch_size=3)
    assert 0 <= accuracy <= 1
    with torch.no_grad():  # the same count over one batch of every image
        images = torch.stack([eval_transform(labelled.load(i)) for i in range(len(labelled))])
        logits = model.eval()(images)
    model.train()
    assert accuracy == pytest.approx((logits.argmax(-1) == torch.tensor(labelled.labels)).double().mean().item())

    probe = classifier_from_pretrained(tmp_path / "pre" / CHECKPOINT_NAME, num_classes=3)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    tc = train_config(tmp_path / "probe", steps=2, warmup_steps=1, linear_probe=True)
    Trainer(probe, Classification(0.0), classify_stream(labelled, ClassifyTransform(16), 4), tc).fit()
    changed = {k for k, v in probe.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}


# -- bad input -------------------------------------------------------------------------------------


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        run_pretrain(blocker / "out")


def test_tokenizer_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 32 != model vocab_size 16"):
        run_pretrain(tmp_path, tokenizer=MeanBrightnessTokenizer(vocab_size=32))
    with pytest.raises(ValueError, match="grid 2x2"):
        run_pretrain(tmp_path, tokenizer=MeanBrightnessTokenizer(input_size=16, patch_size=8))


def test_compile_also_compiles_the_tokenizer_encoder(tmp_path):
    """TrainConfig.compile compiles the DALL-E encoder in place: the same tokens as the eager encoder."""
    from beitfast.tokenizers import DalleTokenizer

    tokenizer = DalleTokenizer(n_hid=8, n_blk_per_group=1, vocab_size=16, input_size=32)
    eager = DalleTokenizer(n_hid=8, n_blk_per_group=1, vocab_size=16, input_size=32)
    eager.load_state_dict(tokenizer.state_dict())
    pretraining_trainer(tiny_config(), tokenizer, photos(), train_config(tmp_path, compile=True))
    assert tokenizer.encoder._compiled_call_impl is not None and eager.encoder._compiled_call_impl is None
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(tokenizer.tokenize(images), eager.tokenize(images), rtol=0, atol=0)
    pretraining_trainer(tiny_config(), eager, photos(), train_config(tmp_path / "plain"))
    assert eager.encoder._compiled_call_impl is None  # not without compile


def test_resume_other_architecture(tmp_path):
    run_pretrain(tmp_path, steps=2, warmup_steps=1, checkpoint_every=2)
    with pytest.raises(ValueError, match="another architecture.*embed_dim: checkpoint 32 vs model 64"):
        run_pretrain(tmp_path, config=tiny_config(embed_dim=64), steps=4)
    with pytest.raises(ValueError, match="batch_size=4"):
        run_pretrain(tmp_path, steps=4, batch_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_pretrain(tmp_path / "other", resume=str(tmp_path / "missing.pt"))


def test_device_that_is_not_there(tmp_path):
    absent = f"cuda:{torch.cuda.device_count()}"  # "cuda" itself on a machine without a GPU
    with pytest.raises(ValueError, match=f"device '{absent}'"):
        resolve_device(absent)
    with pytest.raises(ValueError, match=f"device '{absent}'"):
        run_pretrain(tmp_path, device=absent)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_warmup_must_end_before_the_run(tmp_path):
    with pytest.raises(ValueError, match=r"warmup_steps \(6\) must be smaller than steps \(6\)"):
        train_config(tmp_path, steps=6, warmup_steps=6)
    assert train_config(tmp_path, steps=1, warmup_steps=0).warmup_steps == 0


def test_train_config_errors(tmp_path):
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        train_config(tmp_path, steps=0)
    with pytest.raises(ValueError, match="precision"):
        train_config(tmp_path, precision="fp8")
    with pytest.raises(ValueError, match=r"TrainConfig: input_path must be one of \['auto', 'cpu', 'device'\], "
                                         r"got 'gpu'"):
        train_config(tmp_path, input_path="gpu")
    with pytest.raises(ValueError, match="layer_decay"):
        train_config(tmp_path, layer_decay=1.5)
    with pytest.raises(ValueError, match="num_classes > 0"):
        Classification().check(tiny_config())


@pytest.mark.gpu
def test_pretrain_on_gpu_bf16(tmp_path):
    """bf16 autocast on the GPU with the automatic kernel choice: finite losses, the loss falls."""
    model, records = pretrain(tiny_config(), MeanBrightnessTokenizer(), photos(),
                              train_config(tmp_path, steps=12, lr=5e-3, device="cuda"))
    assert next(model.parameters()).is_cuda
    assert all(math.isfinite(r["loss"]) for r in records)
    assert np.mean([r["loss"] for r in records[-3:]]) < np.mean([r["loss"] for r in records[:3]])
    checkpoint = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert "cuda" in checkpoint["rng"][0] and checkpoint["step"] == 12
