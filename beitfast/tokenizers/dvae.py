"""The DALL-E dVAE encoder as a tokenizer (the tokenizer of the BEiT paper).

Architecture of the official ``dall_e.encoder.Encoder`` (Ramesh et al., 2021), written in plain
PyTorch with the official parameter names, so the official ``encoder.pkl`` loads with a strict
``load_state_dict``:

    input  7x7 conv 3 -> n_hid
    group_1..group_4: n_blk_per_group residual blocks each (width n_hid * 1, 2, 4, 8), then a 2x2 max
                      pool after groups 1-3 (112 -> 14 pixels)
    output ReLU, 1x1 conv -> vocab_size logits; token = argmax over the vocabulary

A block is ``id_path(x) + post_gain * res_path(x)`` with ``post_gain = 1 / n_layers**2`` (``n_layers``
= all blocks of the encoder), ``id_path`` a 1x1 conv where the width changes, and ``res_path`` =
ReLU, 3x3 conv to width/4, ReLU, 3x3, ReLU, 3x3, ReLU, 1x1 conv back to the width. Pixels enter
through ``map_pixels(x) = (1 - 2 eps) x + eps`` with ``eps = 0.1``.

Precision follows the official code: the convolutions may run in reduced precision (under autocast
here; the official code used float16 on CUDA) but the output conv and the argmax run in float32.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .._files import check_contents
from . import safe_pickle
from .base import Tokenizer

__all__ = ["DalleTokenizer", "DalleEncoder", "map_pixels"]

LOGIT_LAPLACE_EPS = 0.1
GROUP_COUNT = 4


def map_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] to the open interval the dVAE was trained on (its logit-Laplace likelihood)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS


class Conv2d(nn.Module):
    """Same-padded convolution with the official parameter names ``w`` ``[out, in, k, k]`` and ``b``."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        # The official initialisation; loaded weights replace it.
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv2d(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv2d(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv2d(n_hid, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """``[B, input_channels, S, S]`` mapped pixels -> ``[B, vocab_size, S/8, S/8]`` float32 logits."""

    def __init__(
        self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192
    ):
        super().__init__()
        if n_hid < 4 or n_hid % 4 or n_blk_per_group < 1 or input_channels < 1 or vocab_size < 1:
            raise ValueError(
                f"DalleEncoder: need n_hid a positive multiple of 4, n_blk_per_group, input_channels, "
                f"vocab_size >= 1; got n_hid={n_hid}, n_blk_per_group={n_blk_per_group}, "
                f"input_channels={input_channels}, vocab_size={vocab_size}"
            )
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = GROUP_COUNT * n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7))]
        width = n_hid
        for group in range(GROUP_COUNT):
            group_width = n_hid * 2**group
            layers: list[tuple[str, nn.Module]] = []
            for block in range(n_blk_per_group):
                layers.append((f"block_{block + 1}", EncoderBlock(width, group_width, n_layers)))
                width = group_width
            if group < GROUP_COUNT - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{group + 1}", nn.Sequential(OrderedDict(layers))))
        output = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(width, vocab_size, 1))])
        groups.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *body, output = self.blocks
        for layer in body:
            x = layer(x)
        # The vocabulary logits stay in float32 (the official output conv never used float16): the
        # argmax decides the token, and reduced precision would flip near-ties.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.conv2d(F.relu(x.float()), output.conv.w.float(), output.conv.b.float())


