"""Sharded tar files in the WebDataset layout: data sets of millions of images as a few hundred files.

A shard ``<prefix>-000000.tar`` holds, per sample, its encoded image ``<key>.<ext>`` (the original file's
bytes and extension) and, for labelled data, ``<key>.cls`` (the class index as text); keys are the
sample's index in the data set, zero-padded, so the files of one sample are adjacent. ``pack_shards``
(``beitfast data pack``) writes them from an image folder.

``ShardedImages`` reads them as an image source for ``BatchStream``: it indexes every member once
(tar headers only) and reads a sample with one seek. Under ``torchrun`` every rank opens the same
shards and reads only the samples of its part of each global batch (``BatchStream(rank=...,
world_size=...)``), so every sample is seen exactly once per epoch over all ranks, the order is the
global shuffle of the stream and resuming at a step stays exact. Undecodable images are skipped and
counted (``skipped``), as in ``ImageFolder``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from PIL import Image

from ._files import _umask
from .data import IMAGE_EXTENSIONS, ImageFiles, ImageFolder

__all__ = ["pack_shards", "ShardedImages", "shard_paths"]

LABEL_EXTENSION = "cls"
CLASSES_NAME = "classes.json"  # beside labelled shards: the class names, in index order


def shard_paths(location: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The shards of ``location``: a folder (its ``*.tar`` files, sorted), one tar file, or a list."""
    if isinstance(location, (str, os.PathLike)):
        location = Path(location)
        if location.is_dir():
            paths = sorted(location.glob("*.tar"))
            if not paths:
                raise ValueError(f"shards: no .tar files in the folder {str(location)!r}")
            return paths
        location = [location]
    paths = [Path(p) for p in location]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shards: shard {str(path)!r} does not exist or is not a file")
    if not paths:
        raise ValueError("shards: no shard files given")
    return paths


def pack_shards(folder: str | os.PathLike, output: str | os.PathLike, images_per_shard: int = 1000,
                labelled: bool = False, prefix: str = "shard") -> list[Path]:
    """Write every image of ``ImageFolder(folder, labelled)`` into tar shards of ``images_per_shard``
    samples in ``output`` (a new or empty folder); returns the shard paths. The files are copied, not
    decoded (an undecodable one is skipped when read). Labelled shards come with ``classes.json``, the
    class names in index order. The set is written into a hidden folder beside ``output`` and renamed to
    ``output`` at the end: a failure or a kill leaves no partial set that a reader would accept."""
    if isinstance(images_per_shard, bool) or not isinstance(images_per_shard, int) or images_per_shard < 1:
        raise ValueError(f"pack_shards: images_per_shard must be a positive int, got {images_per_shard!r}")
    output = Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise FileExistsError(f"pack_shards: output {str(output)!r} must be a new or empty folder")
    source = ImageFolder(folder, labelled=labelled)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
    digits = max(6, len(str(len(source) - 1)))
    names = []
    try:
        for first in range(0, len(source), images_per_shard):
            names.append(f"{prefix}-{len(names):06d}.tar")
            with tarfile.open(partial / names[-1], "w", format=tarfile.PAX_FORMAT) as tar:
                for i in range(first, min(first + images_per_shard, len(source))):
                    key = f"{i:0{digits}d}"
                    tar.add(source.paths[i], arcname=f"{key}{source.paths[i].suffix.lower()}")
                    if source.labels is not None:
                        _add_bytes(tar, f"{key}.{LABEL_EXTENSION}", str(source.labels[i]).encode())
        if labelled:
            (partial / CLASSES_NAME).write_text(json.dumps(source.classes) + "\n")
        for entry in partial.iterdir():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp makes an owner-only folder
        os.replace(partial, output)  # one rename publishes the whole set (over an empty folder too)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return [output / name for name in names]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class ShardedImages(ImageFiles):
    """The samples of WebDataset-layout tar shards (``shard_paths``), in shard then member order.

    ``labels`` are the ``.cls`` class indices when every sample has one, else None. Open files are
    per process (DataLoader workers reopen them).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike]):
        super().__init__()
        self.shards = shard_paths(shards)
        self.entries: list[tuple[int, int, int, str]] = []  # (shard, offset, size, member name)
        keys: list[tuple[int, str]] = []
        class_of: dict[tuple[int, str], int] = {}
        for shard_index, path in enumerate(self.shards):
            size = path.stat().st_size
            try:
                with tarfile.open(path, "r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        if member.offset_data + member.size > size:
                            raise tarfile.ReadError(f"{member.name} ends past the end of the file")
                        # WebDataset: a sample's files share the path up to the first dot of the file name.
                        folder, name = os.path.split(member.name)
                        stem, _, extension = name.partition(".")
                        key, extension = (shard_index, os.path.join(folder, stem)), extension.lower()
                        if extension == LABEL_EXTENSION:
                            class_of[key] = int(tar.extractfile(member).read().decode().strip())
                        elif f".{extension}" in IMAGE_EXTENSIONS:  # other files of a sample are ignored
                            keys.append(key)
                            self.entries.append((shard_index, member.offset_data, member.size, member.name))
            except (tarfile.TarError, EOFError, UnicodeDecodeError, ValueError) as error:
                raise ValueError(f"ShardedImages: shard {str(path)!r} is truncated or damaged, not a "
                                 f"readable tar file ({type(error).__name__}: {error})") from None
        if not self.entries:
            raise ValueError(f"ShardedImages: no images in the {len(self.shards)} shard(s) given")
        self.labels = [class_of[key] for key in keys] if all(key in class_of for key in keys) else None
        # Class names: classes.json beside the shards (`beitfast data pack --labelled` writes it), else the
        # indices themselves.
        self.classes: list[str] = []
        if self.labels is not None:
            names = self.shards[0].parent / CLASSES_NAME
            self.classes = (json.loads(names.read_text()) if names.is_file()
                            else [str(i) for i in range(max(self.labels) + 1)])
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def _name(self, index: int) -> str:
        shard, _, _, name = self.entries[index]
        return f"{self.shards[shard]}:{name}"

    def _read(self, index: int) -> bytes:
        shard, offset, size, _ = self.entries[index]
        if self._pid != os.getpid():  # a forked worker must not share the parent's file positions
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        file = self._files[shard]
        file.seek(offset)
        return file.read(size)

    def _open(self, index: int) -> Image.Image:
        return Image.open(io.BytesIO(self._read(index)))

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}
