"""BEiT in plain PyTorch, with the official semantics and parameter names; the three fused regions
(patch embedding, attention, LM loss) go through :mod:`beitfast.ops`."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import checkpoint, ops
from .config import BEiTConfig
from .relative_position import num_relative_positions, relative_position_index

__all__ = ["BEiT", "relative_position_index", "num_relative_positions"]


def backend_for(op: str, kernels: str) -> str | None:
    """``config.kernels`` names a backend for every op that has one; the others stay on auto."""
    return kernels if kernels in ops.backends(op) else None


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at +-std, as the official pre-training code initialises; sampled by
    inverse CDF (torch's trunc_normal_ takes ~1 s per BEiT-B weight on CPU)."""
    bound = math.erf(1 / math.sqrt(2))  # the +-1 sigma cut, in erf space
    with torch.no_grad():
        tensor.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2)).clamp_(-std, std)
    return tensor


def drop_path_scale(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor | None:
    """Stochastic depth: the per-sample factor ``[B, 1, ..., 1]`` of a residual branch, 0 (dropped,
    probability ``rate``) or ``1 / (1 - rate)``; None when nothing is dropped."""
    if rate == 0.0 or not training:
        return None
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x.new_empty(shape, dtype=torch.float32).bernoulli_(keep).div_(keep)


class RelativePositionBias(nn.Module):
    """A learnable ``[R, H]`` bias table (shared by all layers, or one per layer)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_positions(grid), num_heads))


class Attention(nn.Module):
    def __init__(self, config: BEiTConfig):
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.scale = config.head_dim ** -0.5
        self.backend = backend_for("attention", config.kernels)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        if config.use_rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(num_relative_positions(config.grid), config.num_heads)
            )
        else:
            self.relative_position_bias_table = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rel_index, shared_bias=None):
        """``shared_bias``: the dense bias of the table all layers share, gathered once per forward
        (``ops.relative_position_bias``); a layer with a table of its own passes it to the op, which
        gathers it (the triton backend straight into the compute dtype)."""
        B, N, C = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        bias = dict(bias=shared_bias)
        if self.relative_position_bias_table is not None:
            bias = dict(bias_table=self.relative_position_bias_table, rel_index=rel_index)
        # Packed in, [B, N, H, D] out: the Triton kernels need no copy either way.
        out = ops.rel_pos_attention_packed(
            qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads), scale=self.scale,
            backend=self.backend, **bias,
        )
        return self.proj(out.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block with layer scale and drop path (the official ``Block``).

    The fast step (``BEiTConfig.fuse_blocks``, ``residual_dtype``, ``checkpoint_blocks``) changes how
    the block runs, never its parameters: see :meth:`body`.
    """

    def __init__(self, config: BEiTConfig, drop_path_rate: float, checkpointed: bool = False):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))
        self.drop_path_rate = drop_path_rate
        self.fuse = config.fuse_blocks
        self.residual_in_autocast_dtype = config.residual_dtype == "autocast"
        self.checkpointed = checkpointed
        if config.layer_scale_init_value > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, rel_index, shared_bias=None):
        # Drop-path factors are drawn here, outside a compiled body, in the order of the plain block
        # (attention branch, then MLP branch): the same random stream, and one compiled graph serves
        # every block whatever its rate.
        scale_1 = drop_path_scale(x, self.drop_path_rate, self.training)
        scale_2 = drop_path_scale(x, self.drop_path_rate, self.training)
        body = self.body
        if self._fused(x):
            body = functools.partial(_compiled_block_body(), self)
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(body, x, rel_index, shared_bias, scale_1, scale_2,
                                                     use_reentrant=False)
        return body(x, rel_index, shared_bias, scale_1, scale_2)

    def _fused(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():  # inside a compiled model: Inductor fuses the plain body
            return False
        return self.fuse == "compile" or (self.fuse == "auto" and x.is_cuda)

    def body(self, x, rel_index, shared_bias, scale_1, scale_2):
        """The block on a residual stream ``x`` with drop-path factors ``scale_1``, ``scale_2``.

        Under autocast the LayerNorm outputs are cast to the autocast dtype, which the next linear
        layer does anyway (same numerics; a fused LayerNorm then writes 16-bit activations). The
        residual stream stays float32 as in the official code (``gamma * y`` promotes) unless
        ``residual_dtype="autocast"``; then the branch ``gamma * y * scale`` is still computed in
        float32 and rounded once, when added to the 16-bit stream.
        """
        compute = _autocast_dtype(x)
        keep = self.residual_in_autocast_dtype and compute is not None
        if keep:
            x = x.to(compute)
        h = self.norm1(x)
        y = self.attn(h if compute is None else h.to(compute), rel_index, shared_bias)
        x = _residual_add(x, y, self.gamma_1, scale_1, keep)
        h = self.norm2(x)
        y = self.mlp(h if compute is None else h.to(compute))
        return _residual_add(x, y, self.gamma_2, scale_2, keep)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _residual_add(x, y, gamma, scale, keep_dtype: bool):
    """``x + drop_path(gamma * y)``: layer scale, stochastic depth and the residual add (one fused
    kernel when compiled), in the promoted dtype (official) or, with ``keep_dtype``, in ``x``'s."""
    branch = y if gamma is None else gamma * y
    if scale is not None:  # official: the factor in the branch's dtype; ours: rounded once, at the add
        branch = branch * (scale if keep_dtype else scale.to(branch.dtype))
    return x + branch.to(x.dtype) if keep_dtype else x + branch


@functools.cache
def _compiled_block_body():
    """``Block.body`` through Inductor, shared by every block (parameters are graph inputs): LayerNorm
    with its cast, bias + GELU, and layer scale + drop path + residual become one kernel each; the
    fused ops stay single nodes. The body compiles as one graph (tests/test_fast_step.py checks it
    with ``fullgraph=True``), but it is not demanded here: with ``fullgraph=True`` a process that
    runs more model variants than Dynamo's recompile limit would fail, instead of running the rest
    eagerly."""
    return torch.compile(Block.body)


class PatchEmbed(nn.Module):
    """Holds the conv-layout projection ``proj`` ``[D, C, p, p]``; the op does the work."""

    def __init__(self, config: BEiTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=p, stride=p)


class BEiT(nn.Module):
    """The BEiT vision Transformer (pre-training LM head and/or classifier).

    * ``model(images, bool_masked_pos=mask)`` -> logits of the masked positions ``[num_masked, V]``,
      in ``x[bool_masked_pos]`` order (a shape only the mask decides: this reads its count, one host
      synchronisation on a GPU);
    * ``model(images, bool_masked_pos=mask, max_masked_per_image=K)`` -> the same logits padded per
      image, ``[B, min(K, N), V]``, with no host synchronisation: row ``k`` of image ``b`` is its
      ``k``-th masked position in position order, rows past the image's count ``mask[b].sum()`` are
      NaN (padding), and an image with more than ``K`` masked positions is a ValueError where the mask
      can be read (CPU, or ``BEITFAST_CHECKS=1``), else all NaN;
    * ``model(images, bool_masked_pos=mask, labels=tokens)`` -> mean cross-entropy over the masked
      positions, through the fused loss (``return_accuracy=True`` adds the MIM accuracy;
      ``max_masked_per_image``, the most patches the masking covers in an image, bounds the rows the
      loss plans: the trainer passes its masking's ``num_masking_patches``). No host synchronisation;
    * ``model(images)`` -> class logits ``[B, num_classes]``, or pooled features if no classifier;
    * ``model.forward_features(images, bool_masked_pos=None)`` -> final hidden states ``[B, 1+N, D]``.
    """

    def __init__(self, config: BEiTConfig | None = None, **overrides):
        super().__init__()
        if config is not None and not isinstance(config, BEiTConfig):
            raise TypeError(f"BEiT: config must be a BEiTConfig or None, got {type(config).__name__}")
        # replace() checks every field again, also of a config changed after it was made.
        config = (config or BEiTConfig()).replace(**overrides)
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.vocab_size > 0 else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, config.num_patches + 1, dim)) if config.use_abs_pos_emb else None
        )
        self.rel_pos_bias = (
            RelativePositionBias(config.grid, config.num_heads) if config.use_shared_rel_pos_bias else None
        )
        # Derivable from the config, so not saved in state dicts.
        self.register_buffer("rel_pos_index", relative_position_index(config.grid), persistent=False)
        # On the CPU explicitly: models built on the meta device (checkpoint loading) need real values here.
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        checkpointed = config.depth if config.checkpoint_blocks < 0 else config.checkpoint_blocks
        self.blocks = nn.ModuleList(Block(config, rate, i < checkpointed) for i, rate in enumerate(rates))
        pooled_norm = config.use_mean_pooling and config.vocab_size == 0
        self.norm = nn.Identity() if pooled_norm else nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if pooled_norm else None
        self.lm_head = nn.Linear(dim, config.vocab_size) if config.vocab_size > 0 else None
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else None
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """The official initialisation: truncated normal (std ``init_std``) for linear layers and
        tokens, residual output projections rescaled by depth, a small classifier."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for t in (self.cls_token, self.mask_token, self.pos_embed):
            if t is not None:
                trunc_normal_(t, std)
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))
        if self.head is not None:
            self.head.weight.data.mul_(self.config.init_scale)
            self.head.bias.data.mul_(self.config.init_scale)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the official recipe excludes from weight decay (besides 1-D params)."""
        return {"cls_token", "pos_embed", "mask_token"}

    # -- forward -----------------------------------------------------------------------------------

    def _check_inputs(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> None:
        c = self.config
        expected = (c.in_chans, *c.image_hw)
        form = f"a floating-point [B, {expected[0]}, {expected[1]}, {expected[2]}] tensor"
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"BEiT: images must be {form}, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"BEiT: images must be {form}, got {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"BEiT: images must be {form}, got {tuple(images.shape)}")
        if bool_masked_pos is None:
            return
        if self.mask_token is None:
            raise ValueError("BEiT: bool_masked_pos needs a mask token; this model has vocab_size=0")
        form = f"a bool [B, N] = [{images.shape[0]}, {c.num_patches}] tensor"
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise TypeError(f"BEiT: bool_masked_pos must be {form}, got {type(bool_masked_pos).__name__}")
        if bool_masked_pos.dtype != torch.bool:
            raise TypeError(f"BEiT: bool_masked_pos must be {form}, got {bool_masked_pos.dtype}")
        if tuple(bool_masked_pos.shape) != (images.shape[0], c.num_patches):
            raise ValueError(f"BEiT: bool_masked_pos must be {form}, got {tuple(bool_masked_pos.shape)}")

    def forward_features(self, images: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, 1 + N, D]`` (after the final norm)."""
        self._check_inputs(images, bool_masked_pos)
        x = ops.masked_patch_embed(
            images, self.patch_embed.proj.weight, self.patch_embed.proj.bias, self.config.patch_size,
            mask=bool_masked_pos, mask_token=self.mask_token if bool_masked_pos is not None else None,
            cls_token=self.cls_token, pos_embed=self.pos_embed,
            backend=backend_for("patch_embed", self.config.kernels),
        )
        shared = None
        if self.rel_pos_bias is not None:  # gathered once: autograd sums all layers' gradients before the fold
            shared = ops.relative_position_bias(self.rel_pos_bias.relative_position_bias_table, self.rel_pos_index)
        for block in self.blocks:
            x = block(x, self.rel_pos_index, shared)
        return self.norm(x)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]``: mean of the patch tokens (+ fc_norm), or the cls token."""
        if self.config.use_mean_pooling:
            pooled = hidden[:, 1:].mean(dim=1)
            return self.fc_norm(pooled) if self.fc_norm is not None else pooled
        return hidden[:, 0]

    def forward(
        self,
        images: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_accuracy: bool = False,
        max_masked_per_image: int | None = None,
    ):
        if labels is not None and bool_masked_pos is None:
            raise ValueError("BEiT: labels (visual tokens) need bool_masked_pos")
        if bool_masked_pos is None:
            pooled = self.pool(self.forward_features(images))
            return self.head(pooled) if self.head is not None else pooled
        if self.lm_head is None:
            raise ValueError("BEiT: masked image modeling needs an LM head; this model has vocab_size=0")
        patches = self.forward_features(images, bool_masked_pos)[:, 1:]
        if labels is None:
            if max_masked_per_image is None:
                return self.lm_head(patches[bool_masked_pos])
            return self._padded_masked_logits(patches, bool_masked_pos, max_masked_per_image)
        return ops.masked_lm_cross_entropy(
            patches, self.lm_head.weight, self.lm_head.bias, labels, mask=bool_masked_pos,
            backend=backend_for("cross_entropy", self.config.kernels), return_accuracy=return_accuracy,
            max_masked_per_image=max_masked_per_image,
        )

    def _padded_masked_logits(self, patches: torch.Tensor, mask: torch.Tensor, bound) -> torch.Tensor:
        """``[B, min(bound, N), V]`` logits of each image's masked positions, NaN past its count (see the
        class docstring), computed without reading anything on the host."""
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
            raise ValueError(f"BEiT: max_masked_per_image must be an int >= 0 or None, got {bound!r}")
        count = mask.sum(1, keepdim=True)
        if ops.dispatch.may_inspect_values(mask) and int(count.max()) > bound:
            raise ValueError(f"BEiT: max_masked_per_image={bound}, but bool_masked_pos masks "
                             f"{int(count.max())} patches in one image")
        rows = min(bound, mask.shape[1])
        # A stable sort of "not masked" puts each image's masked positions first, in position order.
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :rows]
        picked = patches.gather(1, order.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        logits = self.lm_head(picked)
        keep = (torch.arange(rows, device=mask.device) < count) & (count <= bound)
        return logits.masked_fill(~keep.unsqueeze(-1), float("nan"))

    # -- checkpoints (the conversions are in beitfast.checkpoint) -------------------------------------

    @staticmethod
    def from_state_dict(state_dict, config: BEiTConfig | None = None, strict: bool = True,
                        **overrides) -> "BEiT":
        """A model holding the weights of any supported state dict (official, beitfast, timm, transformers
        4.x/5.x; see :mod:`beitfast.checkpoint`).

        ``config=None`` infers it from the shapes; ``overrides`` change fields of the given or inferred
        config (e.g. ``kernels="eager"``, ``drop_path_rate=0.0``). ``strict=True`` refuses missing or
        unexpected keys (listing them); ``strict=False`` warns and initialises the missing ones as a new
        model would (e.g. a new classifier on a pre-trained backbone). A shape mismatch is always an
        error. The model is on the CPU, in float32 (the checkpoint's dtype is cast).
        """
        state, fmt = checkpoint.to_official_names(state_dict)
        return _from_official_names(state, fmt, config, strict, overrides)

    @staticmethod
    def from_file(path, config: BEiTConfig | None = None, strict: bool = True, **overrides) -> "BEiT":
        """A model from a ``.safetensors``/``.pth``/``.pt``/``.bin`` file or a Hugging Face model folder of
        any supported format.

        The config is, in order: ``config``; the one stored by :meth:`save`; a transformers
        ``config.json`` beside the weights; inferred from the shapes. ``overrides`` change its fields.
        ``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)``; a folder's
        ``model.safetensors`` or ``pytorch_model.bin`` (or their sharded ``.index.json``) is read.
        """
        state, fmt, stored = checkpoint.read_state_dict(path)
        return _from_official_names(state, fmt, config or stored, strict, overrides)

    load = from_file

    def save(self, path) -> None:
        """Writes ``.safetensors`` or ``.pth``/``.pt`` (weights and config), atomically."""
        checkpoint.save(self, path)

    def resized(self, img_size) -> "BEiT":
        """A copy for another image size (bias tables and position embedding interpolated)."""
        return BEiT.from_state_dict(self.state_dict(), self.config.replace(img_size=img_size))

    def to_hf_state_dict(self, version: int = 5, task: str | None = None) -> dict[str, torch.Tensor]:
        """Weights in transformers 5.x (or 4.x) names; ``task`` picks the masked-image-modeling or
        image-classification model."""
        return checkpoint.to_hf_state_dict(self, version, task)

    def to_hf_config(self, task: str | None = None) -> dict:
        """Keyword arguments of ``transformers.BeitConfig`` for the same model."""
        return checkpoint.hf_config_kwargs(self.config, task)

    def to_timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the equivalent ``timm.models.beit.Beit`` (no mask token, no LM head)."""
        return checkpoint.to_timm_state_dict(self)

    def timm_kwargs(self) -> dict:
        """Keyword arguments of ``timm.models.beit.Beit`` for the same model."""
        return checkpoint.timm_kwargs(self.config)


def _from_official_names(state: dict[str, torch.Tensor], fmt: str, config: BEiTConfig | None, strict: bool,
                         overrides: dict[str, Any]) -> BEiT:
    """``BEiT.from_state_dict`` of a state dict already renamed from ``fmt``."""
    config = checkpoint.resolve_config(state, fmt, config, overrides)
    return _load_checked(config, checkpoint.adapt_state_dict(state, config), strict)


def _uninitialised_model(config: BEiTConfig) -> BEiT:
    """``BEiT(config)`` without its random initialisation (slow for large models, and every weight
    is about to be overwritten): built on the meta device, then given CPU storage; the one derived
    buffer, the relative position index, is recomputed."""
    with torch.device("meta"):
        model = BEiT(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.rel_pos_index.copy_(relative_position_index(config.grid))
    return model


def _load_checked(config: BEiTConfig, state_dict: Mapping[str, torch.Tensor], strict: bool) -> BEiT:
    model = _uninitialised_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise ValueError("BEiT.from_state_dict: shape mismatch for " + "; ".join(mismatched))
    if missing or unexpected:
        message = f"BEiT.from_state_dict: missing keys {missing}, unexpected keys {unexpected}"
        if strict:
            raise ValueError(message + " (strict=False loads the rest)")
        # stacklevel: the caller of BEiT.from_state_dict / from_file.
        warnings.warn(message + "; missing ones get the initialisation of a new model", stacklevel=4)
        if missing:
            # A whole new model: reset_parameters alone would leave the parameters it does not draw
            # (zero biases and tables, layer scale, the patch projection) as uninitialised memory.
            model = BEiT(config)
    model.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False)
    return model
