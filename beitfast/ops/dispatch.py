"""The one dispatcher of the fused ops.

Every op (``attention``, ``cross_entropy``, ``patch_embed``) has several backends. A backend
declares two things: whether it is usable in this install at all (``available``) and, for given
inputs, the reasons it cannot take them (``check``; an empty list means it can). The public function
of an op validates its arguments once, then asks ``select`` for a backend:

* ``backend="name"`` (or the model's ``config.kernels``) asks for one backend; if it refuses the
  inputs the error says why.
* ``backend=None`` / ``"auto"`` takes the first backend in the op's preference order for the input's
  device that accepts the inputs; if none does, the error lists every backend's reasons.
* ``BEITFAST_BACKEND`` overrides both: ``BEITFAST_BACKEND=eager`` (every op that has such a backend)
  or ``BEITFAST_BACKEND=attention=flex,cross_entropy=eager`` (per op).

``explain(op, **inputs)`` returns each backend's reasons without running anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Backend", "register", "backends", "select", "explain", "set_preference", "preference",
           "may_inspect_values", "accepts_all"]

Reasons = list[str]
# What the public functions take; the eager definitions run in any of them (float64 is the reference),
# the fused backends say in their ``check`` which they support.
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable[..., Any]
    check: Callable[..., Reasons]
    available: Callable[[], str | None]

    def reasons(self, inputs: dict[str, Any]) -> Reasons:
        missing = self.available()
        if missing:
            return [missing]
        return list(self.check(**inputs))


_REGISTRY: dict[str, dict[str, Backend]] = {}
# Preference per op and device type, fastest first. Backends not listed come last, in the order they
# were registered. `set_preference` replaces an entry (the measured per-GPU table does that).
_PREFERENCE: dict[str, dict[str, list[str]]] = {
    "attention": {
        "cuda": ["triton", "flash", "sdpa", "xformers", "flex", "eager"],
        "cpu": ["sdpa", "eager"],
    },
    "cross_entropy": {"cuda": ["triton", "cuda", "eager"], "cpu": ["eager"]},
    "patch_embed": {"cuda": ["triton", "cuda", "eager"], "cpu": ["eager"]},
}
# Backends that auto never picks on a device (they remain available by name). Triton on CPU only
# runs through the interpreter, which is for tests.
_AUTO_EXCLUDED: dict[str, set[str]] = {"cpu": {"triton", "cuda", "flex", "xformers", "flash"}}


def _always_available() -> str | None:
    return None


def accepts_all(**_: Any) -> Reasons:
    """The ``check`` of a backend that takes every valid input (the eager definitions)."""
    return []


def register(
    op: str,
    name: str,
    check: Callable[..., Reasons],
    available: Callable[[], str | None] = _always_available,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as backend ``name`` of ``op``.

    ``check(**inputs)`` returns the reasons the backend cannot take the inputs; ``available()`` returns
    why the backend is missing in this install (package not importable, extension not built), or None.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(op, {})[name] = Backend(op, name, fn, check, available)
        return fn

    return wrap


def backends(op: str) -> list[str]:
    """Names of the registered backends of ``op`` (available in this install or not)."""
    _known_op(op)
    return list(_REGISTRY[op])


def preference(op: str, device_type: str) -> list[str]:
    _known_op(op)
    listed = [n for n in _PREFERENCE.get(op, {}).get(device_type, []) if n in _REGISTRY[op]]
    rest = [n for n in _REGISTRY[op] if n not in listed]
    return listed + rest


def set_preference(op: str, device_type: str, order: list[str]) -> None:
    """Replace the auto preference of ``op`` on ``device_type`` (fastest first)."""
    _known_op(op)
    unknown = [n for n in order if n not in _REGISTRY[op]]
    if unknown:
        raise ValueError(f"set_preference: unknown {op} backends {unknown}; known: {backends(op)}")
    _PREFERENCE.setdefault(op, {})[device_type] = list(order)


def _known_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")


def _env_choice(op: str) -> str | None:
    value = os.environ.get("BEITFAST_BACKEND", "").strip()
    if not value:
        return None
    if "=" not in value:
        # A global name applies to the ops that have such a backend and leaves the others on auto.
        return value if value in _REGISTRY[op] and value != "auto" else None
    for item in value.split(","):
        key, _, name = item.partition("=")
        if key.strip() == op:
            name = name.strip()
            if name not in _REGISTRY[op] and name != "auto":
                raise ValueError(
                    f"BEITFAST_BACKEND names {op} backend {name!r}, which does not exist; "
                    f"known: {backends(op)}"
                )
            return None if name == "auto" else name
    return None


def explain(op: str, **inputs: Any) -> dict[str, Reasons]:
    """Each backend's reasons for refusing ``inputs`` (an empty list: it would take them)."""
    _known_op(op)
    return {name: b.reasons(inputs) for name, b in _REGISTRY[op].items()}


def _device_type(inputs: dict[str, Any]) -> str:
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def select(op: str, backend: str | None, **inputs: Any) -> Backend:
    """The backend that runs ``op`` on ``inputs`` (see the module docstring for the rules)."""
    _known_op(op)
    requested = _env_choice(op) or (None if backend in (None, "auto") else backend)
    if requested is not None:
        if requested not in _REGISTRY[op]:
            raise ValueError(f"unknown {op} backend {requested!r}; known: {backends(op)}")
        chosen = _REGISTRY[op][requested]
        why = chosen.reasons(inputs)
        if why:
            raise ValueError(f"{op} backend {requested!r} cannot take these inputs: " + "; ".join(why))
        return chosen
    device_type = _device_type(inputs)
    excluded = _AUTO_EXCLUDED.get(device_type, set())
    refusals: dict[str, Reasons] = {}
    for name in preference(op, device_type):
        if name in excluded:
            refusals[name] = [f"not chosen automatically on {device_type} (ask for it by name)"]
            continue
        why = _REGISTRY[op][name].reasons(inputs)
        if not why:
            return _REGISTRY[op][name]
        refusals[name] = why
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in refusals.items())
    raise ValueError(f"no {op} backend can take these inputs:\n{lines}")


def may_inspect_values(t: torch.Tensor) -> bool:
    """Value checks need the data on the host: free on CPU, a sync on CUDA (opt in with
    BEITFAST_CHECKS=1), and never inside torch.compile."""
    if torch.compiler.is_compiling() or t.numel() == 0:
        return False
    return t.device.type == "cpu" or os.environ.get("BEITFAST_CHECKS") == "1"
