"""Configuration of the segmentation neck and heads (the backbone is a :class:`beitfast.BEiTConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import check_choice, check_int, check_real

__all__ = ["SegmentationConfig", "TAPS", "LOSS_AVERAGES", "default_out_indices"]

TAPS = ("official", "huggingface")
LOSS_AVERAGES = ("all_pixels", "labelled_pixels")
# The official configs: BEiT-B and BEiT-L.
_OUT_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


def default_out_indices(depth: int) -> tuple[int, int, int, int]:
    if depth not in _OUT_INDICES:
        raise ValueError(
            f"SegmentationConfig: out_indices has official defaults for depth 12 and 24 only, this "
            f"backbone has depth {depth}; pass four block indices"
        )
    return _OUT_INDICES[depth]


@dataclass
class SegmentationConfig:
    """The UPerNet recipe of the official BEiT segmentation code (mmseg configs).

    * ``out_indices``: the four blocks whose outputs feed the neck; None: the official ones for the
      depth (3, 5, 7, 11 for 12 blocks; 7, 11, 15, 23 for 24).
    * ``taps``: how ``out_indices`` are read. ``"official"``: 0-based block indices, the output of
      block i (as the official backbone). ``"huggingface"``: as transformers'
      ``BeitForSemanticSegmentation``, ``hidden_states[i - 1]`` with ``hidden_states[0]`` the
      embeddings, i.e. the output of block ``i - 2`` (blocks 1, 3, 5, 9 for 3, 5, 7, 11), for
      comparing with models trained there.
    * ``channels``: the UPerNet head's width (None: the backbone's embed_dim, as the official configs);
      ``auxiliary_channels``: the FCN head's (0: no auxiliary head).
    * ``loss_average``: ``"all_pixels"`` (mmseg 0.11, which the official code uses: the mean over every
      label pixel, ignored ones counting as 0) or ``"labelled_pixels"`` (transformers: the mean over
      the pixels that are not ``ignore_index``).
    """

    num_classes: int = 150
    out_indices: tuple[int, ...] | None = None
    taps: str = "official"
    channels: int | None = None
    auxiliary_channels: int = 256
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    auxiliary_loss_weight: float = 0.4
    ignore_index: int = 255
    loss_average: str = "all_pixels"

    def __post_init__(self) -> None:
        owner = "SegmentationConfig"
        self.num_classes = check_int(owner, "num_classes", self.num_classes, 1)
        if self.out_indices is not None:
            self.out_indices = _int_tuple(owner, "out_indices", self.out_indices, 0)
            if len(self.out_indices) != 4:
                raise ValueError(f"{owner}: out_indices must be 4 block indices, got {self.out_indices}")
        self.taps = check_choice(owner, "taps", self.taps, TAPS)
        self.channels = check_int(owner, "channels", self.channels, 1, optional=True)
        self.auxiliary_channels = check_int(owner, "auxiliary_channels", self.auxiliary_channels, 0)
        self.pool_scales = _int_tuple(owner, "pool_scales", self.pool_scales, 1)
        self.dropout = check_real(owner, "dropout", self.dropout, 0, 1, high_open=True)
        self.auxiliary_loss_weight = check_real(owner, "auxiliary_loss_weight", self.auxiliary_loss_weight, 0)
        self.ignore_index = check_int(owner, "ignore_index", self.ignore_index)
        self.loss_average = check_choice(owner, "loss_average", self.loss_average, LOSS_AVERAGES)

    def replace(self, **changes) -> "SegmentationConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _int_tuple(owner: str, name: str, value, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"{owner}: {name} must be a non-empty sequence of ints >= {minimum}, got {value!r}")
    return tuple(check_int(owner, name, v, minimum) for v in value)
