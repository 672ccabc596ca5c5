"""File integrity: checksums and finiteness checks of checkpoints and tokenizer files, clear errors for
corrupt, truncated and empty files, the trainer's two checkpoints and its fallback to the previous one,
stale temporary files, and the config stored in a training checkpoint."""

import os
import stat

import numpy as np
import pytest
import safetensors.torch
import torch

from beitfast import BEiT, BEiTConfig
from beitfast._files import content_digest, split_digest
from beitfast.checkpoint import FileIntegrityError, read_training_checkpoint
from beitfast.data import ImageList
from beitfast.testing import StopRun, stop_after
from beitfast.tokenizers import KMeansTokenizer, load_tokenizer
from beitfast.train import (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, MaskedImageModeling,
                            NonFiniteLossError, TrainConfig, pretrain)

KIB = 4096


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    yield
    torch.set_num_threads(threads)


def small_model(**overrides) -> BEiT:
    values = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, vocab_size=16,
                  drop_path_rate=0.1, kernels="eager")
    return BEiT(BEiTConfig(**{**values, **overrides}))


def tokenizer() -> KMeansTokenizer:
    """The same tokenizer at every call (runs that are compared must have the same targets)."""
    centroids = torch.rand(16, 3 * 4 * 4, generator=torch.Generator().manual_seed(0))
    return KMeansTokenizer(centroids, input_size=16, patch_size=4)


def images(n: int = 6) -> ImageList:
    rng = np.random.default_rng(0)
    return ImageList([rng.integers(0, 256, (21, 19, 3), dtype=np.uint8) for _ in range(n)])


def train(output, steps, on_step=None, model_config=None, **overrides):
    config = TrainConfig(output_dir=str(output), steps=steps, batch_size=4, warmup_steps=1, lr=2e-3,
                         checkpoint_every=2, progress=False, **overrides)
    return pretrain(model_config or small_model().config, tokenizer(), images(), config, on_step=on_step)


def overwrite_4kib(path) -> None:
    """Random bytes over 4 KiB in the second half of the file (tensor data, not the header)."""
    size = os.path.getsize(path)
    assert size > 4 * KIB
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(1).integers(0, 256, KIB, dtype=np.uint8).tobytes())


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def empty(path) -> None:
    open(path, "wb").close()


DAMAGES = {"overwritten": (overwrite_4kib, "checksum|non-finite|damaged"),
           "truncated": (truncate, "truncated"),
           "empty": (empty, "empty file")}


