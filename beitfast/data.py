"""Data for pre-training and fine-tuning: image folders, the embedded photographs, and resumable batch
streams; the official augmentation (:mod:`beitfast.augment`) is re-exported from here.

Every random choice of a sample (which image, crop, jitter, flip, mask) comes from a generator seeded
by ``(seed, step, position in the global batch)``. A batch is therefore a pure function of its step:
resuming at step ``k`` only needs ``k``, DataLoader workers need no shared state, and ``W`` processes
with ``batch_size / W`` samples each see exactly the samples of one process with the whole batch.
A sample maker may leave part of the work to the training process: ``BatchStream.prepare(batch,
device)`` finishes a batch there (the device input path of :mod:`beitfast.pipeline`).
"""

from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .augment import (  # the official augmentation, shared with beitfast.pipeline: re-exported here
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER_OPERATIONS,
    ClassifyTransform,
    DecodeError,
    EvalTransform,
    TwoViewTransform,
    apply_color_jitter,
    color_jitter,
    decode_rgb,
    draw_flip_and_box,
    draw_jitter,
    flip_and_crop_box,
    normalize,
    random_resized_crop_box,
    to_tensor,
)
from .masking import MaskingGenerator, batch_masks, derive_seed
from .pipeline import DevicePretrainSample, FastPretrainSample

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "derive_seed", "TwoViewTransform",
    "ClassifyTransform", "EvalTransform", "ImageFolder", "find_images", "ImageList", "embedded_photos",
    "BatchStream", "pretrain_stream", "classify_stream", "masking_for", "eval_batches", "tokenizer_views",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# -- image sources ---------------------------------------------------------------------------------


class ImageSource(Protocol):
    """What a stream reads: ``len(source)`` images; ``source.load(i)`` the decoded RGB image, or None
    if it cannot be decoded; ``source.open(i)`` the image opened but not yet decoded (so that a fast
    path can ask a JPEG decoder for a reduced size first), or None; ``source.read(i)`` the image as
    stored: the encoded file's bytes (for a decoder elsewhere, such as nvJPEG), the image itself for an
    in-memory source, or None if it cannot be read; ``source.reject(i, error)`` records an image that
    failed to decode after ``open`` or ``read``; ``source.labels`` a class index per image, or None."""

    labels: Sequence[int] | None

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image | None: ...

    def open(self, index: int) -> Image.Image | None: ...

    def read(self, index: int) -> bytes | Image.Image | None: ...

    def reject(self, index: int, error: Exception) -> None: ...


class ImageFiles:
    """Shared by sources of encoded images: ``load`` = ``open`` + decode, undecodable images skipped
    (``load``, ``open`` and ``read`` return None), counted in ``skipped`` and named in a warning.
    Subclasses implement ``_open(index)``, returning a lazily decoding PIL image, and ``_read(index)``,
    the encoded bytes."""

    def __init__(self):
        self.bad: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def _open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _read(self, index: int) -> bytes:
        raise NotImplementedError

    def reject(self, index: int, error: Exception) -> None:
        self.bad.add(index)
        warnings.warn(
            f"{type(self).__name__}: skipping {self._name(index)!r} ({type(error).__name__}: {error}); "
            f"{self.skipped} undecodable image(s) skipped so far",
            stacklevel=3,
        )

    def open(self, index: int) -> Image.Image | None:
        if index in self.bad:
            return None
        try:
            return self._open(index)
        except Exception as error:  # PIL raises many types for corrupt files
            self.reject(index, error)
            return None

    def read(self, index: int) -> bytes | None:
        if index in self.bad:
            return None
        try:
            return self._read(index)
        except OSError as error:
            self.reject(index, error)
            return None

    def load(self, index: int) -> Image.Image | None:
        image = self.open(index)
        if image is None:
            return None
        try:
            return decode_rgb(image)  # PIL closes a file it opened once the pixels are read
        except Exception as error:
            self.reject(index, error)
            return None


class ImagePaths(ImageFiles):
    """Encoded images read from the files ``self.paths`` (set by the subclass)."""

    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def _name(self, index: int) -> str:
        return str(self.paths[index])

    def _open(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])

    def _read(self, index: int) -> bytes:
        return self.paths[index].read_bytes()


