"""The native extension ``beitfast._C`` (built from csrc/ by setup.py), loaded on first use.

Importing ``beitfast`` does not load it. A backend that needs it passes ``available(op, device_type)``
to ``dispatch.register``: the callable returns why the backend cannot run in this install (extension
not built, built without CUDA, op missing from the build), or None. The first failed load logs one
warning; afterwards the reasons say the rest.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Callable

import torch

__all__ = ["load", "has_cuda_ops", "missing", "available"]

_logger = logging.getLogger("beitfast")
_module: ModuleType | None = None
_load_error: str | None = None
_attempted = False


def load() -> ModuleType | None:
    """``beitfast._C`` (importing it registers the ops in ``torch.ops.beitfast``), or None when it is not
    built or cannot be loaded (then one warning is logged, on the first call only)."""
    global _module, _load_error, _attempted
    if not _attempted:
        _attempted = True
        try:
            _module = importlib.import_module("beitfast._C")
        except ImportError as error:
            if isinstance(error, ModuleNotFoundError) and error.name == "beitfast._C":
                _load_error = "beitfast._C is not built"
            else:
                # Built but unloadable, e.g. compiled against another torch.
                _load_error = f"beitfast._C failed to load ({error})"
            _logger.warning("%s: pure PyTorch fallbacks are used; see DEVELOPERS.md", _load_error)
    return _module


def has_cuda_ops() -> bool:
    """Whether the extension is loaded and was compiled with its CUDA kernels."""
    module = load()
    return module is not None and bool(module.with_cuda)


def missing(op: str | None = None, device_type: str = "cpu") -> str | None:
    """Why ``torch.ops.beitfast.<op>`` (``"name"`` or ``"name.overload"``) cannot run on
    ``device_type`` in this install, or None when it can. With ``op=None``, only the build is checked."""
    module = load()
    if module is None:
        return f"{_load_error} (see DEVELOPERS.md)"
    if device_type == "cuda" and not module.with_cuda:
        return ("beitfast._C was built without CUDA (BEITFAST_BUILD_CUDA=0, torch without CUDA, or no nvcc "
                "at build time)")
    if op is not None:
        name, _, overload = op.partition(".")
        packet = getattr(torch.ops.beitfast, name, None)
        if packet is None or (overload or "default") not in packet.overloads():
            return f"beitfast._C has no op beitfast::{op} (rebuild the extension)"
        key = "CUDA" if device_type == "cuda" else "CPU"
        if not torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"beitfast::{op}", key):
            return f"beitfast._C has no {key} kernel for beitfast::{op}"
    return None


def available(op: str | None = None, device_type: str = "cpu") -> Callable[[], str | None]:
    """The ``available`` callable of ``dispatch.register`` for a backend running ``op`` on
    ``device_type``: ``dispatch.register("loss", "cuda", check, available=_ext.available("x", "cuda"))``."""
    def why_missing() -> str | None:
        return missing(op, device_type)

    why_missing.asked_when_needed = True  # importing beitfast does not load the extension
    return why_missing
