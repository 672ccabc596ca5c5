"""The interface every visual tokenizer implements, and the file format ``Tokenizer.save`` writes.

A tokenizer maps the small view of an image (``[B, 3, S, S]``, values in ``[0, 1]``, ``S`` =
``input_size``, 112 for BEiT at 224/16) to one token id per ``patch_size`` x ``patch_size`` pixels:
``[B, S / patch_size, S / patch_size]`` int64, the targets of masked image modelling.

Saved tokenizers are safetensors files (tensors only, nothing executable), written atomically, whose
metadata holds ``format`` = ``beitfast.tokenizer``, the tokenizer ``kind``, its JSON ``config`` and the
SHA-256 of the tensors and the rest of the metadata (``beitfast_sha256``), verified when read; the
tensors must be finite.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._files import (
    FileIntegrityError, add_safetensors_digest, check_not_empty, check_safetensors, write_atomically,
)

__all__ = [
    "Tokenizer", "FILE_FORMAT", "check_patch_size", "check_images", "is_safetensors_file",
    "write_tokenizer_file", "read_tokenizer_file",
]

FILE_FORMAT = "beitfast.tokenizer"


class Tokenizer(torch.nn.Module):
    """Base class: ``tokenize(images) -> LongTensor [B, Wh, Ww]``, ``save(path)``.

    Subclasses set ``kind`` (the name in saved files) and implement ``_tokenize`` (images already
    validated, gradients off), ``_file_contents`` (tensors and JSON-able config for ``save``) and its
    inverse ``_from_file_contents``.
    """

    kind: ClassVar[str]

    def __init__(self, vocab_size: int, input_size: int, patch_size: int):
        super().__init__()
        check_patch_size(input_size, patch_size, type(self).__name__)
        self.vocab_size = int(vocab_size)
        self.input_size = int(input_size)
        self.patch_size = int(patch_size)

    @property
    def grid_size(self) -> int:
        """Tokens per side: ``input_size // patch_size``."""
        return self.input_size // self.patch_size

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, grid_size, grid_size]`` (int64) of ``images`` ``[B, 3, input_size, input_size]``
        in ``[0, 1]`` (any float dtype; works under autocast; no host synchronisation). NaN or infinite
        values are refused (``ValueError``; on a GPU a device-side assertion)."""
        check_images(images, self.input_size, f"{type(self).__name__}.tokenize")
        return self._tokenize(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenize(images)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to ``path`` (safetensors); ``load_tokenizer(path)`` reads it back."""
        tensors, config = self._file_contents()
        write_tokenizer_file(path, self.kind, tensors, config)

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _file_contents(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def _from_file_contents(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "Tokenizer":
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, input_size={self.input_size}, patch_size={self.patch_size}"


def check_patch_size(input_size: int, patch_size: int, name: str) -> None:
    """Raise a clear error unless ``patch_size`` tiles the ``input_size`` view exactly."""
    if patch_size < 1 or input_size % patch_size:
        raise ValueError(
            f"{name}: input_size ({input_size}) must be a multiple of patch_size ({patch_size})"
        )


def check_images(images: torch.Tensor, input_size: int, name: str) -> None:
    """Raise a clear error unless ``images`` is a finite float ``[B, 3, input_size, input_size]`` tensor
    (on a GPU, finiteness is asserted on the device, without waiting for it)."""
    expected = f"[B, 3, {input_size}, {input_size}]"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: images must be a tensor {expected}, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (input_size, input_size):
        raise ValueError(
            f"{name}: images must be {expected} (RGB, the {input_size}-pixel tokenizer view), "
            f"got {list(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{name}: images must be floating point with values in [0, 1], got {images.dtype}")
    # NaN or infinity would become token 0 everywhere (the nearest centroid, the argmax of NaN logits).
    finite = torch.isfinite(images).all()
    if images.is_cuda:  # checked on the device: raising here would wait for the GPU
        torch._assert_async(finite, f"{name}: images must be finite, with values in [0, 1]")
    elif not finite:
        bad = images.numel() - int(torch.isfinite(images).sum())
        raise ValueError(f"{name}: images must be finite, with values in [0, 1]; got {bad} NaN or infinite "
                         f"value(s)")


def write_tokenizer_file(
    path: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    metadata = {"format": FILE_FORMAT, "kind": kind, "config": json.dumps(config)}
    metadata = add_safetensors_digest(tensors, metadata)
    write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def is_safetensors_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length, then the
    ``{`` of its JSON header (whether the file is complete is for the reader to check)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{"


def read_tokenizer_file(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """``(kind, tensors, config)`` of a file written by ``write_tokenizer_file``; ``ValueError`` if it is
    not one, :class:`~beitfast.checkpoint.FileIntegrityError` (a ``ValueError``) if it is damaged."""
    path = os.fspath(path)
    check_not_empty(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FILE_FORMAT:
                raise ValueError(
                    f"{path}: a safetensors file but not a beitfast tokenizer (metadata format "
                    f"{metadata.get('format')!r}, expected {FILE_FORMAT!r})"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise FileIntegrityError(
            path, f"cannot be read as a safetensors file, truncated or damaged ({error})"
        ) from None
    check_safetensors(path, tensors, metadata)
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as error:
        raise FileIntegrityError(
            path, f"the tokenizer config in the metadata is missing or not JSON ({error})"
        ) from None
    return metadata.get("kind"), tensors, config
