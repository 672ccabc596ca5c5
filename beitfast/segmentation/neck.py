"""The multi-scale neck: four maps of the patch grid at 4x, 2x, 1x and 0.5x its resolution."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MultiScaleNeck"]


class MultiScaleNeck(nn.Module):
    """The official ``fpn1``..``fpn4`` (patch size 16): transposed conv, BatchNorm, GELU and transposed
    conv (4x); one transposed conv (2x); identity; 2x2 max pool (0.5x). The official backbone holds
    them (``backbone.fpn1``...); here they are a room of their own, with the same inner names.
    Initialised as the official code leaves them (PyTorch's defaults)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 4:
            raise ValueError(f"MultiScaleNeck: expected 4 feature maps, got {len(features)}")
        return [fpn(x) for fpn, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), features)]
