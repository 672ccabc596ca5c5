"""Sharded tar files in the WebDataset layout: data sets of millions of images as a few hundred files.

A shard ``<prefix>-000000.tar`` holds, per sample, its encoded image ``<key>.<ext>`` (the original file's
bytes and extension) and, for labelled data, ``<key>.cls`` (the class index as text); keys are the
sample's index in the data set, zero-padded, so the files of one sample are adjacent. ``pack_shards``
(``beitfast data pack``) writes them from an image folder.

Segmentation pairs (``pack_shards(masks=...)``, ``beitfast data pack --masks``) add ``<key>.seg.<ext>``,
the mask file's bytes, and ``segmentation.json`` beside the shards (the class count and whether
``reduce_zero_label`` applies); :class:`ShardedSegmentation` reads them.

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

__all__ = ["pack_shards", "ShardedImages", "ShardedSegmentation", "shard_paths"]

LABEL_EXTENSION = "cls"
MASK_EXTENSION = "seg"  # a sample's mask: <key>.seg.<the mask file's extension>
CLASSES_NAME = "classes.json"  # beside labelled shards: the class names, in index order
SEGMENTATION_NAME = "segmentation.json"  # beside segmentation shards: num_classes, reduce_zero_label


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


def _segmentation_pairs(folder, masks, num_classes, reduce_zero_label):
    """The pairs of ``SegmentationFolder(folder, masks, ...)``, each mask decoded once and checked (labels
    in range, the image's size): a bad pair is refused naming its files before anything is written."""
    from .segmentation.data import SegmentationFolder, load_mask

    if num_classes is None:
        raise ValueError("pack_shards: segmentation pairs (masks) need num_classes")
    source = SegmentationFolder(folder, masks, num_classes, reduce_zero_label)
    for path, mask in zip(source.paths, source.labels):
        labels = load_mask(mask, num_classes, reduce_zero_label)
        with Image.open(path) as image:
            size = image.size
        if size != (labels.shape[1], labels.shape[0]):
            raise ValueError(f"mask {str(mask)!r} is {labels.shape[1]}x{labels.shape[0]} (width x height), "
                             f"its image {str(path)!r} {size[0]}x{size[1]}: they must match")
    return source


def pack_shards(folder: str | os.PathLike, output: str | os.PathLike, images_per_shard: int = 1000,
                labelled: bool = False, prefix: str = "shard", masks: str | os.PathLike | None = None,
                num_classes: int | None = None, reduce_zero_label: bool = False) -> list[Path]:
    """Write every image of ``ImageFolder(folder, labelled)`` into tar shards of ``images_per_shard``
    samples in ``output`` (a new or empty folder); returns the shard paths. The files are copied, not
    decoded (an undecodable one is skipped when read). Labelled shards come with ``classes.json``, the
    class names in index order. With ``masks`` (a folder of masks with the images' stems, as
    :class:`beitfast.segmentation.data.SegmentationFolder` pairs them) each image's mask goes beside it,
    checked first, and ``segmentation.json`` records ``num_classes`` and ``reduce_zero_label``. The set is
    written into a hidden folder beside ``output`` and renamed to ``output`` at the end: a failure or a
    kill leaves no partial set that a reader would accept."""
    if isinstance(images_per_shard, bool) or not isinstance(images_per_shard, int) or images_per_shard < 1:
        raise ValueError(f"pack_shards: images_per_shard must be a positive int, got {images_per_shard!r}")
    if masks is not None and labelled:
        raise ValueError("pack_shards: labelled (class folders) and masks (segmentation) exclude each other")
    output = Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise FileExistsError(f"pack_shards: output {str(output)!r} must be a new or empty folder")
    if masks is not None:
        source = _segmentation_pairs(folder, masks, num_classes, reduce_zero_label)
        mask_paths, source.labels = source.labels, None
    else:
        source, mask_paths = ImageFolder(folder, labelled=labelled), None
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
                    if mask_paths is not None:
                        mask = mask_paths[i]
                        tar.add(mask, arcname=f"{key}.{MASK_EXTENSION}{mask.suffix.lower()}")
        if labelled:
            (partial / CLASSES_NAME).write_text(json.dumps(source.classes) + "\n")
        if mask_paths is not None:
            meta = {"num_classes": num_classes, "reduce_zero_label": reduce_zero_label}
            (partial / SEGMENTATION_NAME).write_text(json.dumps(meta) + "\n")
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
        mask_of: dict[tuple[int, str], tuple[int, int, int, str]] = {}
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
                        elif extension.startswith(f"{MASK_EXTENSION}."):
                            mask_of[key] = (shard_index, member.offset_data, member.size, member.name)
                        elif f".{extension}" in IMAGE_EXTENSIONS:  # other files of a sample are ignored
                            keys.append(key)
                            self.entries.append((shard_index, member.offset_data, member.size, member.name))
            except (tarfile.TarError, EOFError, UnicodeDecodeError, ValueError) as error:
                raise ValueError(f"ShardedImages: shard {str(path)!r} is truncated or damaged, not a "
                                 f"readable tar file ({type(error).__name__}: {error})") from None
        if not self.entries:
            raise ValueError(f"ShardedImages: no images in the {len(self.shards)} shard(s) given")
        self.labels = [class_of[key] for key in keys] if all(key in class_of for key in keys) else None
        # Segmentation pairs: each image's mask entry, when every image has one.
        self.mask_entries = [mask_of[key] for key in keys] if all(key in mask_of for key in keys) else None
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

    def _read(self, index: int, entries=None) -> bytes:
        shard, offset, size, _ = (entries or self.entries)[index]
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


class ShardMasks:
    """The masks of segmentation shards as a sequence: item ``i`` is image ``i``'s labels, ``[H, W]``
    int64, read and decoded when asked for (:func:`beitfast.segmentation.data.load_mask`)."""

    def __init__(self, shards: "ShardedSegmentation"):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int):
        from .segmentation.data import load_mask

        source = self.shards
        shard, _, _, name = source.mask_entries[index]
        return load_mask(io.BytesIO(source._read(index, source.mask_entries)), source.num_classes,
                         source.reduce_zero_label, name=f"{source.shards[shard]}:{name}")


class ShardedSegmentation(ShardedImages):
    """Segmentation pairs from shards of ``pack_shards(masks=...)``, read as a
    :class:`beitfast.segmentation.data.SegmentationFolder` is: ``labels[i]`` and ``mask(i)`` give image
    ``i``'s labels; ``num_classes`` and ``reduce_zero_label`` come from ``segmentation.json``."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike]):
        super().__init__(shards)
        meta = self.shards[0].parent / SEGMENTATION_NAME
        if self.mask_entries is None or not meta.is_file():
            raise ValueError(f"ShardedSegmentation: the shards in {str(self.shards[0].parent)!r} hold no "
                             f"masks (or no {SEGMENTATION_NAME}): pack them with `beitfast data pack "
                             f"--masks`")
        values = json.loads(meta.read_text())
        self.num_classes = int(values["num_classes"])
        self.reduce_zero_label = bool(values["reduce_zero_label"])
        self.labels = ShardMasks(self)

    def mask(self, index: int):
        return self.labels[index]

    @property
    def found(self) -> str:
        return f"{len(self)} image/mask pairs of {self.num_classes} classes in {len(self.shards)} shard(s)"
