"""Segmentation checkpoints: ours, the official (mmseg) code's, transformers' BeitForSemanticSegmentation.

The conversions only: :class:`BEiTForSegmentation <beitfast.segmentation.BEiTForSegmentation>` builds
the models (``from_state_dict``, ``from_file``, ``from_backbone``) with them; this module never imports
the model classes. Names of the formats read (by :func:`to_our_names`) and written by the exports:

* ``"beitfast"``: ``backbone.*`` (official BEiT names), ``neck.fpn1.0.weight``..., ``decode_head.*`` and
  ``auxiliary_head.*`` in mmseg's names (``conv_seg`` the classifier).
* ``"mmseg"`` (the official code): the same, with the neck inside the backbone (``backbone.fpn1.0``...).
* ``"hf-v4"`` / ``"hf-v5"``: transformers 4.x / 5.x: the backbone under ``beit.`` as for the other BEiT
  models, the neck as ``fpn1.0``... (4.x) or ``fpn.fpn1.conv_transpose1``... (5.x), the heads'
  ``classifier`` and, in 5.x, ``psp_bottleneck``, ``psp_modules.blocks.i.conv`` and
  ``convolution``/``normalization`` for ``conv``/``bn`` (the renames transformers 5 applies itself to
  4.x files).

BatchNorm running statistics travel with the weights. The backbone part goes through
:mod:`beitfast.checkpoint` (format, inference of its config, shared to per-layer tables, the official
resize of the tables when the image size changes).

Files (:func:`save`, :func:`read_state_dict`): ours as :mod:`beitfast.checkpoint` writes them (atomic,
with a SHA-256), both configs stored; :func:`read_state_dict` also reads official/mmseg ``.pth`` files
and transformers folders (or their weights file beside a ``config.json``), with the same integrity
checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import checkpoint as beit_checkpoint
from .._files import add_digest, add_safetensors_digest, write_atomically
from ..config import BEiTConfig
from .config import SegmentationConfig, default_out_indices

__all__ = ["SEGMENTATION_FORMATS", "detect_format", "to_our_names", "infer_segmentation_config",
           "resolve_configs", "backbone_state_dict", "to_mmseg_state_dict", "to_hf_state_dict",
           "hf_config_kwargs", "segmentation_config_from_hf", "save", "read_state_dict"]

SEGMENTATION_FORMATS = ("beitfast", "mmseg", "hf-v4", "hf-v5")
_HEADS = ("decode_head.", "auxiliary_head.")
# Backbone entries the segmentation backbone does not have (heads and final norms of other tasks).
_OTHER_TASKS = re.compile(r"(norm|fc_norm|head|lm_head)\.(weight|bias)|mask_token")

# Neck and heads, rule by rule (re.sub in order). Ours -> transformers 4.x and back:
_TO_HF4 = [(r"^neck\.", ""), (r"^(decode_head|auxiliary_head)\.conv_seg\.", r"\1.classifier.")]
_FROM_HF4 = [(r"^(fpn[12]\.)", r"neck.\1"), (r"^(decode_head|auxiliary_head)\.classifier\.", r"\1.conv_seg.")]
# transformers 4.x -> 5.x and back (the 4.x -> 5.x rules are those transformers 5 applies on load).
_HF4_TO_HF5 = [
    (r"^fpn1\.0\.", "fpn.fpn1.conv_transpose1."),
    (r"^fpn1\.1\.", "fpn.fpn1.normalization."),
    (r"^fpn1\.3\.", "fpn.fpn1.conv_transpose2."),
    (r"^fpn2\.0\.", "fpn.fpn2."),
    (r"^decode_head\.bottleneck\.", "decode_head.psp_bottleneck."),
    (r"\.psp_modules\.(\d+)\.1\.conv\.", r".psp_modules.blocks.\1.conv.convolution."),
    (r"\.psp_modules\.(\d+)\.1\.bn\.", r".psp_modules.blocks.\1.conv.normalization."),
    (r"\.conv\.weight$", ".convolution.weight"),
    (r"\.bn\.", ".normalization."),
]
_HF5_TO_HF4 = [
    (r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."),
    (r"^fpn\.fpn2\.", "fpn2.0."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.psp_modules\.blocks\.(\d+)\.conv\.convolution\.", r".psp_modules.\1.1.conv."),
    (r"\.psp_modules\.blocks\.(\d+)\.conv\.normalization\.", r".psp_modules.\1.1.bn."),
    (r"\.convolution\.weight$", ".conv.weight"),
    (r"\.normalization\.", ".bn."),
]


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """One of :data:`SEGMENTATION_FORMATS`; a ValueError naming the keys otherwise, and saying so when
    the state dict is a BEiT of another task (pre-training, classification)."""
    keys = list(state_dict)
    if any(k.startswith(_HEADS) for k in keys):
        if any(k.startswith("neck.") for k in keys):
            return "beitfast"
        if any(k.startswith("backbone.") for k in keys):
            return "mmseg"
        beit = {k: v for k, v in state_dict.items() if k.startswith("beit.")}
        if beit:
            return beit_checkpoint.detect_format(beit)
    try:
        other = beit_checkpoint.detect_format(state_dict)
    except ValueError:
        other = None
    if other is not None:
        raise ValueError(
            f"not a segmentation checkpoint: a BEiT state dict ({other} names) without decode heads, of "
            "another task (pre-training or classification); BEiTForSegmentation.from_backbone starts a "
            "segmentation model from it"
        )
    raise ValueError(
        "not a BEiT segmentation state dict of a known format (beitfast, official/mmseg, transformers "
        f"BeitForSemanticSegmentation 4.x or 5.x); keys seen: {beit_checkpoint._few(keys)}"
    )


def to_our_names(state_dict: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Unwraps a checkpoint and renames it to ours; returns ``(state_dict, format)``. Entries a
    segmentation model does not have (final norms, mask token, relative position indices) are dropped."""
    state = beit_checkpoint.unwrap_state_dict(state_dict)
    fmt = detect_format(state)
    if fmt in ("beitfast", "mmseg"):
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        rest.update({f"neck.{k}": backbone.pop(k) for k in list(backbone) if k.startswith("fpn")})
    else:
        backbone = {k: v for k, v in state.items() if k.startswith("beit.")}
        rest = {k: v for k, v in state.items() if not k.startswith("beit.")}
        if fmt == "hf-v5":
            rest = {_rename(k, _HF5_TO_HF4): v for k, v in rest.items()}
        rest = {_rename(k, _FROM_HF4): v for k, v in rest.items()}
    backbone, _ = beit_checkpoint.to_official_names(backbone)
    out = {f"backbone.{k}": v for k, v in backbone.items() if not _OTHER_TASKS.fullmatch(k)}
    out.update(rest)
    return out, fmt


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def infer_segmentation_config(state: Mapping[str, torch.Tensor], depth: int,
                              **overrides) -> SegmentationConfig:
    """The :class:`SegmentationConfig` of a state dict in our names, from its shapes: classes and
    channels from the classifiers, the auxiliary head's presence and width. Pool scales (when there
    are four pooling branches), out_indices (for depth 12 or 24), taps, dropout and the loss keep the
    official defaults; ``overrides`` set them."""
    classifier = state.get("decode_head.conv_seg.weight")
    if classifier is None:
        raise ValueError(
            "infer_segmentation_config: no decode_head.conv_seg.weight (the classifier) in the state dict"
        )
    values: dict[str, Any] = dict(num_classes=classifier.shape[0], channels=classifier.shape[1])
    auxiliary = state.get("auxiliary_head.conv_seg.weight")
    values["auxiliary_channels"] = auxiliary.shape[1] if auxiliary is not None else 0
    branches = len({m.group(1) for k in state if (m := re.match(r"decode_head\.psp_modules\.(\d+)\.", k))})
    if "pool_scales" not in overrides and branches != 4:
        raise ValueError(
            f"infer_segmentation_config: the decode head has {branches} pooling branches, not the official "
            "4; pass pool_scales"
        )
    if "out_indices" not in overrides:
        values["out_indices"] = default_out_indices(depth)
    return SegmentationConfig(**{**values, **overrides})


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    segmentation_fields = {f.name for f in dataclasses.fields(SegmentationConfig)}
    return ({k: v for k, v in overrides.items() if k not in segmentation_fields},
            {k: v for k, v in overrides.items() if k in segmentation_fields})


