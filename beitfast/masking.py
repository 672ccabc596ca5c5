"""Blockwise masking of BEiT: rectangles of random area and aspect ratio are added until the target
number of patches is masked (or ten attempts in a row fail to add any).

``MaskingGenerator`` is the official algorithm in Python. Its ``batch`` method also runs the same
algorithm natively (``torch.ops.beitfast.blockwise_masks`` of csrc/masking*.{cpp,cu}: threaded C++ on
CPU, one CUDA thread per image on the GPU), drawing from the same distribution.
"""

from __future__ import annotations

import hashlib
import math
import random

import torch

from . import _ext
from .config import check_int, check_real

__all__ = ["MaskingGenerator", "BACKENDS", "derive_seed", "batch_masks"]

BACKENDS = ("python", "cpp", "cuda")
_NATIVE_OP = "blockwise_masks.out"


class MaskingGenerator:
    """The official blockwise mask generator.

    ``MaskingGenerator((14, 14), num_masking_patches=75)`` gives BEiT's pre-training masks: about 40%
    of 196 patches, blocks of at least ``min_num_patches`` patches with aspect ratio in
    ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``). ``generator()`` returns one ``[Wh, Ww]``
    bool mask; ``generator.batch(B)`` a ``[B, Wh * Ww]`` bool tensor.

    ``seed`` seeds the generator's ``random.Random``: two generators with the same seed give the same
    sequence of masks (for the same sequence of calls and backends).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = (14, 14),
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        seed: int | None = None,
    ):
        owner = "MaskingGenerator"
        sizes = input_size if isinstance(input_size, (list, tuple)) else (input_size, input_size)
        if len(sizes) != 2:
            raise ValueError(
                f"{owner}: input_size must be an int or a (height, width) pair, got {input_size!r}")
        self.height, self.width = (check_int(owner, "input_size", size, 1) for size in sizes)
        self.num_patches = self.height * self.width
        num_masking_patches = check_int(owner, "num_masking_patches", num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"{owner}: num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}")
        min_num_patches = check_int(owner, "min_num_patches", min_num_patches, 1)
        max_num_patches = check_int(owner, "max_num_patches", max_num_patches, 1, optional=True)
        min_aspect = check_real(owner, "min_aspect", min_aspect, 0, low_open=True)
        max_aspect = check_real(owner, "max_aspect", max_aspect, 0, low_open=True, optional=True)
        seed = check_int(owner, "seed", seed, optional=True)
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = random.Random(seed)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(({self.height}, {self.width}), "
            f"num_masking_patches={self.num_masking_patches}, "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"log_aspect_ratio=({self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}))"
        )

    def _add_block(self, mask: list[list[bool]], max_mask_patches: int) -> int:
        """Try up to ten rectangles; return how many new patches the first useful one masked."""
        rng = self.rng
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                already = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                added = 0
                # Only a rectangle that adds something and not more than allowed counts.
                if 0 < h * w - already <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                added += 1
                if added > 0:
                    return added
        return 0

    def __call__(self) -> torch.Tensor:
        mask = [[False] * self.width for _ in range(self.height)]
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget)
            if added == 0:
                break
            count += added
        return torch.tensor(mask, dtype=torch.bool)

    def batch(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """``[batch_size, Wh * Ww]`` bool masks on ``device`` (default CPU), one independent draw per image.

        ``backend``: ``"python"`` (the loop of ``__call__``), ``"cpp"`` (native, threaded over images in
        large batches; the masks are copied to ``device``) or ``"cuda"`` (native, generated on the CUDA
        ``device``).
        None picks ``"cuda"`` for a CUDA device when the extension has the CUDA kernel, else ``"cpp"``
        when the extension is built, else ``"python"``.

        Every backend draws from the official distribution. The native backends take a fresh 63-bit
        seed from the generator's ``random.Random`` at each call, so consecutive batches differ and a
        seeded generator repeats its sequence of batches; for the same seed ``"cpp"`` and ``"cuda"``
        give the same masks (up to, in rare draws, a last-bit difference of ``exp`` between the
        devices), ``"python"`` other masks of the same distribution.
        """
        batch_size = check_int("MaskingGenerator.batch", "batch_size", batch_size, 0)
        try:
            device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"MaskingGenerator.batch: device must be a torch.device or a device string such as 'cpu' "
                f"or 'cuda:0', got {device!r} ({error})") from None
        if backend is None:
            backend = self._default_backend(device)
        if backend not in BACKENDS:
            raise ValueError(
                f"MaskingGenerator.batch: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "python":
            if batch_size == 0:
                return torch.zeros(0, self.num_patches, dtype=torch.bool, device=device)
            return torch.stack([self().flatten() for _ in range(batch_size)]).to(device)
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(
                f"MaskingGenerator.batch: backend 'cuda' needs a CUDA device, got device={device}")
        why = _ext.missing(_NATIVE_OP, "cuda" if backend == "cuda" else "cpu")
        if why:
            raise RuntimeError(f"MaskingGenerator.batch: backend {backend!r} is unavailable: {why}")
        masks = torch.ops.beitfast.blockwise_masks(
            batch_size, self.height, self.width, self.num_masking_patches, self.min_num_patches,
            self.max_num_patches, self.log_aspect_ratio[0], self.log_aspect_ratio[1],
            self.rng.getrandbits(63), device if backend == "cuda" else torch.device("cpu"),
        )
        return masks.to(device)

    @staticmethod
    def _default_backend(device: torch.device) -> str:
        if device.type == "cuda" and _ext.missing(_NATIVE_OP, "cuda") is None:
            return "cuda"
        return "cpp" if _ext.missing(_NATIVE_OP, "cpu") is None else "python"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any sequence of ints/strings, identical in every process and Python run
    (unlike ``hash``, which is salted for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_masks(masking: dict, seed: int, step: int, positions: range) -> torch.Tensor:
    """Blockwise masks ``[len(positions), Wh * Ww]`` of the given positions of global batch ``step``.

    With the native generator (``MaskingGenerator.batch``, C++), the mask at position ``j`` is draw
    ``j`` of a generator seeded by ``(seed, step)``: each image has its own random stream, so a mask
    depends on its position only, not on how the batch is split over ranks or workers. Without the
    extension, one Python generator per sample, seeded by ``(seed, step, j)``.
    """
    if _ext.missing("blockwise_masks.out", "cpu") is None:
        generator = MaskingGenerator(**masking, seed=derive_seed("mask", seed, step))
        return generator.batch(positions.stop, backend="cpp")[positions.start:]
    return torch.stack([MaskingGenerator(**masking, seed=derive_seed("mask", seed, step, j))().flatten()
                        for j in positions])
