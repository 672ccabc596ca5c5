"""BEiT for semantic segmentation: backbone, neck, UPerNet decode head and auxiliary FCN head."""

from __future__ import annotations

import os
import warnings
from typing import Mapping

import torch
import torch.nn as nn

from .. import checkpoint as beit_checkpoint
from ..config import BEiTConfig
from ..model import BEiT
from ..ops import dispatch
from . import checkpoint
from .backbone import BEiTBackbone
from .config import SegmentationConfig, default_out_indices
from .heads import FCNHead, UPerHead
from .neck import MultiScaleNeck

__all__ = ["BEiTForSegmentation"]


class BEiTForSegmentation(nn.Module):
    """The official BEiT UPerNet segmentation model (microsoft/unilm ``beit/semantic_segmentation``).

    * ``model(images)`` -> logits ``[B, num_classes, H/4, W/4]`` (the decode head's, at 1/4 of the
      image, as the official ``EncoderDecoder`` before its final resize);
    * ``model(images, labels)`` -> the training loss: the decode head's cross-entropy plus
      ``auxiliary_loss_weight`` x the auxiliary head's, each on logits upsampled to the ``[B, H', W']``
      labels (values in ``[0, num_classes)`` or ``ignore_index``).

    ``config`` is the backbone's (its ``img_size``: any multiple of the patch size; it gets no LM head,
    classifier or final norm); ``segmentation`` the neck's and heads', ``overrides`` change its fields.
    The official fine-tuning backbone has a bias table per layer (``use_rel_pos_bias=True``); the
    default is its BEiT-B at 512 px for ADE20K's 150 classes. Built with the official initialisation;
    load weights with :meth:`from_state_dict` or :meth:`from_file`, start from a pre-trained or
    classification BEiT with :meth:`from_backbone`, change the image size with :meth:`resized`.
    """

    def __init__(self, config: BEiTConfig | None = None, segmentation: SegmentationConfig | None = None,
                 **overrides):
        super().__init__()
        if config is not None and not isinstance(config, BEiTConfig):
            raise TypeError(
                f"BEiTForSegmentation: config must be a BEiTConfig or None, got {type(config).__name__}"
            )
        if segmentation is not None and not isinstance(segmentation, SegmentationConfig):
            raise TypeError(
                "BEiTForSegmentation: segmentation must be a SegmentationConfig or None, got "
                f"{type(segmentation).__name__}"
            )
        seg = (segmentation or SegmentationConfig()).replace(**overrides)
        config = config or BEiTConfig.base(img_size=512, use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
        if seg.out_indices is None:
            seg = seg.replace(out_indices=default_out_indices(config.depth))
        if seg.channels is None:
            seg = seg.replace(channels=config.embed_dim)
        self.segmentation_config = seg
        self.backbone = BEiTBackbone(config, seg.out_indices, seg.taps)
        self.config = self.backbone.config
        dim = config.embed_dim
        self.neck = MultiScaleNeck(dim)
        loss = dict(ignore_index=seg.ignore_index, loss_average=seg.loss_average)
        self.decode_head = UPerHead(dim, seg.channels, seg.num_classes, seg.pool_scales, seg.dropout, **loss)
        self.auxiliary_head = (
            FCNHead(dim, seg.auxiliary_channels, seg.num_classes, in_index=2, dropout=seg.dropout,
                    loss_weight=seg.auxiliary_loss_weight, **loss)
            if seg.auxiliary_channels > 0 else None
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            self._check_labels(images, labels)
        features = self.neck(self.backbone(images))  # the backbone checks the images
        # The 1x1 pooling branch leaves one value per channel and image: BatchNorm (not SyncBatchNorm,
        # which counts every process's images) cannot normalise a batch of one in training.
        if self.training and images.shape[0] == 1 and type(self.decode_head.bottleneck.bn) is nn.BatchNorm2d:
            raise ValueError("BEiTForSegmentation: training needs at least 2 images per batch (BatchNorm of "
                             "the 1x1 pyramid pooling branch); got 1")
        logits = self.decode_head(features)
        if labels is None:
            return logits
        loss = self.decode_head.loss(logits, labels)
        if self.auxiliary_head is not None:
            loss = loss + self.auxiliary_head.loss(self.auxiliary_head(features), labels)
        return loss

    def _check_labels(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        seg = self.segmentation_config
        form = f"an integer [B, H, W] tensor with B = {images.shape[0]}"
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"BEiTForSegmentation: labels must be {form}, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"BEiTForSegmentation: labels must be {form}, got {labels.dtype}")
        if labels.dim() != 3 or labels.shape[0] != images.shape[0] or labels.numel() == 0:
            raise ValueError(f"BEiTForSegmentation: labels must be {form}, got {tuple(labels.shape)}")
        # Reading values is a host synchronisation on a GPU (and a graph break under torch.compile):
        # checked on CPU, or with BEITFAST_CHECKS=1; otherwise a label out of range fails in the loss
        # (a device-side assert on CUDA).
        if not dispatch.may_inspect_values(labels):
            return
        bad = labels[((labels < 0) | (labels >= seg.num_classes)) & (labels != seg.ignore_index)]
        if bad.numel():
            raise ValueError(
                f"BEiTForSegmentation: labels must be in [0, {seg.num_classes}) or ignore_index "
                f"{seg.ignore_index}, got {sorted(set(bad.unique()[:8].tolist()))}"
            )

    # -- checkpoints (the conversions are in beitfast.segmentation.checkpoint) --------------------------

    @staticmethod
    def from_state_dict(state_dict, config: BEiTConfig | None = None,
                        segmentation: SegmentationConfig | None = None, strict: bool = True,
                        **overrides) -> "BEiTForSegmentation":
        """A model from a segmentation state dict: ours, the official/mmseg code's, or transformers'
        ``BeitForSemanticSegmentation`` (4.x or 5.x names). See :mod:`beitfast.segmentation.checkpoint`.

        Configs not given are inferred from the shapes (transformers' LayerNorm eps 1e-12 for its names);
        ``overrides`` change fields of either (by name). A ``config`` of another image size gets the
        backbone's tables resized the official way. ``strict=True`` refuses missing or unexpected keys;
        ``strict=False`` warns and keeps the new model's initialisation for the missing ones. A shape
        mismatch is always an error."""
        state, fmt = checkpoint.to_our_names(state_dict)
        return _from_our_names(state, fmt, config, segmentation, strict, overrides)

    @staticmethod
    def from_backbone(source, config: BEiTConfig, segmentation: SegmentationConfig | None = None,
                      **overrides) -> "BEiTForSegmentation":
        """A new model whose backbone holds the weights of a BEiT of any task and format (pre-training,
        classification; official, beitfast, timm, transformers): a :class:`beitfast.BEiT`, a state dict,
        or a file or folder :meth:`beitfast.BEiT.from_file` reads. They are adapted to ``config`` as the
        official fine-tuning does (a shared bias table copied into every layer, tables resized to its
        grid); neck and heads are new."""
        if isinstance(source, (str, os.PathLike)):
            source = BEiT.from_file(source)
        if isinstance(source, nn.Module):
            source = source.state_dict()
        state = checkpoint.backbone_state_dict(source)
        model = BEiTForSegmentation(config, segmentation, **overrides)
        state = beit_checkpoint.adapt_state_dict(state, model.config)
        expected = model.backbone.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                "BEiTForSegmentation.from_backbone: the state dict does not fit the backbone config: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        model.backbone.load_state_dict(state)
        return model

    @staticmethod
    def from_file(path, config: BEiTConfig | None = None, segmentation: SegmentationConfig | None = None,
                  strict: bool = True, **overrides) -> "BEiTForSegmentation":
        """A model from ``.safetensors``/``.pth``/``.pt``/``.bin`` (ours, official/mmseg, transformers) or a
        transformers folder. Configs, in order: the arguments, those stored with ours or in a transformers
        ``config.json``, inferred from the shapes; ``overrides`` change fields of either."""
        state, fmt, stored, stored_segmentation = checkpoint.read_state_dict(path)
        return _from_our_names(state, fmt, config or stored, segmentation or stored_segmentation, strict,
                               overrides)

    def save(self, path) -> None:
        """Writes ``.safetensors`` or ``.pth``/``.pt`` (weights and both configs), atomically."""
        checkpoint.save(self, path)

    def resized(self, img_size) -> "BEiTForSegmentation":
        """A copy for another image size (any multiple of the patch size): the bias tables resized the
        official way, the absolute position embedding (if any) bicubic."""
        return BEiTForSegmentation.from_state_dict(self.state_dict(), self.config.replace(img_size=img_size),
                                                   self.segmentation_config)

    def to_mmseg_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the names of the official/mmseg code (``backbone.fpn1.0.weight``, ``conv_seg``...)."""
        return checkpoint.to_mmseg_state_dict(self)

    def to_hf_state_dict(self, version: int = 5) -> dict[str, torch.Tensor]:
        """Weights in the names of transformers' ``BeitForSemanticSegmentation`` (5.x or 4.x)."""
        return checkpoint.to_hf_state_dict(self, version)

    def to_hf_config(self, out_indices=None) -> dict:
        """Keyword arguments of ``transformers.BeitConfig`` for the same model (see
        :func:`beitfast.segmentation.checkpoint.hf_config_kwargs` for which taps it can express)."""
        return checkpoint.hf_config_kwargs(self, out_indices)


def _from_our_names(state: dict[str, torch.Tensor], fmt: str, config: BEiTConfig | None,
                    segmentation: SegmentationConfig | None, strict: bool,
                    overrides: dict) -> BEiTForSegmentation:
    """``BEiTForSegmentation.from_state_dict`` of a state dict already renamed from ``fmt``."""
    config, segmentation, state = checkpoint.resolve_configs(state, fmt, config, segmentation, overrides)
    model = BEiTForSegmentation(config, segmentation)
    _load_checked(model, state, strict)
    return model


def _load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool) -> None:
    expected = model.state_dict()
    mismatched = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:
        raise ValueError("BEiTForSegmentation.from_state_dict: shape mismatch for " + "; ".join(mismatched))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        message = f"BEiTForSegmentation.from_state_dict: missing keys {missing}, unexpected keys {unexpected}"
        if strict:
            raise ValueError(message + " (strict=False loads the rest)")
        # stacklevel: the caller of BEiTForSegmentation.from_state_dict / from_file.
        warnings.warn(message + "; missing ones keep the initialisation of a new model", stacklevel=4)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
