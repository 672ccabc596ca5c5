"""Masked image modeling (BEiT pre-training): a tokenizer labels every patch of a second, smaller view;
the model predicts the tokens of the masked patches. :func:`pretraining_run` makes a run's model, task
and data stream (:func:`beitfast.train.pretrain` trains them)."""

from __future__ import annotations

import torch

from ..._files import content_digest
from ...config import BEiTConfig
from ...data import ImageSource, TwoViewTransform, masking_for, pretrain_stream
from ...model import BEiT
from ...pipeline import resolve_input_path
from ..config import TrainConfig
from ..devices import resolve_device, setup_distributed

__all__ = ["MaskedImageModeling", "pretraining_run"]


class MaskedImageModeling:
    """Pre-training: the tokenizer (no grad) labels every patch of the tokenizer view; the model
    predicts the tokens of the masked patches. Batches: ``(views, tokenizer_views, masks)``."""

    name = "pretrain"

    def __init__(self, tokenizer, max_masked_per_image: int | None = None):
        self.tokenizer = tokenizer
        # The most patches a mask covers in an image (the masking's num_masking_patches): the loss
        # plans that many rows per image instead of every patch.
        self.max_masked_per_image = max_masked_per_image

    def check(self, config: BEiTConfig) -> None:
        tok = self.tokenizer
        if tok.vocab_size != config.vocab_size:
            raise ValueError(
                f"tokenizer vocab_size {tok.vocab_size} != model vocab_size {config.vocab_size}: "
                f"build the model with vocab_size={tok.vocab_size} or use a tokenizer of {config.vocab_size} tokens"
            )
        tok_grid = (tok.input_size // tok.patch_size,) * 2
        if tok_grid != config.grid:
            raise ValueError(
                f"tokenizer grid {tok_grid[0]}x{tok_grid[1]} (input_size {tok.input_size} / patch_size "
                f"{tok.patch_size}) != model patch grid {config.grid[0]}x{config.grid[1]}"
            )

    def to(self, device: torch.device) -> None:
        self.tokenizer.to(device)

    def checksum(self) -> str:
        """SHA-256 of the tokenizer (its kind, weights and settings; of another module, its state):
        what a checkpoint records of its targets."""
        if getattr(self, "_checksum", None) is None:
            tok = self.tokenizer
            contents = tok._file_contents() if hasattr(tok, "_file_contents") else tok.state_dict()
            self._checksum = content_digest({"kind": type(tok).__name__, "contents": contents,
                                             "grid": (tok.vocab_size, tok.input_size, tok.patch_size)})
        return self._checksum

    def compile(self) -> None:
        """``torch.compile`` the tokenizer's network in place (the DALL-E encoder; the k-means tokenizer
        is one matrix product and an argmax, nothing to fuse). The trainer calls it with
        ``TrainConfig.compile``; ``beitfast bench --data`` on a GPU times the encoder both ways."""
        encoder = getattr(self.tokenizer, "encoder", None)
        if isinstance(encoder, torch.nn.Module):
            encoder.compile()

    def __call__(self, model, batch):
        views, tokenizer_views, masks = batch
        with torch.no_grad():
            tokens = self.tokenizer.tokenize(tokenizer_views).flatten(1)
        loss, accuracy = model(views, bool_masked_pos=masks, labels=tokens, return_accuracy=True,
                               max_masked_per_image=self.max_masked_per_image)
        return loss, accuracy, masks.sum()


def pretraining_run(model_config: BEiTConfig, tokenizer, source: ImageSource, config: TrainConfig,
                    mask_ratio: float = 0.4, crop_scale=(0.08, 1.0)):
    """``(model, task, stream)`` of a pre-training run on this rank: a new model (the same initial weights
    on every rank), the views of ``config.input_path`` and masks of ``mask_ratio``."""
    ctx = setup_distributed()
    if model_config.image_hw[0] != model_config.image_hw[1]:
        raise ValueError(f"pretrain: square images only, got img_size {model_config.img_size}")
    device = resolve_device(config.device, ctx.local_rank)
    on_device = resolve_input_path(config.input_path, device) == "device"
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = BEiT(model_config)
    transform = TwoViewTransform(model_config.image_hw[0], tokenizer.input_size, scale=crop_scale)
    masking = masking_for(model_config.grid, mask_ratio)
    stream = pretrain_stream(source, transform, masking, config.batch_size,
                             on_device=on_device, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size)
    task = MaskedImageModeling(tokenizer, max_masked_per_image=masking["num_masking_patches"])
    return model, task, stream
