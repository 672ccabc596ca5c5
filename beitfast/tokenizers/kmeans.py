"""A k-means patch tokenizer: trained in minutes on the user's own images, no download needed.

Each ``patch_size`` x ``patch_size`` RGB patch of the tokenizer view becomes a vector of ``3 p^2``
values, normalised per patch, and its token is the index of the nearest centroid.

Why per-patch normalisation (subtract the patch mean, divide by ``sqrt(variance + floor^2)``, over
all its pixels and channels): without it, most of a patch's variance is its mean brightness and
colour, and k-means spends most of the vocabulary on shades of flat patches (Coates, Lee & Ng,
2011, found brightness and contrast normalisation essential for k-means on image patches). With it,
tokens describe structure (edges, textures, relative colour), which is what masked image modelling
should predict: MAE (He et al., 2022) reports better representations with per-patch normalised
pixel targets. ``contrast_floor`` keeps near-flat patches from having their noise blown up to full
contrast: patches with a standard deviation well below it stay near zero and share "flat" tokens.

Training is mini-batch k-means (Sculley, 2010): each centre moves to the running mean of all patches
assigned to it so far; centres no patch chose for a while restart at patches far from every centre.
Seeding is k-means++ (Arthur & Vassilvitskii, 2007) over distinct patches, drawing ``k / 64``
centres per round so that a vocabulary of 8192 seeds in seconds. The patches come from a uniform
random sample (reservoir) of at most ``max_patches`` patches of the data, so any number of images fits
in bounded memory. Everything random draws from one ``torch.Generator`` seeded with ``seed``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from .base import Tokenizer, check_images, check_patch_size

__all__ = ["KMeansTokenizer", "normalized_patches"]

logger = logging.getLogger(__name__)

DEFAULT_CONTRAST_FLOOR = 0.05
# Rows per distance matmul: bounds the [rows, vocab] score matrix (128 MiB at vocab 8192).
_ROWS_PER_CHUNK = 4096
# Images normalised at once while sampling patches (bounds the float32 copy of a large tensor).
_IMAGES_PER_CHUNK = 256
_SEEDING_ROUNDS = 64
_REASSIGN_EVERY = 10


def normalized_patches(images: torch.Tensor, patch_size: int, contrast_floor: float) -> torch.Tensor:
    """``[B, 3, S, S]`` in [0, 1] -> ``[B, (S/p)^2, 3 p^2]`` float32 patches (row-major patch order,
    channel-major values), each with zero mean and variance ``v / (v + contrast_floor^2)``."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = (
        images.float()
        .reshape(batch, channels, rows, patch_size, cols, patch_size)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(batch, rows * cols, channels * patch_size * patch_size)
    )
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) * torch.rsqrt(var + contrast_floor**2)


def _nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x`` ``[n, d]``: the index of the nearest centroid and the squared distance to it.

    ``argmin |x - c|^2 = argmax (x . c - |c|^2 / 2)``: one matmul per chunk, in float32 whatever the
    autocast state (reduced precision would flip near-ties between centroids).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, centroids = x.float(), centroids.float()
        half_sq_norms = 0.5 * centroids.square().sum(dim=1)
        indices, distances = [], []
        for chunk in x.split(_ROWS_PER_CHUNK):
            best, index = torch.addmm(half_sq_norms, chunk, centroids.T, beta=-1).max(dim=1)
            indices.append(index)
            distances.append((chunk.square().sum(dim=1) - 2 * best).clamp_min(0))
        return torch.cat(indices), torch.cat(distances)


def _check_contrast_floor(contrast_floor: float, name: str) -> None:
    if contrast_floor <= 0:
        raise ValueError(f"{name}: contrast_floor must be > 0, got {contrast_floor}")


