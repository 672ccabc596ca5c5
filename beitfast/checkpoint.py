"""Checkpoint conversions: read any BEiT state dict, export to Hugging Face transformers and timm, files.

This module converts state dicts and reads and writes files; the models are built by
:meth:`beitfast.BEiT.from_state_dict` and :meth:`beitfast.BEiT.from_file` (and the segmentation model's),
which call it. It never imports the model classes (``model`` arguments are any :class:`beitfast.BEiT`).

Formats read by :meth:`BEiT.from_state_dict <beitfast.BEiT.from_state_dict>` (detected from the key
names by :func:`detect_format`, renamed by :func:`to_official_names`):

* ``"official"``: the names of the official BEiT code (pre-training with ``mask_token`` and
  ``lm_head``, or fine-tuning with ``fc_norm`` and ``head``). beitfast and timm (``timm.models.beit``)
  use exactly these names, so they are the same format. ``{"model": ...}``, ``{"state_dict": ...}``
  and ``{"module": ...}`` wrappers and ``module.`` / ``_orig_mod.`` prefixes (DDP, ``torch.compile``)
  are removed, ``relative_position_index`` buffers dropped.
* ``"hf-v4"``: Hugging Face transformers 4.x (``beit.encoder.layer.N.attention.attention.query``...).
* ``"hf-v5"``: Hugging Face transformers 5.x (``beit.layers.N.attention.q_proj``...).

Without a config, the config is inferred from the shapes (:func:`infer_config`, :func:`resolve_config`);
what they do not tell keeps our default, except where the format's own differs (Hugging Face: LayerNorm
eps 1e-12). With one, the state dict is adapted to it (:func:`adapt_state_dict`): a shared bias table is
copied into every layer when the config asks for per-layer tables (as the official fine-tuning does), and
bias tables and the absolute position embedding are resized when the config has another image size
(:mod:`beitfast.resize`: the official geometric-progression cubic resize of the tables, bicubic for the
embedding).

Files (:func:`save`, :func:`read_state_dict`): ``.safetensors`` with the config as JSON in the metadata,
and ``.pth``/``.pt`` holding ``{"model": state_dict, "config": dict}``; both written atomically, with a
SHA-256 of the tensors (:mod:`beitfast._files`) that :func:`read_state_dict` verifies. It also reads
the trainer's ``checkpoint.pt`` (with its model config), official ``.pth`` files, Hugging Face
``model.safetensors`` / ``pytorch_model.bin`` (or their folder, whose ``config.json`` is then used)
and timm files. Every file read must hold finite weights; those without a checksum (foreign files,
files of older beitfast versions) get that check only. An empty, truncated or damaged file is a
:class:`FileIntegrityError` (a ``ValueError``) naming it and what failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ._files import (
    FileIntegrityError, add_digest, add_safetensors_digest, check_contents, check_finite, check_not_empty,
    check_safetensors, read_torch_file, split_digest, verify_digest, write_atomically,
)
from .config import BEiTConfig
from .relative_position import num_relative_positions
from .resize import RESIZE_METHODS, resize_pos_embed, resize_rel_pos_bias_table
from .resize import grid_from_table_rows as _grid_from_table_rows, square_grid as _square_grid

__all__ = [
    "FORMATS", "HF_TASKS", "unwrap_state_dict", "detect_format", "to_official_names", "infer_config",
    "adapt_state_dict", "resolve_config", "resize_rel_pos_bias_table", "resize_pos_embed",
    "to_hf_state_dict", "hf_config_kwargs", "config_from_hf", "to_timm_state_dict", "timm_kwargs",
    "save", "read_state_dict", "read_training_checkpoint", "TRAIN_CHECKPOINT_FORMAT", "FileIntegrityError",
]

FORMATS = ("official", "hf-v4", "hf-v5")
HF_TASKS = ("masked_image_modeling", "image_classification")

# Without a bias table nothing in a state dict tells the number of heads; BEiT models use 64.
DEFAULT_HEAD_DIM = 64
# Without a position embedding or a bias table nothing tells the image size either.
DEFAULT_IMG_SIZE = 224

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
_CONFIG_METADATA_KEY = "beitfast_config"
# The "format" of the trainer's checkpoint.pt (beitfast.train): model, optimizer, step, RNG states.
TRAIN_CHECKPOINT_FORMAT = "beitfast.train-checkpoint"

# -- Hugging Face names ---------------------------------------------------------------------------
# Official name (a parameter, or a module whose ".weight"/".bias" follow) -> Hugging Face name, inside
# one layer and then for the rest of the backbone (under the "beit." prefix).
_HF_LAYER_NAMES = {
    5: {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.q_bias": "attention.q_proj.bias",
        "attn.v_bias": "attention.v_proj.bias",
        "attn.proj": "attention.o_proj",
        "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "gamma_1": "lambda_1",
        "gamma_2": "lambda_2",
    },
    4: {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.q_bias": "attention.attention.query.bias",
        "attn.v_bias": "attention.attention.value.bias",
        "attn.proj": "attention.output.dense",
        "attn.relative_position_bias_table":
            "attention.attention.relative_position_bias.relative_position_bias_table",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
        "gamma_1": "lambda_1",
        "gamma_2": "lambda_2",
    },
}
# The fused qkv weight of the official layout is three separate projections in transformers.
_HF_QKV_NAMES = {
    5: ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"),
    4: tuple(f"attention.attention.{name}.weight" for name in ("query", "key", "value")),
}
_HF_LAYER_PREFIX = {5: "layers.", 4: "encoder.layer."}
# Top-level Hugging Face modules (after "beit.", if any) -> official head modules.
_HF_HEAD_MODULES = {"layernorm": "norm", "lm_head": "lm_head", "classifier": "head", "pooler": "fc_norm"}
_HF_EMBEDDING_NAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
}
_HF_SHARED_TABLE = {
    5: "shared_position_bias.relative_position_bias_table",
    4: "encoder.relative_position_bias.relative_position_bias_table",
}


def _lookup(name: str, table: Mapping[str, str]) -> str | None:
    """``table`` maps parameter names, or module names whose ``.weight``/``.bias`` follow."""
    if name in table:
        return table[name]
    module, _, leaf = name.rpartition(".")
    if module in table and leaf in ("weight", "bias"):
        return f"{table[module]}.{leaf}"
    return None


# -- reading --------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: removes ``{"model": ...}``-style wrappers (nested too),
    drops non-tensor entries of a wrapper (epoch, args...) and strips ``module.`` / ``_orig_mod.``
    prefixes carried by every key."""
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"unwrap_state_dict: expected a state dict (a mapping of tensors), got {type(obj).__name__}"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"unwrap_state_dict: no tensors found; top-level keys: {_few(obj.keys())}")
    changed = True
    while changed:
        changed = False
        for prefix in _STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _few(keys, n: int = 8) -> str:
    keys = sorted(str(k) for k in keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """One of :data:`FORMATS` for an unwrapped state dict; a ValueError naming some keys otherwise."""
    keys = list(state_dict)
    if any(re.match(r"(beit\.)?layers\.\d+\.", k) for k in keys):
        return "hf-v5"
    if any(re.match(r"(beit\.)?encoder\.layer\.\d+\.", k) for k in keys):
        return "hf-v4"
    if any(re.match(r"blocks\.\d+\.attn\.", k) for k in keys):
        return "official"
    raise ValueError(
        "detect_format: not a BEiT state dict of a known format (official/beitfast/timm, Hugging Face "
        f"transformers 4.x or 5.x); keys seen: {_few(keys)}"
    )


def _from_hf(state: Mapping[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """Hugging Face names -> official names. Keys it does not know keep their name (so they are
    reported as unexpected)."""
    layer_names = {hf: ours for ours, hf in _HF_LAYER_NAMES[version].items()}
    backbone_names = {hf: ours for ours, hf in _HF_EMBEDDING_NAMES.items()}
    backbone_names[_HF_SHARED_TABLE[version]] = _SHARED_TABLE
    layer_re = re.compile(re.escape(_HF_LAYER_PREFIX[version]) + r"(\d+)\.(.+)")
    qkv_parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    if "beit.layernorm.weight" in state and "layernorm.weight" in state:
        raise ValueError(
            "Hugging Face state dict has both beit.layernorm and layernorm (a masked-image-modeling model "
            "with use_mean_pooling=False normalises twice); BEiT cannot represent that"
        )
    for key, value in state.items():
        name = key[len("beit."):] if key.startswith("beit.") else key
        head = name.partition(".")[0]
        if head in ("layernorm", "lm_head", "classifier") or name.startswith("pooler.layernorm."):
            out[f"{_HF_HEAD_MODULES[head]}.{name.rpartition('.')[2]}"] = value
            continue
        match = layer_re.fullmatch(name)
        if match:
            index, inner = match.groups()
            if inner in _HF_QKV_NAMES[version]:
                qkv_parts.setdefault(index, {})[inner] = (key, value)
                continue
            ours = _lookup(inner, layer_names)
            out[f"blocks.{index}.{ours}" if ours else key] = value
            continue
        ours = _lookup(name, backbone_names)
        out[ours or key] = value
    for index, parts in qkv_parts.items():
        names = _HF_QKV_NAMES[version]
        if all(n in parts for n in names):
            out[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[n][1] for n in names], dim=0)
        else:  # incomplete: left under their own names, reported with the missing qkv
            out.update(parts.values())
    return out


# What the weights do not tell, where the default of the code that wrote them differs from ours (which
# are the official code's, and timm's): transformers' BeitConfig has layer_norm_eps 1e-12.
_HF_LAYER_NORM_EPS = 1e-12
_FORMAT_DEFAULTS = {fmt: {"layer_norm_eps": _HF_LAYER_NORM_EPS} for fmt in ("hf-v4", "hf-v5")}


def to_official_names(state_dict: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Unwraps a checkpoint and renames it to official names; returns ``(state_dict, format)``."""
    state = unwrap_state_dict(state_dict)
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    fmt = detect_format(state)
    if fmt == "official":
        return dict(state), fmt
    return _from_hf(state, 5 if fmt == "hf-v5" else 4), fmt


def _infer_heads(table: torch.Tensor | None, dim: int) -> int:
    if table is not None:
        return table.shape[1]
    if dim % DEFAULT_HEAD_DIM == 0:
        return dim // DEFAULT_HEAD_DIM
    raise ValueError(
        f"infer_config: no bias table tells the number of heads and embed_dim {dim} is not a multiple of "
        f"the default head dim {DEFAULT_HEAD_DIM}; pass a config"
    )


def _infer_grid(pos_embed: torch.Tensor | None, table: torch.Tensor | None, patch: int) -> tuple[int, int]:
    if pos_embed is not None:
        return _square_grid(pos_embed.shape[1] - 1, "infer_config: pos_embed")
    if table is not None:
        grid = _grid_from_table_rows(table.shape[0])
        if grid is None:
            raise ValueError(
                f"infer_config: bias table with {table.shape[0]} rows is not (2G-1)^2 + 3 for a square grid; "
                "pass a config with img_size"
            )
        return grid
    return (DEFAULT_IMG_SIZE // patch,) * 2


def infer_config(state_dict: Mapping[str, torch.Tensor], **overrides) -> BEiTConfig:
    """The :class:`BEiTConfig` of an official-names state dict, from its shapes.

    embed_dim from ``cls_token``; depth from the block indices; heads from the width of a bias table,
    else ``embed_dim // 64`` (:data:`DEFAULT_HEAD_DIM`); patch size and channels from the patch
    projection; image size from ``pos_embed``, else from the bias table rows (square grids), else
    :data:`DEFAULT_IMG_SIZE`; vocab from ``lm_head``; classes from ``head``; mean pooling from
    ``fc_norm`` (models with an LM head keep the default); layer scale from ``gamma_1``. Fields the
    weights do not determine (drop path, eps, kernels...) keep their defaults; ``overrides`` set them
    (``num_heads`` and ``img_size`` given there are not inferred).
    """
    sd = state_dict
    required = ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"infer_config: cannot infer a config without {missing}; keys seen: {_few(sd)}")
    dim = sd["cls_token"].shape[-1]
    proj = sd["patch_embed.proj.weight"]
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        raise ValueError(
            f"infer_config: patch_embed.proj.weight must be [D, C, p, p], got {tuple(proj.shape)}"
        )
    patch = proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    per_layer = "blocks.0.attn.relative_position_bias_table" in sd
    shared = _SHARED_TABLE in sd
    table = sd.get(_SHARED_TABLE, sd.get("blocks.0.attn.relative_position_bias_table"))
    values = {}
    if "num_heads" not in overrides:
        values["num_heads"] = _infer_heads(table, dim)
    if "img_size" not in overrides:
        grid = _infer_grid(sd.get("pos_embed"), table, patch)
        values["img_size"] = grid[0] * patch if grid[0] == grid[1] else (grid[0] * patch, grid[1] * patch)
    vocab = sd["lm_head.weight"].shape[0] if "lm_head.weight" in sd else 0
    values.update(
        patch_size=patch,
        in_chans=proj.shape[1],
        embed_dim=dim,
        depth=depth,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        vocab_size=vocab,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        use_abs_pos_emb="pos_embed" in sd,
        use_rel_pos_bias=per_layer and not shared,
        use_shared_rel_pos_bias=shared,
        # An LM-head model has no fc_norm; it keeps the default (mean pooling).
        use_mean_pooling="fc_norm.weight" in sd or vocab > 0,
    )
    if "blocks.0.gamma_1" not in sd:
        values["layer_scale_init_value"] = 0.0
    return BEiTConfig(**{**values, **overrides})


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: BEiTConfig, rel_pos_resize: str = "geometric"
) -> dict[str, torch.Tensor]:
    """An official-names state dict made to fit ``config``: a shared bias table becomes per-layer
    tables when the config asks for them; bias tables and ``pos_embed`` are resized to its grid (the
    tables by ``rel_pos_resize``, a method of :func:`resize_rel_pos_bias_table`: the official
    geometric-progression cubic resize by default, or ``"bicubic"``)."""
    if rel_pos_resize not in RESIZE_METHODS:
        raise ValueError(
            f"adapt_state_dict: rel_pos_resize must be one of {RESIZE_METHODS}, got {rel_pos_resize!r}"
        )
    sd = dict(state_dict)
    per_layer = "blocks.0.attn.relative_position_bias_table"
    if config.use_rel_pos_bias and _SHARED_TABLE in sd and per_layer not in sd:
        shared = sd.pop(_SHARED_TABLE)
        for i in range(config.depth):
            sd[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    rows = num_relative_positions(config.grid)
    for key, value in sd.items():
        if key.endswith("relative_position_bias_table") and value.dim() == 2 and value.shape[0] != rows:
            sd[key] = resize_rel_pos_bias_table(value, config.grid, method=rel_pos_resize)
    pos = sd.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape[1] != config.num_patches + 1:
        sd["pos_embed"] = resize_pos_embed(pos, config.grid)
    return sd


def resolve_config(state: Mapping[str, torch.Tensor], fmt: str, config: BEiTConfig | None,
                   overrides: Mapping[str, Any]) -> BEiTConfig:
    """The config of a model for an official-names state dict renamed from ``fmt``: ``config`` with
    ``overrides``, or without one inferred from the shapes (:func:`infer_config`)."""
    if config is None:
        # Overrides go into the inference: they may give what the shapes do not tell (num_heads, img_size);
        # what they do not give either is the default of the format the weights come from.
        return infer_config(state, **{**_FORMAT_DEFAULTS.get(fmt, {}), **overrides})
    return config.replace(**overrides)


# -- export ---------------------------------------------------------------------------------------


def _default_task(config: BEiTConfig, task: str | None) -> str:
    task = task or ("masked_image_modeling" if config.vocab_size > 0 else "image_classification")
    if task not in HF_TASKS:
        raise ValueError(f"task must be one of {HF_TASKS}, got {task!r}")
    return task


def _hf_head_names(config: BEiTConfig, task: str) -> dict[str, str]:
    """Official head modules -> Hugging Face names for ``task``."""
    if task == "masked_image_modeling":
        if config.vocab_size == 0:
            raise ValueError(
                "to_hf_state_dict: masked_image_modeling needs an LM head; this model has vocab_size=0"
            )
        # BeitForMaskedImageModeling normalises in its own `layernorm` (its backbone's is an identity).
        return {"norm": "layernorm", "lm_head": "lm_head"}
    if config.use_mean_pooling and config.vocab_size > 0:
        raise ValueError(
            "to_hf_state_dict: image_classification of a model with an LM head and mean pooling (mean of the "
            "normed tokens, no fc_norm) has no BeitForImageClassification equivalent"
        )
    if config.use_mean_pooling:
        return {"fc_norm": "beit.pooler.layernorm", "head": "classifier"}
    return {"norm": "beit.layernorm", "head": "classifier"}


def to_hf_state_dict(model: torch.nn.Module, version: int = 5,
                     task: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent transformers model, in the key names of transformers 5.x
    (``version=5``) or 4.x (``version=4``).

    ``task`` picks the model class: ``"masked_image_modeling"`` (``BeitForMaskedImageModeling``,
    the default when the model has an LM head; the classifier, if any, is left out) or
    ``"image_classification"`` (``BeitForImageClassification``; mask token and LM head left out).
    Build the peer with ``transformers.BeitConfig(**hf_config_kwargs(model.config, task))``.
    ``version=5`` gives the names of a transformers 5.x model's ``state_dict()``; files are better
    written with ``version=4``: transformers 5.x converts 4.x names when loading and writes them back
    in ``save_pretrained``, and 4.x reads only those.
    """
    if version not in _HF_LAYER_NAMES:
        raise ValueError(f"to_hf_state_dict: version must be 4 or 5, got {version!r}")
    config = model.config
    task = _default_task(config, task)
    heads = _hf_head_names(config, task)
    layer_names = _HF_LAYER_NAMES[version]
    backbone_names = {**_HF_EMBEDDING_NAMES, _SHARED_TABLE: _HF_SHARED_TABLE[version]}
    if task == "image_classification":
        backbone_names.pop("mask_token")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            index, inner = match.groups()
            prefix = f"beit.{_HF_LAYER_PREFIX[version]}{index}."
            if inner == "attn.qkv.weight":
                for name, part in zip(_HF_QKV_NAMES[version], value.chunk(3, dim=0)):
                    out[prefix + name] = part.clone()
                continue
            out[prefix + _lookup(inner, layer_names)] = value
            continue
        module, _, leaf = key.rpartition(".")
        if module in heads:
            out[f"{heads[module]}.{leaf}"] = value
            continue
        hf = _lookup(key, backbone_names)
        if hf is not None:
            out["beit." + hf] = value
    return out


def hf_config_kwargs(config: BEiTConfig, task: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``transformers.BeitConfig`` describing the same model (see
    :func:`to_hf_state_dict` for ``task``). Dropout and drop path are off (inference)."""
    task = _default_task(config, task)
    _hf_head_names(config, task)  # refuses what transformers cannot represent
    image = config.image_hw
    if image[0] != image[1]:
        raise ValueError(f"hf_config_kwargs: transformers BEiT supports square images only, got {image}")
    kwargs = dict(
        image_size=image[0],
        patch_size=config.patch_size,
        num_channels=config.in_chans,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=int(config.embed_dim * config.mlp_ratio),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        layer_norm_eps=config.layer_norm_eps,
        layer_scale_init_value=config.layer_scale_init_value,
        use_absolute_position_embeddings=config.use_abs_pos_emb,
        use_relative_position_bias=config.use_rel_pos_bias,
        use_shared_relative_position_bias=config.use_shared_rel_pos_bias,
        initializer_range=config.init_std,
    )
    if task == "masked_image_modeling":
        kwargs.update(vocab_size=config.vocab_size, use_mask_token=True, use_mean_pooling=True)
    else:
        kwargs.update(
            use_mask_token=False, use_mean_pooling=config.use_mean_pooling, num_labels=config.num_classes
        )
    return kwargs


def config_from_hf(hf_config: Any, **overrides) -> BEiTConfig:
    """A :class:`BEiTConfig` from a ``transformers.BeitConfig`` or its ``config.json`` dict.

    The LM head is taken from ``architectures`` (``BeitForMaskedImageModeling``) when present, else
    from ``use_mask_token``; the classifier from ``num_labels`` / ``id2label`` for classification.
    """
    c = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    architectures = c.get("architectures") or []
    if architectures:
        mim = "BeitForMaskedImageModeling" in architectures
    else:
        mim = c.get("use_mask_token", False)
    classification = "BeitForImageClassification" in architectures
    if classification:
        num_classes = c.get("num_labels") or len(c.get("id2label") or {})
    else:
        num_classes = 0
    size = c.get("image_size", 224)
    hidden = c.get("hidden_size", 768)
    values = dict(
        img_size=size if isinstance(size, int) else tuple(size),
        patch_size=c.get("patch_size", 16),
        in_chans=c.get("num_channels", 3),
        embed_dim=hidden,
        depth=c.get("num_hidden_layers", 12),
        num_heads=c.get("num_attention_heads", 12),
        mlp_ratio=c.get("intermediate_size", 4 * hidden) / hidden,
        vocab_size=c.get("vocab_size", 8192) if mim else 0,
        num_classes=num_classes,
        use_abs_pos_emb=c.get("use_absolute_position_embeddings", False),
        use_rel_pos_bias=c.get("use_relative_position_bias", False),
        use_shared_rel_pos_bias=c.get("use_shared_relative_position_bias", False),
        layer_scale_init_value=c.get("layer_scale_init_value", 0.1),
        use_mean_pooling=c.get("use_mean_pooling", True),
        layer_norm_eps=c.get("layer_norm_eps", _HF_LAYER_NORM_EPS),
        drop_path_rate=c.get("drop_path_rate", 0.1),
    )
    return BEiTConfig(**{**values, **overrides})


def to_timm_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent ``timm.models.beit.Beit`` (built with
    :func:`timm_kwargs`). timm uses the official names; it has no mask token and no LM head, so those
    are left out."""
    return {k: v for k, v in model.state_dict().items() if k != "mask_token" and not k.startswith("lm_head.")}


def timm_kwargs(config: BEiTConfig) -> dict[str, Any]:
    """Keyword arguments of ``timm.models.beit.Beit`` (or ``timm.create_model(name, **kwargs)``) for
    the same backbone and classifier. Dropout and drop path are off (inference)."""
    has_fc_norm = config.use_mean_pooling and config.vocab_size == 0
    kwargs = dict(
        img_size=config.image_hw,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        global_pool="avg" if config.use_mean_pooling else "token",
        use_fc_norm=has_fc_norm,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=True,
        init_values=config.layer_scale_init_value or None,
        use_abs_pos_emb=config.use_abs_pos_emb,
        use_rel_pos_bias=config.use_rel_pos_bias,
        use_shared_rel_pos_bias=config.use_shared_rel_pos_bias,
        drop_path_rate=0.0,
    )
    if config.layer_norm_eps != 1e-6:  # timm's LayerNorm default
        import timm.layers

        kwargs["norm_layer"] = functools.partial(timm.layers.LayerNorm, eps=config.layer_norm_eps)
    return kwargs


# -- files ----------------------------------------------------------------------------------------


def _config_json(config: BEiTConfig) -> str:
    return json.dumps(config.to_dict())


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Writes the weights and config: ``.safetensors`` (config JSON and the SHA-256 of tensors and config
    in the metadata) or ``.pth``/``.pt`` (``{"model": state_dict, "config": dict, "beitfast_sha256": str}``),
    atomically."""
    import safetensors.torch

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        metadata = {"format": "pt", _CONFIG_METADATA_KEY: _config_json(model.config)}
        metadata = add_safetensors_digest(state, metadata)
        write_atomically(path, lambda temp: safetensors.torch.save_file(state, temp, metadata=metadata))
    elif path.suffix in (".pth", ".pt"):
        payload = add_digest({"model": state, "config": json.loads(_config_json(model.config))})
        write_atomically(path, lambda temp: torch.save(payload, temp))
    else:
        raise ValueError(f"save: path must end in .safetensors, .pth or .pt, got {str(path)!r}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], BEiTConfig | None]:
    """The tensors of a safetensors file, checked (digest if recorded, finiteness), and its config."""
    import safetensors

    check_not_empty(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise FileIntegrityError(
            path, f"cannot be read as a safetensors file, truncated or damaged ({reason})"
        ) from None
    check_safetensors(path, state, metadata)
    config = metadata.get(_CONFIG_METADATA_KEY)
    return state, (BEiTConfig.from_dict(json.loads(config)) if config else None)


def _read_torch(path: Path) -> tuple[Any, BEiTConfig | None]:
    """The payload of a ``torch.save`` file, checked (digest if recorded, finiteness), and the config it
    stores: ours (``config``, or ``model_config`` in a training checkpoint) only."""
    # Official training checkpoints also hold their argparse arguments.
    payload, digest = split_digest(read_torch_file(path, safe_globals=[argparse.Namespace]))
    check_contents(path, payload, digest)
    if isinstance(payload, Mapping) and payload.get("format") == TRAIN_CHECKPOINT_FORMAT:
        return payload["model"], BEiTConfig.from_dict(payload["model_config"])
    config = payload.get("config") if isinstance(payload, Mapping) else None
    # Other training scripts store their own "config"; only ours has BEiTConfig fields only.
    fields = {f.name for f in dataclasses.fields(BEiTConfig)}
    ours = isinstance(config, Mapping) and bool(config) and set(config) <= fields
    return payload, (BEiTConfig.from_dict(config) if ours else None)


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of a checkpoint of the trainer (:mod:`beitfast.train`), verified: its checksum (when it
    has one: files of older versions do not) and finite model and optimizer values. A damaged file is a
    :class:`FileIntegrityError`, another kind of file a ``ValueError``."""
    payload, digest = split_digest(read_torch_file(path))
    verify_digest(path, payload, digest)  # first: a damaged file is reported as damaged, whatever it holds
    kind = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if kind != TRAIN_CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a beitfast training checkpoint (format {kind!r}, expected "
                         f"{TRAIN_CHECKPOINT_FORMAT!r})")
    check_finite(path, payload)
    return payload


def _hf_config_in(folder: Path) -> BEiTConfig | None:
    """The config of a transformers ``config.json`` in ``folder``, if any. timm's hub folders have a
    config.json of their own (no ``model_type``): for those the shapes tell the config."""
    config_file = folder / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    return config_from_hf(hf_config) if hf_config.get("model_type") == "beit" else None


def _read_weights_file(path: Path) -> tuple[Any, BEiTConfig | None]:
    """The checkpoint in the file ``path`` and the config stored in it, if any."""
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)


def _read_hf_folder(folder: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return _read_weights_file(folder / name)[0]
        index = folder / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(unwrap_state_dict(_read_weights_file(folder / shard)[0]))
            return state
    raise FileNotFoundError(f"load: {str(folder)!r} holds no model.safetensors or pytorch_model.bin")


def _read_file(path: Path) -> tuple[Any, BEiTConfig | None]:
    """The checkpoint in ``path`` and the config it stores or has beside it (transformers)."""
    if path.is_dir():
        return _read_hf_folder(path), _hf_config_in(path)
    payload, config = _read_weights_file(path)
    return payload, config or _hf_config_in(path.parent)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str, BEiTConfig | None]:
    """The BEiT state dict of a file or a Hugging Face model folder of any supported format, in official
    names: ``(state_dict, format, config)``. ``config`` is the one stored by :func:`save` or in a
    transformers ``config.json`` beside the weights, else None. ``.pth``/``.pt``/``.bin`` files are read
    with ``torch.load(weights_only=True)``; a folder's ``model.safetensors`` or ``pytorch_model.bin`` (or
    their sharded ``.index.json``) is read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: no such file or folder {str(path)!r}")
    payload, stored = _read_file(path)
    try:
        state, fmt = to_official_names(payload)
    except (TypeError, ValueError) as error:  # what the file holds is not a BEiT state dict
        raise ValueError(f"{path}: {error}") from None
    return state, fmt, stored
