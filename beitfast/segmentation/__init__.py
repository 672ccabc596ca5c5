"""Semantic segmentation with BEiT, as the official code (microsoft/unilm ``beit/semantic_segmentation``):
three rooms, each usable alone — the backbone (:class:`BEiTBackbone`, block outputs as patch-grid maps),
the neck (:class:`MultiScaleNeck`, 4x/2x/1x/0.5x) and the decode heads (:class:`UPerHead`,
:class:`FCNHead`, each with its loss) — put together by :class:`BEiTForSegmentation`."""

from .backbone import BEiTBackbone
from .config import SegmentationConfig
from .heads import FCNHead, UPerHead
from .model import BEiTForSegmentation
from .neck import MultiScaleNeck

__all__ = [
    "BEiTBackbone", "BEiTForSegmentation", "FCNHead", "MultiScaleNeck", "SegmentationConfig", "UPerHead",
]
