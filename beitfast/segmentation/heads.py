"""Decode heads: UPerNet (the main head) and FCN (the auxiliary head), with their loss.

Module names follow mmsegmentation 0.11, which the official BEiT code uses (``psp_modules.i.1.conv``,
``bottleneck``, ``lateral_convs``, ``fpn_convs``, ``fpn_bottleneck``, ``convs``, ``conv_seg``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvNormReLU", "DecodeHead", "UPerHead", "FCNHead"]


class ConvNormReLU(nn.Module):
    """mmcv's ``ConvModule`` with BatchNorm and ReLU: conv without bias, BatchNorm, ReLU; initialised as
    mmcv does (Kaiming normal, fan out, for ReLU; BatchNorm 1 and 0)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    """What every head ends with: dropout (2-D, per channel, as mmseg), the 1x1 classifier ``conv_seg``
    (normal, std 0.01), and the loss of the logits it produced."""

    def __init__(self, channels: int, num_classes: int, dropout: float, loss_weight: float,
                 ignore_index: int, loss_average: str):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.loss_average = loss_average

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``loss_weight`` x the cross-entropy of ``logits`` upsampled bilinearly (align_corners=False) to
        the ``[B, H, W]`` labels; pixels labelled ``ignore_index`` add nothing. ``loss_average``
        ``"all_pixels"`` divides by every pixel (mmseg 0.11), ``"labelled_pixels"`` by the others."""
        upsampled = _upsample(logits, labels.shape[-2:])
        per_pixel = F.cross_entropy(upsampled, labels, ignore_index=self.ignore_index, reduction="none")
        if self.loss_average == "all_pixels":
            loss = per_pixel.mean()
        else:
            loss = per_pixel.sum() / (labels != self.ignore_index).sum()
        return self.loss_weight * loss


class UPerHead(DecodeHead):
    """UPerNet: a pyramid pooling module on the coarsest map (pool scales 1, 2, 3, 6), a top-down path
    of 1x1 lateral convs with 3x3 fpn convs, all levels upsampled to the finest and fused by a 3x3
    conv; logits at the finest map's resolution (1/4 of the image)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1, loss_weight: float = 1.0, ignore_index: int = 255,
                 loss_average: str = "all_pixels", levels: int = 4):
        super().__init__(channels, num_classes, dropout, loss_weight, ignore_index, loss_average)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormReLU(in_channels, channels, 1))
            for scale in pool_scales
        )
        self.bottleneck = ConvNormReLU(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvNormReLU(in_channels, channels, 1) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(ConvNormReLU(channels, channels, 3) for _ in range(levels - 1))
        self.fpn_bottleneck = ConvNormReLU(levels * channels, channels, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        pooled = [_upsample(module(top), top.shape[-2:]) for module in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + _upsample(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0], *(_upsample(x, size) for x in outs[1:])], dim=1)
        return self.classify(self.fpn_bottleneck(fused))


class FCNHead(DecodeHead):
    """The auxiliary head: one 3x3 conv on the map ``in_index`` (no concatenation of its input)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 dropout: float = 0.1, loss_weight: float = 0.4, ignore_index: int = 255,
                 loss_average: str = "all_pixels"):
        super().__init__(channels, num_classes, dropout, loss_weight, ignore_index, loss_average)
        self.in_index = in_index
        self.convs = nn.Sequential(ConvNormReLU(in_channels, channels, 3))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.convs(features[self.in_index]))
