"""Configuration of a BEiT model, and the field checks that it and the trainer's config share."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any, NoReturn, Sequence

import numpy as np

__all__ = ["BEiTConfig", "check_int", "check_real", "check_bool", "check_choice"]


# -- field checks, shared with TrainConfig: each returns the value in its plain Python type (NumPy
# scalars become int/float/bool, so configs stay JSON-serialisable) or raises TypeError (wrong type)
# or ValueError (out of range) naming the owner, the field and the expected form.

def _reject(error: type, owner: str, name: str, expected: str, value: Any) -> NoReturn:
    raise error(f"{owner}: {name} must be {expected}, got {value!r} ({type(value).__name__})")


def check_int(owner: str, name: str, value: Any, minimum: int | None = None,
              optional: bool = False) -> int | None:
    """An integer (Python or NumPy, not bool) that is at least ``minimum``; None too if ``optional``."""
    expected = "an int" if minimum is None else f"an int >= {minimum}"
    if optional:
        if value is None:
            return None
        expected += " or None"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _reject(TypeError, owner, name, expected, value)
    if minimum is not None and value < minimum:
        _reject(ValueError, owner, name, expected, value)
    return int(value)


def check_real(owner: str, name: str, value: Any, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """A finite real number (int, float or NumPy, not bool) in the interval from ``low`` to ``high``
    (each bound included unless open); None too if ``optional``."""
    if low > -math.inf and high < math.inf:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low > -math.inf:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    elif high < math.inf:
        expected = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        expected = "a finite number"
    if optional:
        if value is None:
            return None
        expected += " or None"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _reject(TypeError, owner, name, expected, value)
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        _reject(ValueError, owner, name, expected, value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not (math.isfinite(value) and inside):
        _reject(ValueError, owner, name, expected, value)
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """True or False (Python or NumPy), not a truthy stand-in such as 1 or "no"."""
    if not isinstance(value, (bool, np.bool_)):
        _reject(TypeError, owner, name, "True or False", value)
    return bool(value)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """One of the strings ``choices``."""
    expected = f"one of {list(choices)}"
    if not isinstance(value, str):
        _reject(TypeError, owner, name, expected, value)
    if value not in choices:
        _reject(ValueError, owner, name, expected, value)
    return value


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
    # The step around the fused ops (none changes parameters or state dicts; README "Fast step"):
    fuse_blocks: str = "auto"  # "compile": each block through Inductor; "off"; "auto": compile on CUDA
    residual_dtype: str = "float32"  # "float32" (official) or "autocast": the residual stream's dtype
    checkpoint_blocks: int = 0  # recompute the activations of the first n blocks in backward; -1: all

    def __post_init__(self) -> None:
        owner = "BEiTConfig"
        self.img_size = _check_img_size(self.img_size)
        for name, minimum in (("patch_size", 1), ("in_chans", 1), ("embed_dim", 1), ("depth", 1),
                              ("num_heads", 1), ("vocab_size", 0), ("num_classes", 0)):
            setattr(self, name, check_int(owner, name, getattr(self, name), minimum))
        for field in dataclasses.fields(self):
            if field.type == "bool":  # every switch, however many are added
                setattr(self, field.name, check_bool(owner, field.name, getattr(self, field.name)))
        real = functools.partial(check_real, owner)
        self.mlp_ratio = real("mlp_ratio", self.mlp_ratio, 0, low_open=True)
        self.layer_scale_init_value = real("layer_scale_init_value", self.layer_scale_init_value, 0)
        self.drop_path_rate = real("drop_path_rate", self.drop_path_rate, 0, 1, high_open=True)
        self.init_std = real("init_std", self.init_std, 0, low_open=True)
        self.init_scale = real("init_scale", self.init_scale, 0)
        self.layer_norm_eps = real("layer_norm_eps", self.layer_norm_eps, 0, low_open=True)
        # Imported here: the ops import nothing from the config, but the backends register on import.
        from .ops import dispatch

        check_choice(owner, "kernels", self.kernels, ["auto", *dispatch.backend_names()])
        h, w = self.image_hw
        try:
            mlp_units = self.embed_dim * self.mlp_ratio
        except OverflowError:  # an embed_dim beyond float's range
            mlp_units = math.inf
        checks = [
            (h % self.patch_size == 0 and w % self.patch_size == 0,
             f"img_size must be a multiple of patch_size: {h}x{w} is not divisible by "
             f"patch_size {self.patch_size}"),
            (self.embed_dim % self.num_heads == 0,
             f"embed_dim must be a multiple of num_heads: {self.embed_dim} is not divisible by "
             f"{self.num_heads}"),
            (1 <= mlp_units < math.inf,
             f"embed_dim * mlp_ratio must give the MLP at least one unit and finitely many, "
             f"got int({self.embed_dim} * {self.mlp_ratio})"),
            (not (self.use_rel_pos_bias and self.use_shared_rel_pos_bias),
             "use_rel_pos_bias (per layer) and use_shared_rel_pos_bias exclude each other: they must not "
             "both be True"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"BEiTConfig: {message}")
        self._check_fast_step()

    def _check_fast_step(self) -> None:
        owner = "BEiTConfig"
        check_choice(owner, "fuse_blocks", self.fuse_blocks, ("auto", "compile", "off"))
        check_choice(owner, "residual_dtype", self.residual_dtype, ("float32", "autocast"))
        self.checkpoint_blocks = check_int(owner, "checkpoint_blocks", self.checkpoint_blocks, -1)

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
        _check_names("BEiTConfig.replace", changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BEiTConfig":
        if not isinstance(values, dict):
            raise TypeError(f"BEiTConfig.from_dict: values must be a dict, got {type(values).__name__}")
        _check_names("BEiTConfig.from_dict", values)
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


def _check_names(owner: str, values: dict) -> None:
    known = [f.name for f in dataclasses.fields(BEiTConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{owner}: unknown fields {unknown}; known: {known}")


def _check_img_size(value: Any) -> int | tuple[int, int]:
    """An int, or a (height, width) pair of ints, each >= 1."""
    owner, expected = "BEiTConfig", "an int >= 1 or a (height, width) pair of ints >= 1"
    pair = isinstance(value, (list, tuple))
    sizes = list(value) if pair else [value]
    if pair and len(sizes) != 2:
        _reject(ValueError, owner, "img_size", expected, value)
    for size in sizes:
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
            _reject(TypeError, owner, "img_size", expected, value)
        if size < 1:
            _reject(ValueError, owner, "img_size", expected, value)
    return (int(sizes[0]), int(sizes[1])) if pair else int(value)