class KMeansTokenizer(Tokenizer):
    """Nearest-centroid tokens of normalised patches; ``KMeansTokenizer.fit(images)`` trains one.

    ``centroids`` ``[vocab_size, 3 * patch_size^2]`` live in normalised-patch space (see
    ``normalized_patches``).
    """

    kind = "kmeans"

    def __init__(
        self,
        centroids: torch.Tensor,
        patch_size: int = 8,
        input_size: int = 112,
        contrast_floor: float = DEFAULT_CONTRAST_FLOOR,
    ):
        dim = 3 * patch_size * patch_size
        if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 or centroids.shape[1] != dim:
            got = list(centroids.shape) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
            raise ValueError(
                f"KMeansTokenizer: centroids must be [vocab_size, {dim}] (3 * patch_size^2 for patch_size "
                f"{patch_size}), got {got}"
            )
        if centroids.shape[0] < 1:
            raise ValueError("KMeansTokenizer: centroids must hold at least one centroid")
        _check_contrast_floor(contrast_floor, "KMeansTokenizer")
        super().__init__(vocab_size=centroids.shape[0], input_size=input_size, patch_size=patch_size)
        self.contrast_floor = float(contrast_floor)
        self.register_buffer("centroids", centroids.detach().float().contiguous())

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        images: torch.Tensor | Iterable[torch.Tensor],
        vocab_size: int = 8192,
        patch_size: int = 8,
        input_size: int = 112,
        seed: int = 0,
        iters: int = 100,
        batch_size: int = 16384,
        max_patches: int = 1_000_000,
        contrast_floor: float = DEFAULT_CONTRAST_FLOOR,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> "KMeansTokenizer":
        """Fit ``vocab_size`` centroids to the patches of ``images``.

        ``images``: a tensor ``[N, 3, input_size, input_size]`` in [0, 1], or an iterable of such
        batches (a generator is read once). ``iters`` mini-batches of ``batch_size`` patches are drawn
        from a sample of at most ``max_patches`` patches. Runs on ``device`` (default: the images'
        device). If the data has fewer distinct patches than ``vocab_size``, the vocabulary is
        clamped to their number with a warning. Deterministic for a given ``seed`` on the CPU.
        ``progress``: a progress bar of the iterations (tqdm, on stderr).
        """
        for name, value in (("vocab_size", vocab_size), ("iters", iters), ("batch_size", batch_size),
                            ("max_patches", max_patches), ("patch_size", patch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KMeansTokenizer.fit: {name} must be a positive int, got {value!r}")
        # Checked before the (long) fit, not only when the tokenizer is built at its end.
        check_patch_size(input_size, patch_size, "KMeansTokenizer.fit")
        _check_contrast_floor(contrast_floor, "KMeansTokenizer.fit")
        generator = torch.Generator().manual_seed(seed)
        patches = _sample_patches(
            images, input_size, patch_size, contrast_floor, max_patches, device, generator
        )
        distinct = _distinct_rows(patches, generator)
        if len(distinct) < vocab_size:
            warnings.warn(
                f"KMeansTokenizer.fit: the data has only {len(distinct)} distinct patches, fewer than "
                f"vocab_size={vocab_size}; using vocab_size={len(distinct)}. Fit on more images for the full "
                f"vocabulary.",
                stacklevel=2,
            )
            vocab_size = len(distinct)
        centroids = _seed_centroids(patches, distinct, vocab_size, generator)
        centroids = _minibatch_kmeans(patches, centroids, iters, batch_size, generator, progress)
        return cls(centroids, patch_size=patch_size, input_size=input_size, contrast_floor=contrast_floor)

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        patches = normalized_patches(images, self.patch_size, self.contrast_floor)
        tokens, _ = _nearest_centroid(patches.flatten(0, 1), self.centroids)
        return tokens.view(images.shape[0], self.grid_size, self.grid_size)

    @torch.no_grad()
    def quantization_error(self, images: torch.Tensor) -> torch.Tensor:
        """Mean squared distance from each normalised patch of ``images`` to its centroid (0-dim tensor):
        how well the vocabulary describes these images (lower is better)."""
        check_images(images, self.input_size, "KMeansTokenizer.quantization_error")
        patches = normalized_patches(images, self.patch_size, self.contrast_floor)
        return _nearest_centroid(patches.flatten(0, 1), self.centroids)[1].mean()

    def _file_contents(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = {
            "patch_size": self.patch_size,
            "input_size": self.input_size,
            "contrast_floor": self.contrast_floor,
        }
        return {"centroids": self.centroids}, config

    @classmethod
    def _from_file_contents(
        cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> "KMeansTokenizer":
        return cls(tensors["centroids"], **config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, contrast_floor={self.contrast_floor}"


class _Reservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream (Algorithm R, vectorised)."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.chunks: list[torch.Tensor] = []
        self.sample: torch.Tensor | None = None
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        room = self.capacity - self.seen
        if room > 0:
            self.chunks.append(rows[:room])
            self.seen += len(self.chunks[-1])
            rows = rows[room:]
        if len(rows) == 0:
            return
        if self.sample is None:
            self.sample, self.chunks = torch.cat(self.chunks), []
        # Stream row i (0-based) takes slot floor(u * (i + 1)) when that is < capacity, i.e. it enters
        # with probability capacity / (i + 1) and evicts a uniformly chosen row.
        stream_index = torch.arange(self.seen, self.seen + len(rows), dtype=torch.float64)
        uniform = torch.rand(len(rows), dtype=torch.float64, generator=self.generator)
        slot = (uniform * (stream_index + 1)).long()
        self.seen += len(rows)
        entering = torch.nonzero(slot < self.capacity).squeeze(1)
        # A later row drawn to the same slot as an earlier one overwrites it, as in the sequential algorithm.
        slots, inverse = torch.unique(slot[entering], return_inverse=True)
        last = torch.full_like(slots, -1).scatter_reduce_(0, inverse, entering, "amax")
        self.sample[slots.to(rows.device)] = rows[last.to(rows.device)]

    def rows(self) -> torch.Tensor:
        return self.sample if self.sample is not None else torch.cat(self.chunks)


def _sample_patches(
    images: torch.Tensor | Iterable[torch.Tensor],
    input_size: int,
    patch_size: int,
    contrast_floor: float,
    max_patches: int,
    device: torch.device | str | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """A uniform sample of at most ``max_patches`` normalised patches ``[n, 3 p^2]`` (float16, to halve
    the memory; far finer than the clustering needs) of all images."""
    reservoir = _Reservoir(max_patches, generator)
    for batch in [images] if isinstance(images, torch.Tensor) else images:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                f"KMeansTokenizer.fit: images must be a tensor [N, 3, {input_size}, {input_size}] or an "
                f"iterable of such tensors, got an item of type {type(batch).__name__}"
            )
        check_images(batch, input_size, "KMeansTokenizer.fit")
        device = batch.device if device is None else torch.device(device)
        for chunk in batch.split(_IMAGES_PER_CHUNK):
            patches = normalized_patches(chunk.to(device), patch_size, contrast_floor)
            reservoir.add(patches.flatten(0, 1).half())
    if reservoir.seen == 0:
        raise ValueError("KMeansTokenizer.fit: no images given")
    return reservoir.rows()


def _distinct_rows(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Indices of one row per distinct row of ``rows``.

    Rows are compared through their float64 projection on a random direction: distinct float16 rows
    differ by far more than the rounding of the projection, so they collide with probability ~0.
    """
    direction = torch.randn(rows.shape[1], dtype=torch.float64, generator=generator).to(rows.device)
    keys = torch.cat([chunk.double() @ direction for chunk in rows.split(65536)])
    distinct_keys, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(len(rows), device=rows.device)
    first = torch.full_like(distinct_keys, len(rows), dtype=torch.long)
    return first.scatter_reduce_(0, inverse, positions, "amin")


def _seed_centroids(
    patches: torch.Tensor, distinct: torch.Tensor, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding on (up to ``2 * vocab_size``) distinct patches, ``vocab_size / 64`` per round.

    Each round draws its centres without replacement with probability proportional to the squared
    distance to the nearest centre so far, so every centre is a different patch.
    """
    order = torch.randperm(len(distinct), generator=generator)[: 2 * vocab_size]
    candidates = patches[distinct[order.to(distinct.device)]].float()
    sq_norms = candidates.square().sum(dim=1)
    chosen = torch.zeros(len(candidates), dtype=torch.bool)
    nearest_sq = torch.full((len(candidates),), float("inf"), dtype=torch.float64)
    per_round = max(1, vocab_size // _SEEDING_ROUNDS)
    new = torch.randint(len(candidates), (1,), generator=generator)
    while True:
        chosen[new] = True
        new_centres = candidates[new.to(candidates.device)]
        sq = sq_norms[:, None] - 2 * candidates @ new_centres.T + sq_norms[new.to(candidates.device)][None, :]
        nearest_sq = torch.minimum(nearest_sq, sq.min(dim=1).values.clamp_min(0).double().cpu())
        remaining = vocab_size - int(chosen.sum())
        if remaining == 0:
            return candidates[chosen.to(candidates.device)]
        # The tiny floor keeps every unchosen patch drawable even where float rounding gave distance 0.
        weights = torch.where(chosen, 0.0, nearest_sq + 1e-30)
        new = torch.multinomial(weights, min(per_round, remaining), replacement=False, generator=generator)


def _minibatch_kmeans(
    patches: torch.Tensor, centroids: torch.Tensor, iters: int, batch_size: int, generator: torch.Generator,
    progress: bool = False,
) -> torch.Tensor:
    vocab_size = len(centroids)
    # When every patch fits in one batch this is Lloyd's algorithm (each centre = mean of its patches).
    full_batch = len(patches) <= batch_size
    counts = torch.zeros(vocab_size, dtype=torch.long, device=centroids.device)
    hits_since_check = torch.zeros_like(counts)
    for step in tqdm(range(1, iters + 1), desc="k-means", unit="iteration", disable=not progress):
        if full_batch:
            x = patches.float()
        else:
            drawn = torch.randint(len(patches), (batch_size,), generator=generator)
            x = patches[drawn.to(patches.device)].float()
        assignment, sq_distance = _nearest_centroid(x, centroids)
        batch_counts = torch.bincount(assignment, minlength=vocab_size)
        batch_sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = batch_counts if full_batch else counts + batch_counts
        # c += (sum - n c) / N: the running mean over all N patches this centre has had.
        centroids += (batch_sums - batch_counts[:, None] * centroids) / counts.clamp_min(1)[:, None]
        hits_since_check += batch_counts
        if step % _REASSIGN_EVERY == 0:
            logger.info("k-means step %d/%d: mean squared distance %.4f", step, iters, sq_distance.mean())
            if step < iters:
                _restart_unused(centroids, counts, hits_since_check == 0, x, sq_distance, generator)
            hits_since_check.zero_()
    return centroids


def _restart_unused(
    centroids: torch.Tensor,
    counts: torch.Tensor,
    unused: torch.Tensor,
    x: torch.Tensor,
    sq_distance: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """Move centres no patch chose to patches of the batch drawn in proportion to their squared distance
    from the nearest centre (the worst-described patches), and restart their running means."""
    weights = sq_distance.double().cpu()
    count = min(int(unused.sum()), int((weights > 0).sum()))
    if count == 0:
        return
    restarted = torch.nonzero(unused).squeeze(1)[:count]
    picks = torch.multinomial(weights, count, replacement=False, generator=generator).to(x.device)
    centroids[restarted] = x[picks]
    counts[restarted] = 0
