"""Reading a ``torch.save`` file from an untrusted source without running code from it.

A pickle is a program: every global it names is imported and may be called with arguments the file
chooses (``os.system``, ``builtins.exec``, ...). ``load`` runs ``torch.load`` with a restricted
pickle module whose ``find_class`` resolves only an allowlist:

* the functions that rebuild tensors and parameters from their storages, ``collections.OrderedDict``,
  ``builtins.set`` and ``torch.device`` (storages are resolved by ``torch.load`` itself);
* the classes of the module tree in an official DALL-E ``encoder.pkl`` (``dall_e.*`` and the
  ``torch.nn`` containers and layers it uses), each replaced by an inert ``PickledObject`` stand-in
  that only records the state the file gives it; no class of the file is ever instantiated.

Any other global raises ``UnsafePickleError`` naming it, before anything is called. Both the zip
format (``data.pkl`` plus ``data/<storage>``) and the legacy format of old ``torch.save`` are read.
An empty, truncated or damaged file is a ``beitfast.checkpoint.FileIntegrityError`` naming it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import types
import warnings
from typing import Any

import torch._utils

from .._files import read_torch_file

__all__ = ["UnsafePickleError", "PickledObject", "load"]


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global outside the allowlist; nothing from it was called."""


class PickledObject:
    """Inert stand-in for an object of an allowed class: its class name and the state it was pickled with.

    Pickle builds objects with ``cls.__new__(cls, *args)`` then ``obj.__setstate__(state)`` (or
    ``cls(*args)`` for a reduce); both only store what they are given.
    """

    qualified_name = "?"
    args: tuple
    kwargs: dict
    state: dict

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, {}
        return obj

    def __setstate__(self, state: Any) -> None:
        # nn.Module pickles its __dict__; a (dict, slots) pair is the other form pickle may use.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"{self.qualified_name}: expected a dict state, got {type(state).__name__}"
            )
        self.state = state

    def __repr__(self) -> str:
        return f"PickledObject({self.qualified_name})"


# The module tree of the official DALL-E encoder (dall_e/encoder.py, dall_e/utils.py) and the torch.nn
# classes inside it. Only their names are trusted: each becomes a PickledObject subclass.
_STAND_IN_CLASSES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
)

_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "torch.device": torch.device,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    **{
        name: type(name.rsplit(".", 1)[1], (PickledObject,), {"qualified_name": name})
        for name in _STAND_IN_CLASSES
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the allowlisted globals."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's default) writes Python 2 names, e.g. ``__builtin__.set``.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified_name = f"{module}.{name}"
        try:
            return _ALLOWED_GLOBALS[qualified_name]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{qualified_name}': not one of the classes and functions a "
                f"DALL-E encoder file or a tensor checkpoint needs"
            ) from None


def _restricted_load(file, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a pickle module: ``Unpickler`` (subclassed for tensor storages) and
# ``load`` (the legacy format's header records).
restricted_pickle_module = types.SimpleNamespace(
    __name__="beitfast.tokenizers.safe_pickle", Unpickler=RestrictedUnpickler, load=_restricted_load
)


def load(path: str | os.PathLike) -> Any:
    """Unpickle the ``torch.save`` file at ``path`` with the allowlist; tensors land on the CPU."""
    with warnings.catch_warnings():
        # The legacy format stores the source of module classes to compare it with the installed one;
        # the stand-ins have none, which is expected.
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        return read_torch_file(
            path, passthrough=(UnsafePickleError,), pickle_module=restricted_pickle_module, weights_only=False
        )