def assert_refused(load, path, reason):
    with pytest.raises(FileIntegrityError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    assert any(word in message for word in reason.split("|")), message
    assert "\n" not in message  # one line


# -- model files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_damaged_model_files_are_refused(tmp_path, suffix, damage):
    path = tmp_path / f"model{suffix}"
    small_model().save(path)
    corrupt, reason = DAMAGES[damage]
    corrupt(path)
    assert_refused(BEiT.from_file, path, reason)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_model_file_checksum_catches_finite_changes(tmp_path, suffix):
    """A changed weight that is still finite is caught by the checksum alone."""
    model = small_model()
    path = tmp_path / f"model{suffix}"
    model.save(path)
    data = path.read_bytes()
    weight = model.blocks[0].mlp.fc1.weight.detach()
    old = weight.flatten()[:4].numpy().tobytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, (weight.flatten()[:4] + 1).numpy().tobytes()))
    assert_refused(BEiT.from_file, path, "checksum")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_files_without_checksum_get_the_finiteness_check(tmp_path, suffix):
    """Foreign files and files of older versions carry no checksum: accepted when finite."""
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"foreign{suffix}"
    save = safetensors.torch.save_file if suffix == ".safetensors" else torch.save
    save(state, str(path))
    loaded = BEiT.from_file(path, kernels="eager")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    state["blocks.1.attn.proj.weight"][3, 5] = float("nan")
    state["blocks.1.attn.proj.weight"][0, 0] = float("inf")
    save(state, str(path))
    message = r"non-finite weights: 'blocks.1.attn.proj.weight' has 1 NaN and 1 infinite values"
    with pytest.raises(FileIntegrityError, match=message):
        BEiT.from_file(path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_have_the_usual_permissions(tmp_path, umask):
    before = os.umask(umask)
    try:
        for name in ("model.safetensors", "model.pth"):
            small_model().save(tmp_path / name)
        tokenizer().save(tmp_path / "tokenizer.safetensors")
    finally:
        os.umask(before)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_tensor_viewing_more_than_its_storage_is_refused(tmp_path):
    """A damaged stride of 0 makes a view of any size over one element; checks would materialise it."""
    state = small_model().state_dict()
    state["blocks.0.attn.proj.bias"] = torch.zeros(1).expand(32)
    path = tmp_path / "model.pth"
    torch.save(state, path)
    message = r"'blocks.0.attn.proj.bias' has shape \[32\] and strides \[0\]: more elements than its storage"
    with pytest.raises(FileIntegrityError, match=message):
        BEiT.from_file(path)


def test_pickle_with_a_far_memo_slot_is_refused_before_unpickling(tmp_path):
    """The C unpickler zero-fills its memo up to a slot index from the file: a damaged 4-byte index would
    make it write gigabytes. The index here (10**7, 80 MB) is refused before anything is unpickled."""
    from beitfast.tokenizers import DalleTokenizer

    path = tmp_path / "damaged.pth"
    # PROTO 2, NONE, LONG_BINPUT 10**7, STOP
    path.write_bytes(b"\x80\x02N" + b"r" + (10**7).to_bytes(4, "little") + b".")
    message = r"damaged pickle \(ValueError: memo slot 10000000 at opcode 2\)"
    for load in (BEiT.from_file, DalleTokenizer.from_file):
        with pytest.raises(FileIntegrityError, match=message):
            load(path)


# -- tokenizer files -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_tokenizer_files_are_refused(tmp_path, damage):
    path = tmp_path / "tokenizer.safetensors"
    KMeansTokenizer(torch.rand(512, 48), input_size=16, patch_size=4).save(path)
    corrupt, reason = DAMAGES[damage]
    corrupt(path)
    assert_refused(load_tokenizer, path, reason)


def test_tokenizer_file_is_written_atomically(tmp_path, monkeypatch):
    import beitfast.tokenizers.base as base

    path = tmp_path / "tokenizer.safetensors"
    tokenizer().save(path)
    before = path.read_bytes()

    def failing_writer(tensors, target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(base, "save_file", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        tokenizer().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_tokenizer_file_with_non_finite_centroids_is_refused(tmp_path):
    path = tmp_path / "tokenizer.safetensors"
    centroids = torch.rand(16, 48)
    centroids[2, 7] = float("nan")
    KMeansTokenizer(centroids, input_size=16, patch_size=4).save(path)
    with pytest.raises(FileIntegrityError, match=r"non-finite.*'centroids' has 1 NaN"):
        load_tokenizer(path)


# -- any damage ------------------------------------------------------------------------------------


def saved_file(folder, name):
    """Save a model or tokenizer as ``name``; returns ``(path, load, equal)``."""
    path = folder / name
    if name == CHECKPOINT_NAME:
        train(folder, steps=2)
        original = split_digest(torch.load(path, weights_only=True))[0]

        def equal(loaded):  # every entry the trainer reads (damage may rename the digest's key: unused)
            return all(content_digest(loaded.get(key)) == content_digest(value)
                       for key, value in original.items())

        return path, read_training_checkpoint, equal
    if name.startswith("tokenizer"):
        original = tokenizer()
        original.save(path)

        def equal(loaded):
            same_config = loaded.extra_repr() == original.extra_repr()
            return same_config and torch.equal(loaded.centroids, original.centroids)

        return path, load_tokenizer, equal
    original = small_model(layer_norm_eps=1e-3)
    original.save(path)

    def equal(loaded):
        state = original.state_dict()
        return loaded.config == original.config and all(torch.equal(v, state[k])
                                                        for k, v in loaded.state_dict().items())

    return path, BEiT.from_file, equal


@pytest.mark.parametrize("name", ["model.safetensors", "model.pth", "tokenizer.safetensors", CHECKPOINT_NAME])
def test_any_damage_is_refused_or_harmless(tmp_path, name, each_damage):
    """Bytes overwritten anywhere, or the file cut anywhere: the file is refused with a ValueError naming
    it (a FileIntegrityError, or an unknown format when the first bytes are gone), or what loads is exactly
    what was saved (the bytes changed were not read)."""
    path, load, equal = saved_file(tmp_path, name)

    def check():
        try:
            loaded = load(path)
        except ValueError as error:
            assert str(error).startswith(f"{path}: ")
            return
        assert equal(loaded)

    each_damage(path, check)


# -- training checkpoints --------------------------------------------------------------------------


def test_from_file_of_a_training_checkpoint_uses_its_config(tmp_path):
    config = small_model(layer_norm_eps=1e-2, drop_path_rate=0.0).config
    model, _ = train(tmp_path, steps=2, model_config=config)
    loaded = BEiT.from_file(tmp_path / CHECKPOINT_NAME)
    assert loaded.config == config
    images_ = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(images_), model.eval()(images_), rtol=0, atol=0)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_training_checkpoint_is_refused(tmp_path, damage):
    train(tmp_path, steps=2)
    path = tmp_path / CHECKPOINT_NAME
    corrupt, reason = DAMAGES[damage]
    corrupt(path)
    assert_refused(BEiT.from_file, path, reason)
    with pytest.raises(FileIntegrityError, match=str(path)):
        train(tmp_path, steps=4, resume=str(path))


@pytest.mark.parametrize("text", ["step,loss\n1,4.2\n", "{\"model\": 1}", "PK but not a zip"])
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, text):
    path = tmp_path / "notes.txt"
    path.write_text(text)
    with pytest.raises(FileIntegrityError, match="not a torch.save file.*not a checkpoint"):
        read_training_checkpoint(path)
    with pytest.raises(FileIntegrityError, match="not a checkpoint"):
        BEiT.from_file(path)
    with pytest.raises(FileIntegrityError, match="not a checkpoint"):
        train(tmp_path, steps=2, resume=str(path))


def test_fine_tuning_from_a_damaged_checkpoint_is_refused(tmp_path):
    from beitfast.train import classifier_from_pretrained

    train(tmp_path, steps=2)
    assert classifier_from_pretrained(tmp_path / CHECKPOINT_NAME, num_classes=3).head.out_features == 3
    overwrite_4kib(tmp_path / CHECKPOINT_NAME)
    assert_refused(lambda path: classifier_from_pretrained(path, num_classes=3), tmp_path / CHECKPOINT_NAME,
                   "checksum|non-finite|damaged")


def test_training_checkpoint_without_checksum_gets_the_finiteness_check(tmp_path):
    """A checkpoint of an older version (no checksum) resumes; non-finite optimizer state is refused."""
    with pytest.raises(StopRun):
        train(tmp_path, steps=4, on_step=stop_after(3))
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    del payload["beitfast_sha256"]
    torch.save(payload, path)
    _, records = train(tmp_path, steps=4)
    assert [r["step"] for r in records] == [3, 4]
    payload = torch.load(path, weights_only=True)
    del payload["beitfast_sha256"]
    payload["optimizer"]["state"][0]["exp_avg"].view(-1)[0] = float("inf")
    torch.save(payload, path)
    with pytest.raises(FileIntegrityError, match=r"'optimizer.state.0.exp_avg' has 0 NaN and 1 infinite"):
        train(tmp_path, steps=6, resume=str(path))


def test_trainer_keeps_the_last_two_checkpoints(tmp_path):
    train(tmp_path, steps=6)
    steps = [torch.load(tmp_path / name, weights_only=True)["step"]
             for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME)]
    assert steps == [6, 4]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, damage, capsys):
    straight, _ = train(tmp_path / "straight", steps=6)
    with pytest.raises(StopRun):
        train(tmp_path / "resumed", steps=6, on_step=stop_after(5))  # checkpoints of steps 2 and 4
    DAMAGES[damage][0](tmp_path / "resumed" / CHECKPOINT_NAME)
    resumed, records = train(tmp_path / "resumed", steps=6)
    assert [r["step"] for r in records] == [3, 4, 5, 6]
    assert all(torch.equal(v, straight.state_dict()[k]) for k, v in resumed.state_dict().items())
    out = capsys.readouterr()
    damaged, previous = (str(tmp_path / "resumed" / name)
                         for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME))
    lines = [line for line in (out.out + out.err).splitlines() if damaged in line]
    assert len(lines) == 1 and f"{previous} (step 2)" in lines[0], out  # one line: what failed, what is used


