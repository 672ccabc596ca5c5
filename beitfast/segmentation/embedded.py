"""An embedded segmentation task, no download: scenes composed from the photographs the package embeds
(:func:`beitfast.data.embedded_photos`).

Each scene is a ``size`` x ``size`` canvas cut into 2 to 5 blob-shaped regions (a multiplicatively
weighted Voronoi partition: curved borders); each region shows a crop of one class photograph (brick,
grass, gravel, coins, coffee, the cat), a different one per region, at a random position and scale. The
label mask is exact: every pixel is the class of the photograph it was copied from.

The splits are disjoint in their pixels: training scenes copy from the first 70% of each photograph's
width, validation scenes from the last 30%, so a validation scene shows no pixel a training scene showed.
Scenes are functions of ``(seed, split, index)``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..data import _SKIMAGE_PHOTOS, ImageList, embedded_photos
from ..masking import derive_seed

__all__ = ["EMBEDDED_CLASSES", "EmbeddedScenes", "embedded_scenes"]

# The class photographs (names in skimage.data): three grey textures, a grey scene, two colour photographs.
EMBEDDED_CLASSES = ("brick", "grass", "gravel", "coins", "coffee", "chelsea")
SPLITS = {"training": (0.0, 0.7), "validation": (0.7, 1.0)}  # the share of each photograph's width
DEFAULT_COUNTS = {"training": 400, "validation": 100}
PHOTO_SIDE = 256  # the photographs' longer side: a region's crop is a quarter to a half of it
MAX_REGIONS = 5


class EmbeddedScenes(ImageList):
    """Scenes in memory with their label masks, read as :class:`beitfast.segmentation.data.SegmentationFolder`
    is: ``labels`` holds each scene's mask (``[H, W]`` int64, what the stream hands the sample maker),
    ``mask(i)`` gives it, ``num_classes``, ``classes`` (names) and ``reduce_zero_label`` (False)."""

    reduce_zero_label = False

    def __init__(self, images: list[Image.Image], masks: list[torch.Tensor], classes: tuple[str, ...],
                 split: str):
        super().__init__(images)
        self.labels = masks
        self.classes, self.num_classes, self.split = list(classes), len(classes), split

    def mask(self, index: int) -> torch.Tensor:
        return self.labels[index]

    @property
    def found(self) -> str:
        return (f"{len(self)} embedded {self.split} scenes of {self.images[0].width} px, "
                f"{self.num_classes} classes ({', '.join(self.classes)})")


def _regions(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """A ``[size, size]`` partition into ``count`` regions: each pixel goes to the centre nearest by
    weighted distance (distance / weight), which gives curved borders; every region keeps its centre."""
    centres = rng.uniform(0, size, (count, 2))
    weights = rng.uniform(0.6, 1.4, count)
    grid = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij"), -1)
    distances = np.linalg.norm(grid[None] - centres[:, None, None], axis=-1) / weights[:, None, None]
    return distances.argmin(0)


def _texture(rng: np.random.Generator, photo: Image.Image, split: str, size: int) -> np.ndarray:
    """A square crop of ``photo``'s part for ``split``, a quarter to a half of the photograph's longer
    side (at most the part's width and height), resized to ``size``: ``[size, size, 3]`` uint8."""
    low, high = SPLITS[split]
    left, right = round(photo.width * low), round(photo.width * high)
    largest = min(right - left, photo.height, PHOTO_SIDE // 2)
    side = int(rng.integers(min(PHOTO_SIDE // 4, largest), largest + 1))
    x = left + int(rng.integers(0, right - left - side + 1))
    y = int(rng.integers(0, photo.height - side + 1))
    crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.uint8)


def embedded_scenes(split: str = "training", count: int | None = None, size: int = 64,
                    seed: int = 0) -> EmbeddedScenes:
    """``count`` scenes of ``split`` ("training": 400 by default, "validation": 100), ``size`` pixels
    square, with their exact label masks (:data:`EMBEDDED_CLASSES` are the classes, in order); the same
    for the same arguments on every machine. Needs scikit-image and scikit-learn (the data extra)."""
    if split not in SPLITS:
        raise ValueError(f"embedded_scenes: split must be one of {sorted(SPLITS)}, got {split!r}")
    count = DEFAULT_COUNTS[split] if count is None else count
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"embedded_scenes: count must be a positive integer, got {count!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"embedded_scenes: size must be an integer of at least 8 pixels, got {size!r}")
    photos = embedded_photos(max_side=PHOTO_SIDE)
    classes = [photos.images[_SKIMAGE_PHOTOS.index(name)] for name in EMBEDDED_CLASSES]
    images, masks = [], []
    for index in range(count):
        rng = np.random.default_rng(derive_seed(seed, "embedded scenes", split, index))
        regions = _regions(rng, size, int(rng.integers(2, MAX_REGIONS + 1)))
        present = np.unique(regions)  # a region may lose every pixel to its neighbours
        chosen = rng.choice(len(classes), size=len(present), replace=False)
        pixels = np.zeros((size, size, 3), np.uint8)
        labels = np.zeros((size, size), np.int64)
        for region, label in zip(present, chosen):
            inside = regions == region
            pixels[inside] = _texture(rng, classes[label], split, size)[inside]
            labels[inside] = label
        images.append(Image.fromarray(pixels))
        masks.append(torch.from_numpy(labels))
    return EmbeddedScenes(images, masks, EMBEDDED_CLASSES, split)