class ImageList:
    """Images already in memory (PIL images or ``[H, W, 3]``/``[H, W]`` uint8 arrays)."""

    def __init__(self, images: Sequence, labels: Sequence[int] | None = None):
        if len(images) == 0:
            raise ValueError("ImageList: images is empty")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"ImageList: {len(images)} images but {len(labels)} labels")
        self.images = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
        self.labels = None if labels is None else [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return self.images[index]

    open = read = load  # nothing is encoded

    def reject(self, index: int, error: Exception) -> None:
        raise RuntimeError(f"ImageList: image {index} is in memory, yet failed to decode") from error


def find_images(root: str | os.PathLike, extensions=IMAGE_EXTENSIONS
                ) -> tuple[list[Path], dict[str, list[Path]]]:
    """Every file under ``root`` (recursive, following links to folders) whose suffix is in
    ``extensions``, sorted, and what was passed over, by reason: ``"suffix"`` (other files),
    ``"unreadable"`` (a broken link, or no permission to read it or its folder), ``"loop"`` (a link to a
    folder already walked, such as an ancestor: followed, it would never end or list images twice)."""
    suffixes = {e.lower() for e in extensions}
    paths: list[Path] = []
    ignored: dict[str, list[Path]] = {"suffix": [], "unreadable": [], "loop": []}
    walked = {Path(root).resolve()}

    def unreadable_folder(error: OSError) -> None:
        ignored["unreadable"].append(Path(error.filename))

    for folder, folders, files in os.walk(root, onerror=unreadable_folder, followlinks=True):
        for name in sorted(folders):
            real = Path(folder, name).resolve()
            if real in walked:
                folders.remove(name)
                ignored["loop"].append(Path(folder, name))
            walked.add(real)
        for name in files:
            path = Path(folder, name)
            if path.suffix.lower() not in suffixes:
                ignored["suffix"].append(path)
            elif not (path.is_file() and os.access(path, os.R_OK)):
                ignored["unreadable"].append(path)
            else:
                paths.append(path)
    return sorted(paths), ignored


class ImageFolder(ImagePaths):
    """Every image under ``root`` (``find_images``: recursive, following links to folders, extensions in
    ``IMAGE_EXTENSIONS``, sorted paths); ``ignored`` lists what was passed over, by reason, and
    ``found`` says both in a line.

    With ``labelled=True`` the first-level sub-folders are the classes (ImageNet layout); images beside
    them are ignored (reason ``"outside a class folder"``). Files that fail to decode are skipped:
    ``load`` returns None, ``skipped`` counts them and a warning names them.
    """

    def __init__(self, root: str | os.PathLike, labelled: bool = False, extensions=IMAGE_EXTENSIONS):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: data folder {str(self.root)!r} does not exist or is not a folder")
        self.paths, self.ignored = find_images(self.root, extensions)
        if not self.paths:
            raise ValueError(
                f"ImageFolder: no images under {str(self.root)!r} (looked for "
                f"{', '.join(sorted({e.lower() for e in extensions}))}; {self._ignored_line()})"
            )
        self.labels = None
        self.classes: list[str] = []
        if labelled:
            self.ignored["outside a class folder"] = [p for p in self.paths if p.parent == self.root]
            self.paths = [p for p in self.paths if p.parent != self.root]
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths})
            if not self.classes:
                raise ValueError(f"ImageFolder: labelled data needs class sub-folders under {str(self.root)!r}")
            index = {name: i for i, name in enumerate(self.classes)}
            self.labels = [index[p.relative_to(self.root).parts[0]] for p in self.paths]

    def _ignored_line(self) -> str:
        counts = [(len(paths), reason) for reason, paths in self.ignored.items() if paths]
        if not counts:
            return "skipped none"
        reasons = {"suffix": "without an image suffix", "loop": "link to a folder already walked"}
        return f"skipped {sum(n for n, _ in counts)}: " + ", ".join(f"{n} {reasons.get(r, r)}"
                                                                    for n, r in counts)

    @property
    def found(self) -> str:
        """``"found N images under ROOT; skipped M: ..."``, for a command's header."""
        return f"found {len(self.paths)} images under {str(self.root)!r}; {self._ignored_line()}"


# Real colour photographs shipped with scikit-image, and two grey ones (converted to RGB).
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "stereo_motorcycle", "camera", "coins", "moon", "grass", "gravel", "brick")