def resolve_configs(state: Mapping[str, torch.Tensor], fmt: str, config: BEiTConfig | None,
                    segmentation: SegmentationConfig | None, overrides: Mapping[str, Any]
                    ) -> tuple[BEiTConfig, SegmentationConfig, dict[str, torch.Tensor]]:
    """The configs of a model for a state dict in our names renamed from ``fmt``, and the state dict
    adapted to them.

    Configs not given are inferred from the shapes (:func:`beitfast.checkpoint.infer_config`, with
    transformers' LayerNorm eps 1e-12 for its names; :func:`infer_segmentation_config`); ``overrides``
    change fields of either (by name). A ``config`` of another image size gets the backbone's tables
    resized the official way."""
    beit_overrides, seg_overrides = _split_overrides(dict(overrides))
    backbone = _part(state, "backbone.")
    if config is None:  # what the shapes do not tell is the default of the code that wrote them
        defaults = beit_checkpoint._FORMAT_DEFAULTS.get(fmt, {})
        config = beit_checkpoint.infer_config(backbone, **{**defaults, **beit_overrides})
    else:
        config = config.replace(**beit_overrides)
    backbone = beit_checkpoint.adapt_state_dict(backbone, config.replace(vocab_size=0, num_classes=0))
    state = {**{f"backbone.{k}": v for k, v in backbone.items()},
             **{k: v for k, v in state.items() if not k.startswith("backbone.")}}
    if segmentation is None:
        segmentation = infer_segmentation_config(state, config.depth, **seg_overrides)
    else:
        segmentation = segmentation.replace(**seg_overrides)
    return config, segmentation, state