def test_resume_refuses_when_no_checkpoint_is_good(tmp_path):
    with pytest.raises(StopRun):
        train(tmp_path, steps=6, on_step=stop_after(5))
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        overwrite_4kib(tmp_path / name)
    with pytest.raises(FileIntegrityError, match=f"{CHECKPOINT_NAME}.*{PREVIOUS_CHECKPOINT_NAME}"):
        train(tmp_path, steps=6)


def test_non_finite_loss_names_a_verified_checkpoint(tmp_path):
    """The newest checkpoint is damaged after it was written: the message names the previous one."""
    def damage_then_poison(step, record):
        if step == 4:
            overwrite_4kib(tmp_path / CHECKPOINT_NAME)
            MaskedImageModeling.__call__ = poisoned

    clean = MaskedImageModeling.__call__

    def poisoned(self, model, batch):
        loss, accuracy, count = clean(self, model, batch)
        return loss * float("nan"), accuracy, count

    try:
        with pytest.raises(NonFiniteLossError) as info:
            train(tmp_path, steps=8, on_step=damage_then_poison)
    finally:
        MaskedImageModeling.__call__ = clean
    message = str(info.value)
    assert "nan at step 5" in message
    assert f"{PREVIOUS_CHECKPOINT_NAME}' (step 2)" in message, message


def test_previous_checkpoint_is_a_copy_where_there_are_no_hard_links(tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise PermissionError("this file system has no hard links")

    monkeypatch.setattr(os, "link", no_hard_links)
    train(tmp_path, steps=4)
    steps = [torch.load(tmp_path / name, weights_only=True)["step"]
             for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME)]
    assert steps == [4, 2]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_stale_temporary_files_are_removed(tmp_path):
    ours = [f".{CHECKPOINT_NAME}.a1b2c3d4.tmp", f".{PREVIOUS_CHECKPOINT_NAME}.x_9kq0zz.tmp",
            ".metrics.jsonl.abcdefgh.tmp"]
    others = [f".{CHECKPOINT_NAME}.a1b2c3d4.tmp.keep", "notes.tmp", ".other.abcdefgh.tmp",
              f".{CHECKPOINT_NAME}.toolongname.tmp"]
    tmp_path.mkdir(exist_ok=True)
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ours[0]).write_bytes(b"x")
    train(tmp_path, steps=2)
    left = set(os.listdir(tmp_path))
    assert not left & set(ours)
    assert set(others) <= left
    assert (tmp_path / "sub" / ours[0]).exists()
