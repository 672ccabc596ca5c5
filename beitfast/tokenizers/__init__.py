"""Visual tokenizers: the targets of BEiT's masked image modelling.

>>> from beitfast.tokenizers import DalleTokenizer, KMeansTokenizer, load_tokenizer
>>> dalle = DalleTokenizer.from_file("encoder.pkl")               # doctest: +SKIP
>>> kmeans = KMeansTokenizer.fit(images_112, vocab_size=8192)     # doctest: +SKIP
>>> kmeans.save("kmeans.safetensors"); tokenizer = load_tokenizer("kmeans.safetensors")  # doctest: +SKIP
>>> tokens = tokenizer.tokenize(images_112)  # [B, 14, 14] int64   # doctest: +SKIP
"""

from __future__ import annotations

import os

from .._files import check_not_empty
from .base import Tokenizer, is_safetensors_file, read_tokenizer_file
from .dvae import DalleTokenizer
from .kmeans import KMeansTokenizer
from .safe_pickle import UnsafePickleError

__all__ = ["Tokenizer", "DalleTokenizer", "KMeansTokenizer", "load_tokenizer", "UnsafePickleError"]

_KINDS: dict[str, type[Tokenizer]] = {cls.kind: cls for cls in (DalleTokenizer, KMeansTokenizer)}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS_2_TO_5 = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer saved by ``Tokenizer.save`` (safetensors), or the official DALL-E ``encoder.pkl``
    (read without running code from it). Tensors are loaded on the CPU. An empty, truncated or damaged
    file, or one with non-finite tensors, is a ``beitfast.checkpoint.FileIntegrityError`` (a ``ValueError``)."""
    path = os.fspath(path)
    check_not_empty(path)
    if is_safetensors_file(path):
        kind, tensors, config = read_tokenizer_file(path)
        if kind not in _KINDS:
            raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known: {sorted(_KINDS)}")
        return _KINDS[kind]._from_file_contents(tensors, config)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOLS_2_TO_5):
        return DalleTokenizer.from_file(path)
    raise ValueError(
        f"{path}: unknown tokenizer file format; expected a file written by Tokenizer.save (safetensors) "
        f"or a torch.save file such as the DALL-E encoder.pkl"
    )
