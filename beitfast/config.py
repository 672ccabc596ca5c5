"""Configuration of a BEiT model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class BEiTConfig:
    """Hyper-parameters of :class:`beitfast.BEiT` (names follow the official code).

    The presets give the pre-training configuration of the paper (LM head over ``vocab_size``
    visual tokens, shared relative position bias, no classifier); pass overrides for fine-tuning,
    e.g. ``BEiTConfig.base(num_classes=1000, vocab_size=0, use_shared_rel_pos_bias=False,
    use_rel_pos_bias=True)``.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vocab_size: int = 8192  # 0: no LM head and no mask token
    num_classes: int = 0  # 0: no classifier
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = False  # one bias table per layer
    use_shared_rel_pos_bias: bool = True  # one bias table for all layers
    layer_scale_init_value: float = 0.1  # 0 disables layer scale
    drop_path_rate: float = 0.1
    use_mean_pooling: bool = True  # classifier input: mean of patch tokens + fc_norm (else cls)
    init_std: float = 0.02
    init_scale: float = 0.001  # scales the classifier's initial weights (official fine-tuning)
    layer_norm_eps: float = 1e-6
    kernels: str = "auto"  # "auto" or a backend name for every fused op

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
        h, w = self.image_hw
        checks = [
            (self.patch_size > 0, f"patch_size must be positive, got {self.patch_size}"),
            (h % self.patch_size == 0 and w % self.patch_size == 0,
             f"img_size {h}x{w} is not divisible by patch_size {self.patch_size}"),
            (self.embed_dim % max(self.num_heads, 1) == 0 and self.num_heads > 0,
             f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"),
            (self.depth > 0, f"depth must be positive, got {self.depth}"),
            (self.vocab_size >= 0 and self.num_classes >= 0, "vocab_size and num_classes must be >= 0"),
            (not (self.use_rel_pos_bias and self.use_shared_rel_pos_bias),
             "use_rel_pos_bias (per layer) and use_shared_rel_pos_bias exclude each other"),
            (0.0 <= self.drop_path_rate < 1.0, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"BEiTConfig: {message}")

    @property
    def image_hw(self) -> tuple[int, int]:
        if isinstance(self.img_size, tuple):
            return self.img_size
        return (self.img_size, self.img_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(Wh, Ww)``."""
        h, w = self.image_hw
        return (h // self.patch_size, w // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **changes) -> "BEiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BEiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"BEiTConfig.from_dict: unknown fields {unknown}")
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides) -> "BEiTConfig":
        return cls(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **overrides})

    @classmethod
    def small(cls, **overrides) -> "BEiTConfig":
        return cls(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **overrides})

    @classmethod
    def base(cls, **overrides) -> "BEiTConfig":
        return cls(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **overrides})

    @classmethod
    def large(cls, **overrides) -> "BEiTConfig":
        return cls(
            **{"embed_dim": 1024, "depth": 24, "num_heads": 16, "layer_scale_init_value": 1e-5, **overrides}
        )