def backbone_state_dict(state_dict: Any) -> dict[str, torch.Tensor]:
    """The backbone entries of a BEiT state dict of another task, in any format (the official names;
    final norms, heads and mask token dropped), for :meth:`BEiTForSegmentation.from_backbone`."""
    state, _ = beit_checkpoint.to_official_names(state_dict)
    return {k: v for k, v in state.items() if not _OTHER_TASKS.fullmatch(k)}


def to_mmseg_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The names of the official/mmseg code: the neck back inside the backbone."""
    return {re.sub(r"^neck\.", "backbone.", k): v for k, v in model.state_dict().items()}


def to_hf_state_dict(model: torch.nn.Module, version: int = 5) -> dict[str, torch.Tensor]:
    """The state dict of transformers' ``BeitForSemanticSegmentation`` in 5.x (or 4.x) names; build the
    peer with ``transformers.BeitConfig(**hf_config_kwargs(model))``."""
    if version not in (4, 5):
        raise ValueError(f"to_hf_state_dict: version must be 4 or 5, got {version!r}")
    out = beit_checkpoint.to_hf_state_dict(model.backbone, version, task="image_classification")
    for key, value in model.state_dict().items():
        if not key.startswith("backbone."):
            key = _rename(key, _TO_HF4)
            out[_rename(key, _HF4_TO_HF5) if version == 5 else key] = value
    return out


def hf_config_kwargs(model: torch.nn.Module, out_indices=None) -> dict[str, Any]:
    """Keyword arguments of ``transformers.BeitConfig`` for the same model.

    transformers reads ``out_indices`` as ``hidden_states[i - 1]`` (the output of block i - 2) and
    accepts only increasing indices in [0, depth]. A model with ``taps="huggingface"`` keeps its
    indices; official block indices b become b + 2, which transformers can express only when the last
    block is not tapped. The official recipes tap it (11 of 12 blocks, 23 of 24): no transformers
    config computes those models, and this raises unless ``out_indices`` is given (transformers' own
    conversions of the official checkpoints give the official numbers, e.g. [3, 5, 7, 11], so that
    model reads blocks 1, 3, 5, 9). Our own taps are recorded beside (``beitfast_out_indices``,
    ``beitfast_taps``, kept in ``config.json``) for :func:`segmentation_config_from_hf`.
    transformers averages the loss over labelled pixels (``loss_average="labelled_pixels"``)."""
    seg = model.segmentation_config
    depth = model.config.depth
    if seg.channels != model.config.embed_dim:
        raise ValueError(
            f"hf_config_kwargs: transformers' UPerNet head is as wide as the backbone "
            f"({model.config.embed_dim}), this one has channels={seg.channels}"
        )
    if out_indices is None:
        out_indices = [i + 2 for i in seg.out_indices] if seg.taps == "official" else list(seg.out_indices)
        if out_indices != sorted(set(out_indices)) or not all(0 <= i <= depth for i in out_indices):
            raise ValueError(
                f"hf_config_kwargs: transformers cannot tap the blocks {list(seg.out_indices)} of {depth} "
                f"(its out_indices [i + 2] = {out_indices} must increase within [0, {depth}]: the last "
                "block's output is out of its reach); pass out_indices to export anyway, knowing it reads "
                "other blocks"
            )
    # Mean pooling: transformers' final layernorm is then an identity, as our backbone's.
    backbone = model.config.replace(use_mean_pooling=True)
    kwargs = beit_checkpoint.hf_config_kwargs(backbone, "image_classification")
    kwargs.update(
        num_labels=seg.num_classes, out_indices=list(out_indices), pool_scales=list(seg.pool_scales),
        use_auxiliary_head=seg.auxiliary_channels > 0, auxiliary_channels=seg.auxiliary_channels or 256,
        auxiliary_num_convs=1, auxiliary_concat_input=False, auxiliary_loss_weight=seg.auxiliary_loss_weight,
        semantic_loss_ignore_index=seg.ignore_index,
        beitfast_out_indices=list(seg.out_indices), beitfast_taps=seg.taps,
    )
    return kwargs


def segmentation_config_from_hf(hf_config: Any, **overrides) -> SegmentationConfig:
    """A :class:`SegmentationConfig` from a ``transformers.BeitConfig`` or its ``config.json`` dict.

    The taps are those recorded by :func:`hf_config_kwargs` when it wrote the config; otherwise
    ``out_indices`` keep their numbers and are read the official way (``taps="official"``): the
    published transformers checkpoints are conversions of the official ones, trained with those
    blocks. Pass ``taps="huggingface"`` to compute what transformers computes with them."""
    c = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    values = dict(
        num_classes=c.get("num_labels") or len(c.get("id2label") or {}) or 2,
        out_indices=tuple(c.get("beitfast_out_indices") or c.get("out_indices") or (3, 5, 7, 11)),
        taps=c.get("beitfast_taps", "official"),
        channels=c.get("hidden_size", 768),
        auxiliary_channels=c.get("auxiliary_channels", 256) if c.get("use_auxiliary_head", True) else 0,
        pool_scales=tuple(c.get("pool_scales", (1, 2, 3, 6))),
        auxiliary_loss_weight=c.get("auxiliary_loss_weight", 0.4),
        ignore_index=c.get("semantic_loss_ignore_index", 255),
    )
    return SegmentationConfig(**{**values, **overrides})


_SEGMENTATION_METADATA_KEY = "beitfast_segmentation_config"


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Writes the weights and both configs, atomically: ``.safetensors`` (configs as JSON in the
    metadata) or ``.pth``/``.pt`` (``{"model", "config", "segmentation"}``), with a SHA-256."""
    import safetensors.torch

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Through JSON in both formats: tuples become lists, as a reader gets them back.
    config, segmentation = model.config.to_dict(), json.loads(json.dumps(model.segmentation_config.to_dict()))
    if path.suffix == ".safetensors":
        metadata = {"format": "pt", beit_checkpoint._CONFIG_METADATA_KEY: json.dumps(config),
                    _SEGMENTATION_METADATA_KEY: json.dumps(segmentation)}
        metadata = add_safetensors_digest(state, metadata)
        write_atomically(path, lambda temp: safetensors.torch.save_file(state, temp, metadata=metadata))
    elif path.suffix in (".pth", ".pt"):
        payload = add_digest({"model": state, "config": config, "segmentation": segmentation})
        write_atomically(path, lambda temp: torch.save(payload, temp))
    else:
        raise ValueError(f"save: path must end in .safetensors, .pth or .pt, got {str(path)!r}")