class DalleTokenizer(Tokenizer):
    """The DALL-E dVAE encoder: 8192 tokens, one per 8x8 pixels of the 112 view (14 x 14 tokens).

    ``DalleTokenizer.from_file("encoder.pkl")`` loads the official weights through a restricted
    unpickler (``safe_pickle``): no code from the file runs. ``DalleTokenizer(...)`` alone has random
    weights.
    """

    kind = "dalle"

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        vocab_size: int = 8192,
        input_size: int = 112,
        input_channels: int = 3,
    ):
        super().__init__(vocab_size=vocab_size, input_size=input_size, patch_size=2 ** (GROUP_COUNT - 1))
        if input_channels != 3:
            raise ValueError(
                f"DalleTokenizer: tokenizes RGB images, input_channels must be 3, got {input_channels}"
            )
        self.encoder = DalleEncoder(n_hid, n_blk_per_group, input_channels, vocab_size)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], input_size: int = 112
    ) -> "DalleTokenizer":
        """From encoder weights named as in the official encoder (``blocks.input.w``, ...); the
        architecture is read from the shapes."""
        try:
            input_w = state_dict["blocks.input.w"]
            vocab_size = state_dict["blocks.output.conv.w"].shape[0]
        except KeyError as missing:
            raise ValueError(f"DalleTokenizer: not DALL-E encoder weights, {missing} is missing") from None
        if input_w.dim() != 4:
            raise ValueError(f"DalleTokenizer: blocks.input.w must be a [n_hid, channels, 7, 7] convolution "
                             f"weight, got shape {list(input_w.shape)}")
        first_group_blocks = [key for key in state_dict if key.startswith("blocks.group_1.block_")]
        n_blk_per_group = sum(1 for key in first_group_blocks if key.endswith(".res_path.conv_1.w"))
        tokenizer = cls(
            n_hid=input_w.shape[0], n_blk_per_group=n_blk_per_group, vocab_size=vocab_size,
            input_size=input_size, input_channels=input_w.shape[1],
        )
        try:
            tokenizer.encoder.load_state_dict(dict(state_dict), strict=True)
        except RuntimeError as error:  # missing, unexpected or mis-shaped weights, listed by torch
            details = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
            raise ValueError(f"DalleTokenizer: the weights do not fit a DALL-E encoder: {details}") from None
        return tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike, input_size: int = 112) -> "DalleTokenizer":
        """Load the official ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder``, zip or legacy
        ``torch.save`` format) or a ``torch.save``-d state dict with the official names, safely."""
        obj = safe_pickle.load(path)
        if isinstance(obj, safe_pickle.PickledObject):
            if obj.qualified_name != "dall_e.encoder.Encoder":
                raise ValueError(
                    f"{os.fspath(path)}: holds a {obj.qualified_name}, not a dall_e.encoder.Encoder"
                )
            try:
                state_dict = _pickled_module_state_dict(obj)
            except ValueError as error:
                raise ValueError(f"{os.fspath(path)}: {error}") from None
        elif isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state_dict = obj
        else:
            raise ValueError(
                f"{os.fspath(path)}: expected a pickled dall_e.encoder.Encoder or its state dict, "
                f"got {type(obj).__name__}"
            )
        check_contents(path, state_dict, None)  # a foreign file: no checksum to verify
        try:
            return cls.from_state_dict(state_dict, input_size=input_size)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from None

    # "auto": bfloat16 on CUDA, the weights' dtype elsewhere; "bf16" or "fp32" to choose.
    precision = "auto"
    PRECISIONS = ("auto", "bf16", "fp32")

    def _tokenize(self, images: torch.Tensor) -> torch.Tensor:
        if self.precision not in self.PRECISIONS:
            raise ValueError(f"DalleTokenizer: precision must be one of {self.PRECISIONS}, got {self.precision!r}")
        weights_dtype = self.encoder.blocks.input.w.dtype
        reduced = self.precision == "bf16" or (self.precision == "auto" and images.is_cuda
                                               and weights_dtype == torch.float32)
        if not reduced:
            return self.encoder(map_pixels(images.to(weights_dtype))).argmax(dim=1)
        # The body in bfloat16 on channels-last tensors (tensor cores, cuDNN's NHWC convolutions); the
        # encoder's output conv and the argmax stay float32 (see DalleEncoder.forward).
        pixels = map_pixels(images.float()).contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return self.encoder(pixels).argmax(dim=1)

    def _file_contents(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = {"input_size": self.input_size}
        return self.encoder.state_dict(), config

    @classmethod
    def _from_file_contents(
        cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> "DalleTokenizer":
        return cls.from_state_dict(tensors, input_size=config["input_size"])


def _pickled_module_state_dict(root: safe_pickle.PickledObject) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled ``nn.Module`` tree, named as ``state_dict`` would name them.
    Walked without recursion; a module met twice (a crafted file whose tree contains itself) is refused."""
    tensors: dict[str, torch.Tensor] = {}
    pending = [(root, "")]
    seen = {id(root)}
    while pending:
        module, prefix = pending.pop()
        for table in ("_parameters", "_buffers"):
            for name, tensor in (module.state.get(table) or {}).items():
                if tensor is not None:
                    tensors[prefix + name] = tensor.detach()
        for name, child in (module.state.get("_modules") or {}).items():
            if child is None:  # nn.Module allows empty submodule slots
                continue
            if not isinstance(child, safe_pickle.PickledObject):
                raise ValueError(
                    f"pickled module {prefix + name!r} is a {type(child).__name__}, not a module"
                )
            if id(child) in seen:
                raise ValueError(f"pickled module {prefix + name!r} appears twice in the module tree (it "
                                 "contains itself, or is shared): not an encoder's module tree")
            seen.add(id(child))
            pending.append((child, f"{prefix}{name}."))
    return tensors