def embedded_photos(max_side: int = 256) -> ImageList:
    """The embedded default data set: photographs from scikit-image's ``skimage.data`` and
    scikit-learn's ``load_sample_images`` (china, flower), all RGB, shrunk so the longer side is at
    most ``max_side`` (jitter and crops then cost little; the views are smaller anyway)."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as error:
        raise ImportError(
            "the embedded photographs need scikit-image and scikit-learn: pip install 'beitfast[data]'"
        ) from error
    arrays = []
    for name in _SKIMAGE_PHOTOS:
        array = getattr(skimage.data, name)()
        arrays.append(array[0] if isinstance(array, tuple) else array)  # stereo pair: left image
    arrays.extend(load_sample_images().images)
    images = []
    for array in arrays:
        image = Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")
        shrink = max_side / max(image.size)
        if shrink < 1:
            image = image.resize((round(image.width * shrink), round(image.height * shrink)), Image.Resampling.LANCZOS)
        images.append(image)
    return ImageList(images)


# -- masks -----------------------------------------------------------------------------------------


def masking_for(grid: tuple[int, int], mask_ratio: float = 0.4, min_num_patches: int | None = None) -> dict:
    """MaskingGenerator arguments for a patch grid: BEiT's 75 of 196 (ratio ~0.4) with blocks of at
    least 16 patches at 14x14; smaller grids scale the minimum block with the grid."""
    num_patches = grid[0] * grid[1]
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    num_masking = max(1, int(round(mask_ratio * num_patches)))
    if (grid[0], grid[1]) == (14, 14) and mask_ratio == 0.4:
        num_masking = 75
    if min_num_patches is None:
        min_num_patches = max(1, round(16 * num_patches / 196))
    return {"input_size": tuple(grid), "num_masking_patches": num_masking,
            "min_num_patches": min(min_num_patches, num_masking)}


# -- streams ---------------------------------------------------------------------------------------


class BatchStream(torch.utils.data.IterableDataset):
    """An endless stream of batches; batch ``step`` is ``make_sample(image, label, rng, key)`` over the
    global batch positions this rank owns, ``rng`` being a ``random.Random`` seeded by
    ``(seed, step, position)``, collated by ``make_sample.collate(samples, seed, step, positions)``
    when it has one (else each part is stacked).

    A sample maker with ``decodes = True`` gets the image opened but not decoded (``source.open``),
    one with ``encoded = True`` the image as stored (``source.read``: bytes, or an in-memory image); both
    raise ``DecodeError`` when they cannot decode it. A sample maker with ``prepare(batch, device,
    stream)`` finishes its batches in the training process, on the training device (``prepare``).

    Images are visited in a fresh random permutation every epoch (of the source). Iterating yields the
    batches of ``start_step, start_step + 1, ...``; DataLoader workers take every ``num_workers``-th
    step, which keeps the order of a single process.
    """

    def __init__(self, source: ImageSource, make_sample: Callable, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, start_step: int = 0):
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(
                f"BatchStream: batch_size must be a positive multiple of the world size {world_size}, "
                f"got {batch_size}"
            )
        self.source, self.make_sample = source, make_sample
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self._permutation: tuple[int, list[int]] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def _order(self, epoch: int) -> list[int]:
        if self._permutation is None or self._permutation[0] != epoch:
            order = list(range(len(self.source)))
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
            self._permutation = (epoch, order)
        return self._permutation[1]

    def sample(self, step: int, position: int, make_sample: Callable | None = None):
        """The sample at ``position`` of global batch ``step``, made by ``make_sample`` (default: the
        stream's own sample maker)."""
        make_sample = self.make_sample if make_sample is None else make_sample
        n = len(self.source)
        epoch, offset_in_epoch = divmod(step * self.batch_size + position, n)
        order = self._order(epoch)
        if getattr(make_sample, "encoded", False):
            get = self.source.read
        else:
            get = self.source.open if getattr(make_sample, "decodes", False) else self.source.load
        # An undecodable image is replaced by the next decodable one of the same permutation; the
        # random draws restart, so the replacement gets the draws the first image would have had.
        for offset in range(n):
            i = order[(offset_in_epoch + offset) % n]
            image = get(i)
            if image is None:
                continue
            labels = self.source.labels
            rng = random.Random(derive_seed(self.seed, step, position))
            try:
                return make_sample(image, None if labels is None else labels[i], rng,
                                   (self.seed, step, position))
            except DecodeError as error:
                self.source.reject(i, error.__cause__ or error)
        raise ValueError(f"BatchStream: none of the {n} images of the data set can be decoded")

    def batch(self, step: int, limit: int | None = None) -> tuple[torch.Tensor, ...]:
        """This rank's part of global batch ``step``, collated; with ``limit``, only its first ``limit``
        samples (the same ones the whole part starts with)."""
        first = self.rank * self.local_batch_size
        size = self.local_batch_size if limit is None else min(limit, self.local_batch_size)
        positions = range(first, first + size)
        samples = [self.sample(step, j) for j in positions]
        collate = getattr(self.make_sample, "collate", None)
        if collate is not None:
            return collate(samples, self.seed, step, positions)
        return tuple(torch.stack(parts) for parts in zip(*samples))

    def prepare(self, batch, device: torch.device):
        """A batch of this stream (as ``batch`` or iterating made it, in this process or a DataLoader
        worker) as the training step takes it, on ``device``: the sample maker's ``prepare(batch,
        device, stream)`` when it has one (the device input path makes its views there), else each
        tensor moved."""
        prepare = getattr(self.make_sample, "prepare", None)
        if prepare is not None:
            return prepare(batch, device, self)
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def iterate(self, start_step: int, num_workers: int, device: torch.device):
        """The batches from ``start_step`` on, made in this process (``num_workers`` 0) or in DataLoader
        worker processes, pinned for a CUDA ``device``; ``prepare(batch, device)`` makes each the step's
        input."""
        self.start_step = start_step
        if num_workers == 0:
            return iter(self)
        # Creating the iterator draws a seed from the loader's generator: from torch's global one, that
        # draw would shift drop path (and differ from a run without workers). The batches use no torch
        # randomness (they are functions of the step), so a generator of its own changes nothing else.
        loader = torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
            prefetch_factor=4, generator=torch.Generator(),
        )
        return iter(loader)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers


class PretrainSample:
    """One pre-training sample: the two views; a batch adds its blockwise masks ``[b, Wh * Ww]``."""

    def __init__(self, transform: TwoViewTransform, masking: dict):
        self.transform, self.masking = transform, masking

    def __call__(self, image, label, rng, key):
        return self.transform(image, rng)

    def collate(self, samples, seed: int, step: int, positions: range) -> tuple[torch.Tensor, ...]:
        model_views, tokenizer_views = (torch.stack(parts) for parts in zip(*samples))
        return model_views, tokenizer_views, batch_masks(self.masking, seed, step, positions)


class ClassifySample:
    """One fine-tuning sample: the augmented image and its label."""

    def __init__(self, transform: ClassifyTransform):
        self.transform = transform

    def __call__(self, image, label, rng, key):
        if label is None:
            raise ValueError("classification needs labelled data (class sub-folders or labels)")
        return self.transform(image, rng), torch.tensor(label, dtype=torch.long)


def pretrain_stream(source: ImageSource, transform: TwoViewTransform, masking: dict, batch_size: int,
                    fast: bool = True, on_device: bool = False, **stream_args) -> BatchStream:
    """Batches ``(model_views [b,3,S,S], tokenizer_views [b,3,s,s], masks [b,N] bool)`` once
    ``stream.prepare(batch, device)`` has made them, on that device. ``on_device``: through
    ``beitfast.pipeline.DevicePretrainSample`` (the batch holds encoded JPEGs and the random draws; its
    views are made on the device by ``prepare``); else ``fast``: through
    ``beitfast.pipeline.FastPretrainSample`` (same draws, small documented approximations, several
    times faster), else ``PretrainSample`` (``transform`` itself, the official order)."""
    if on_device:
        return BatchStream(source, DevicePretrainSample(transform, masking), batch_size, **stream_args)
    if fast:
        return BatchStream(source, FastPretrainSample(transform, masking), batch_size, **stream_args)
    return BatchStream(source, PretrainSample(transform, masking), batch_size, **stream_args)


def classify_stream(source: ImageSource, transform: ClassifyTransform, batch_size: int, **stream_args) -> BatchStream:
    """Batches ``(images [b,3,S,S], labels [b])``."""
    if source.labels is None:
        raise ValueError("classify_stream: the data set has no labels (use class sub-folders)")
    return BatchStream(source, ClassifySample(transform), batch_size, **stream_args)


class TokenizerViewSample:
    def __init__(self, transform: TwoViewTransform):
        self.transform = transform

    def __call__(self, image, label, rng, key):
        return (self.transform.tokenizer_view(image, rng),)


def tokenizer_views(source: ImageSource, count: int, size: int, seed: int = 0, batch_size: int = 1024,
                    progress: bool = False):
    """``count`` augmented tokenizer views ``[b, 3, size, size]`` in ``[0, 1]``, in batches: the data a
    k-means tokenizer is fitted on (the distribution it will tokenize during pre-training).
    ``progress``: a progress bar of the views made (tqdm, on stderr)."""
    stream = BatchStream(source, TokenizerViewSample(TwoViewTransform(size, size)), batch_size,
                         seed=derive_seed(seed, "tokenizer"))
    with tqdm(total=count, desc="tokenizer views", unit="view", disable=not progress) as bar:
        for step in range(math.ceil(count / batch_size)):
            views = stream.batch(step, limit=count - step * batch_size)[0]
            bar.update(len(views))
            yield views


def eval_batches(source: ImageSource, transform: EvalTransform, batch_size: int, rank: int = 0, world_size: int = 1):
    """Every decodable image once, in order (this rank's share): yields ``(images, labels)``."""
    if source.labels is None:
        raise ValueError("eval_batches: the data set has no labels (use class sub-folders)")
    images, labels = [], []
    for i in range(rank, len(source), world_size):
        image = source.load(i)
        if image is None:
            continue
        images.append(transform(image))
        labels.append(source.labels[i])
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