def _stored_segmentation(path: Path, payload: Any) -> SegmentationConfig | None:
    """The segmentation config saved with ours, or of a transformers ``config.json`` beside the weights."""
    if path.suffix == ".safetensors":
        import safetensors

        with safetensors.safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(_SEGMENTATION_METADATA_KEY)
        if stored:
            return SegmentationConfig(**json.loads(stored))
    elif isinstance(payload, Mapping) and isinstance(payload.get("segmentation"), Mapping):
        return SegmentationConfig(**payload["segmentation"])
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if "BeitForSemanticSegmentation" in (hf_config.get("architectures") or []):
        return segmentation_config_from_hf(hf_config)
    return None


def read_state_dict(path: str | os.PathLike
                    ) -> tuple[dict[str, torch.Tensor], str, BEiTConfig | None, SegmentationConfig | None]:
    """The segmentation state dict of a file (ours, an official/mmseg ``.pth``, a transformers weights
    file) or a transformers folder, in our names: ``(state_dict, format, config, segmentation)``, the
    configs those stored with ours or in a transformers ``config.json`` (None when there are none)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: no such file or folder {str(path)!r}")
    payload, stored = beit_checkpoint._read_file(path)
    try:
        state, fmt = to_our_names(payload)
    except (TypeError, ValueError) as error:  # what the file holds is not a segmentation state dict
        raise ValueError(f"{path}: {error}") from None
    return state, fmt, stored, _stored_segmentation(path, payload)
