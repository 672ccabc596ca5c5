"""The segmentation backbone: :class:`beitfast.BEiT` returning the patch grids after chosen blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..config import BEiTConfig
from ..model import BEiT, backend_for
from .config import TAPS

__all__ = ["BEiTBackbone"]


class BEiTBackbone(BEiT):
    """BEiT without LM head, classifier or final norm (as the official segmentation backbone), whose
    forward returns the outputs of the blocks ``out_indices``, cls token dropped, as ``[B, D, Wh, Ww]``
    maps in the order of ``out_indices``.

    ``taps="official"``: ``out_indices`` are 0-based block indices. ``taps="huggingface"``: index i in
    [0, depth] reads transformers' ``hidden_states[i - 1]``, ``hidden_states[0]`` being the embeddings:
    the output of block ``i - 2`` (i = 1: the embeddings; i = 0: Python's ``hidden_states[-1]``, the last
    block's output).
    """

    def __init__(self, config: BEiTConfig, out_indices, taps: str = "official"):
        # As the official segmentation backbone: no fc_norm (use_mean_pooling=False), no final norm.
        super().__init__(config.replace(vocab_size=0, num_classes=0, use_mean_pooling=False))
        self.norm = nn.Identity()
        if taps not in TAPS:
            raise ValueError(f"BEiTBackbone: taps must be one of {TAPS}, got {taps!r}")
        depth = self.config.depth
        low, high = (0, depth - 1) if taps == "official" else (0, depth)
        if any(not low <= i <= high for i in out_indices):
            raise ValueError(
                f"BEiTBackbone: out_indices with taps={taps!r} must be in [{low}, {high}] for {depth} "
                f"blocks, got {list(out_indices)}"
            )
        self.out_indices = tuple(out_indices)
        self.taps = taps
        # The block whose output each index reads; -1: the embeddings.
        self._tapped_blocks = [
            i if taps == "official" else (i - 2 if i > 0 else depth - 1) for i in self.out_indices
        ]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check_inputs(images, None)
        c = self.config
        x = ops.masked_patch_embed(
            images, self.patch_embed.proj.weight, self.patch_embed.proj.bias, c.patch_size,
            cls_token=self.cls_token, pos_embed=self.pos_embed, backend=backend_for("patch_embed", c.kernels),
        )
        shared = None
        if self.rel_pos_bias is not None:
            table = self.rel_pos_bias.relative_position_bias_table
            shared = ops.relative_position_bias(table, self.rel_pos_index)
        tapped = set(self._tapped_blocks)
        outputs = {-1: x} if -1 in tapped else {}
        for i, block in enumerate(self.blocks[:max(tapped) + 1]):  # the blocks after the last tap are idle
            x = block(x, self.rel_pos_index, shared)
            if i in tapped:
                outputs[i] = x
        grid = (images.shape[0], c.embed_dim, *c.grid)
        return [outputs[i][:, 1:].transpose(1, 2).reshape(grid) for i in self._tapped_blocks]
