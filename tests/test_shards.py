"""Sharded tar files (WebDataset layout): packing a folder, reading it back as an image source, bad
files skipped and counted, and ranks of a gloo process group seeing every sample once per epoch."""

import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from beitfast.data import BatchStream, ClassifyTransform, ImageFolder, classify_stream
from beitfast.shards import ShardedImages, pack_shards, shard_paths
from beitfast.testing import leaving_the_group


def write_identified_images(root, count: int, bad: int = 0):
    """``count`` lossless PNGs whose pixels encode their index (red = index), in two class folders,
    and ``bad`` undecodable files."""
    for i in range(count):
        folder = root / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((5 + i % 3, 7, 3), (i, 255 - i, 7), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    for i in range(bad):
        (root / "odd" / f"zz_broken{i}.jpg").write_bytes(b"\xff\xd8 definitely not a JPEG" * (i + 2))


def identity(image) -> int:
    return int(np.asarray(image)[0, 0, 0])


def test_pack_and_read_back_every_image_and_label(tmp_path):
    write_identified_images(tmp_path / "images", count=11)
    shards = pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=4, labelled=True)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(shards[0]) as tar:  # WebDataset layout: <key>.<ext> next to <key>.cls
        assert tar.getnames()[:2] == ["000000.png", "000000.cls"]
    folder = ImageFolder(tmp_path / "images", labelled=True)
    sharded = ShardedImages(tmp_path / "shards")
    assert len(sharded) == len(folder) == 11
    assert sharded.labels == folder.labels and sorted(set(sharded.labels)) == [0, 1]
    for i in range(len(folder)):
        assert np.array_equal(np.asarray(sharded.load(i)), np.asarray(folder.load(i)))
    images, labels = classify_stream(sharded, ClassifyTransform(8, scale=(1, 1)), batch_size=11).batch(0)
    assert images.shape == (11, 3, 8, 8) and sorted(labels.tolist()) == sorted(folder.labels)


def test_read_gives_the_stored_bytes_for_the_device_path(tmp_path):
    """``read`` (what the device input path's workers take) is each file's bytes, from a shard as from
    the folder, so both sources make the same device-path batches."""
    from beitfast.data import TwoViewTransform, masking_for, pretrain_stream

    write_identified_images(tmp_path / "images", count=5)
    pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=2)
    folder, sharded = ImageFolder(tmp_path / "images"), ShardedImages(tmp_path / "shards")
    assert all(sharded.read(i) == folder.paths[i].read_bytes() for i in range(len(folder)))
    streams = [pretrain_stream(source, TwoViewTransform(8, 4), masking_for((2, 2)), 5, on_device=True)
               for source in (folder, sharded)]
    views = [stream.prepare(stream.batch(0), torch.device("cpu")) for stream in streams]
    assert all(torch.equal(a, b) for a, b in zip(*views))


def test_unlabelled_shards_and_shard_lists(tmp_path):
    write_identified_images(tmp_path / "images", count=5)
    shards = pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=2)
    source = ShardedImages([str(p) for p in shards[1:]])
    assert source.labels is None and len(source) == 3
    # The folder's sorted order: even/0, even/2, even/4, odd/1, odd/3; the first shard holds 0 and 2.
    assert [identity(source.load(i)) for i in range(3)] == [4, 1, 3]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    write_identified_images(tmp_path / "images", count=4, bad=2)
    pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=3)
    source = ShardedImages(tmp_path / "shards")
    assert len(source) == 6
    stream = BatchStream(source, lambda image, label, rng, key: (torch.tensor(identity(image)),), batch_size=6)
    with pytest.warns(UserWarning, match=r"skipping .*shard-00000\d.tar:00000\d.jpg"):
        (ids,) = stream.batch(0)
    assert source.skipped == 2
    assert set(ids.tolist()) <= {0, 1, 2, 3} and len(ids) == 6


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        shard_paths([tmp_path / "missing.tar"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar files"):
        shard_paths(tmp_path / "empty")
    write_identified_images(tmp_path / "images", count=2)
    with pytest.raises(ValueError, match="images_per_shard must be a positive int, got 0"):
        pack_shards(tmp_path / "images", tmp_path / "out", images_per_shard=0)
    with tarfile.open(tmp_path / "text.tar", "w") as tar:
        tar.add(__file__, arcname="000000.txt")
    with pytest.raises(ValueError, match="no images"):
        ShardedImages(tmp_path / "text.tar")


class IdentitySample:
    def __call__(self, image, label, rng, key):
        return (torch.tensor(identity(image)),)


def _rank_main(rank: int, world_size: int, shards: str, rendezvous: str, steps: int, batch_size: int, out: str):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    with leaving_the_group():
        stream = BatchStream(ShardedImages(shards), IdentitySample(), batch_size, seed=5,
                             rank=dist.get_rank(), world_size=dist.get_world_size())
        mine = torch.cat([stream.batch(step)[0] for step in range(steps)])
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            torch.save(torch.stack(gathered), out)


def test_two_gloo_ranks_see_every_sample_once_per_epoch(tmp_path):
    count, batch_size, world_size = 12, 4, 2
    write_identified_images(tmp_path / "images", count=count)
    pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=5)
    steps = 2 * count // batch_size  # two epochs
    out = tmp_path / "seen.pt"
    # fork: a spawned process could not import this test module (the repository root is off sys.path).
    mp.start_processes(_rank_main, args=(world_size, str(tmp_path / "shards"), str(tmp_path / "rendezvous"), steps,
                                         batch_size, str(out)), nprocs=world_size, join=True, start_method="fork")
    seen = torch.load(out)  # [rank, steps * local batch]
    local = batch_size // world_size
    # Global order: step-major, then rank, then position within the rank's part.
    order = seen.view(world_size, steps, local).permute(1, 0, 2).reshape(-1)
    for epoch in range(2):
        assert sorted(order[epoch * count:(epoch + 1) * count].tolist()) == list(range(count))
    assert not torch.equal(order[:count], order[count:])  # each epoch its own shuffle
    for rank in range(world_size):  # and each rank really got a different part
        assert not torch.equal(seen[rank], seen[1 - rank])


def test_a_failed_pack_leaves_no_shard_set(tmp_path, monkeypatch):
    write_identified_images(tmp_path / "images", count=5)
    calls = []
    add = tarfile.TarFile.add

    def fail_on_the_fourth(self, *args, **kwargs):  # in the second shard: the first is complete
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "add", fail_on_the_fourth)
    with pytest.raises(OSError, match="No space left"):
        pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=3)
    monkeypatch.undo()
    assert not (tmp_path / "shards").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    # The same command again writes the whole set; a second pack into it is refused, not mixed in.
    assert len(pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=3)) == 2
    assert len(ShardedImages(tmp_path / "shards")) == 5
    with pytest.raises(FileExistsError, match="new or empty folder"):
        pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=2)


@pytest.mark.parametrize("cut", [0.01, 0.3, 0.5, 0.99])
def test_a_truncated_shard_is_named(tmp_path, cut):
    write_identified_images(tmp_path / "images", count=5)
    shards = pack_shards(tmp_path / "images", tmp_path / "shards", images_per_shard=3)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:int(len(data.rstrip(b"\0")) * cut)])  # a cut into the contents
    with pytest.raises(ValueError, match=rf"shard '.*{shards[1].name}' is truncated or damaged"):
        ShardedImages(tmp_path / "shards")
