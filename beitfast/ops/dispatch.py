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
  or ``BEITFAST_BACKEND=attention=flex,cross_entropy=eager`` (per op). A name no op has, an unknown
  op or a malformed entry is an error listing what is known (a typo must not fall back to auto).

``explain(op, **inputs)`` returns each backend's reasons without running anything.

The auto order on CUDA comes from measurement when there is a table for the GPU: the first CUDA
selection reads ``beitfast/ops/preferences/<GPU name>.json`` (written by ``beitfast bench --calibrate``,
see :mod:`beitfast.calibrate`) or the file ``BEITFAST_PREFERENCES`` names; backends it lists come first,
fastest first, the others after in the built-in order. ``set_preference`` calls win over the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["Backend", "register", "backends", "backend_names", "select", "explain", "set_preference",
           "preference", "may_inspect_values", "accepts_all", "needs_package", "unsupported_dtypes",
           "triton_device_reasons", "gpu_slug", "preference_table_path", "apply_preference_table"]

Reasons = list[str]
# What the public functions take; the eager definitions run in any of them (float64 is the reference),
# the fused backends say in their ``check`` which they support.
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# What the fused (Triton and CUDA) backends compute in.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable[..., Any]
    check: Callable[..., Reasons]
    available: Callable[[], str | None]

    def reasons(self, inputs: dict[str, Any]) -> Reasons:
        missing = _missing(self.op, self.name)
        if missing:
            return [missing]
        return list(self.check(**inputs))


# Why each backend is missing from this install (None: present), asked once per process (the install
# does not change while it runs) and kept as a plain value, which the compiler reads as a constant: torch
# 2.11's cannot inline a cached callable held by the frozen dataclass, nor trace importlib.
_MISSING: dict[tuple[str, str], str | None] = {}


def _missing(op: str, name: str) -> str | None:
    if (op, name) not in _MISSING:
        _MISSING[op, name] = _REGISTRY[op][name].available()
    return _MISSING[op, name]


_REGISTRY: dict[str, dict[str, Backend]] = {}
# Preference per op and device type, fastest first. Backends not listed come last, in the order they
# were registered. `set_preference` and the measured per-GPU table replace entries.
_PREFERENCE: dict[str, dict[str, list[str]]] = {
    "attention": {
        "cuda": ["triton", "flash", "sdpa", "xformers", "flex", "blas", "eager"],
        "cpu": ["blas", "sdpa", "eager"],
    },
    "cross_entropy": {"cuda": ["triton", "cuda", "eager"], "cpu": ["eager"]},
    "patch_embed": {"cuda": ["triton", "cuda", "eager"], "cpu": ["eager"]},
}
# What a measured table's unlisted backends fall back to, however many tables were applied.
_BUILT_IN_PREFERENCE = {op: {dev: list(order) for dev, order in by_device.items()}
                        for op, by_device in _PREFERENCE.items()}
# Backends that auto never picks on a device (they remain available by name). Triton on CPU only
# runs through the interpreter, which is for tests.
_AUTO_EXCLUDED: dict[str, set[str]] = {"cpu": {"triton", "cuda", "flex", "xformers", "flash"}}

# Measured CUDA preference tables, one per GPU kind (see beitfast.calibrate).
PREFERENCES_DIR = Path(__file__).parent / "preferences"
PREFERENCES_ENV = "BEITFAST_PREFERENCES"
# (op, device type) entries replaced by set_preference: a table read later leaves them alone.
_SET_BY_USER: set[tuple[str, str]] = set()
# Whether the CUDA table was looked for; read once per process, on the first CUDA selection.
_cuda_table_read = False


def _always_available() -> str | None:
    return None


def needs_package(module: str, package: str | None = None) -> Callable[[], str | None]:
    """The ``available`` of a backend that imports ``module`` (installed as ``package``, default the
    module's name)."""
    # Looked up now, not when asked: the lookup is cheap (nothing is imported) and a compiled graph
    # asking for it must not trace importlib.
    missing = None if importlib.util.find_spec(module) else f"{package or module} is not installed"
    return lambda: missing


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
    The install does not change while the process runs, so ``available`` is asked once, not per call:
    at registration, or when first needed if it carries ``asked_when_needed = True`` (asking imports).
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(op, {})[name] = Backend(op, name, fn, check, available)
        _MISSING.pop((op, name), None)
        # Asked now unless asking costs an import (the extension, a torch module): a compiled graph
        # that fills in the answer while tracing would be traced again (its guard sees the table change).
        if not getattr(available, "asked_when_needed", False):
            _MISSING[op, name] = available()
        return fn

    return wrap


def backends(op: str) -> list[str]:
    """Names of the registered backends of ``op`` (available in this install or not)."""
    _known_op(op)
    return list(_REGISTRY[op])


def backend_names() -> list[str]:
    """Every backend name of every op, sorted (what ``config.kernels`` and ``BEITFAST_BACKEND`` take)."""
    return sorted({name for by_name in _REGISTRY.values() for name in by_name})


def preference(op: str, device_type: str) -> list[str]:
    _known_op(op)
    listed = [n for n in _PREFERENCE.get(op, {}).get(device_type, []) if n in _REGISTRY[op]]
    rest = [n for n in _REGISTRY[op] if n not in listed]
    return listed + rest


def set_preference(op: str, device_type: str, order: list[str]) -> None:
    """Replace the auto preference of ``op`` on ``device_type`` (fastest first)."""
    _known_op(op)
    if not isinstance(device_type, str) or _device_type(device_type) != device_type:
        raise ValueError(f"set_preference: device_type must be a torch device type such as 'cuda' or 'cpu' "
                         f"(no index), got {device_type!r}")
    if not isinstance(order, (list, tuple)) or not all(isinstance(n, str) for n in order):
        raise TypeError(f"set_preference: order must be a list of {op} backend names, got {order!r}")
    unknown = [n for n in order if n not in _REGISTRY[op]]
    if unknown:
        raise ValueError(f"set_preference: unknown {op} backends {unknown}; known: {backends(op)}")
    _PREFERENCE.setdefault(op, {})[device_type] = list(order)
    _SET_BY_USER.add((op, device_type))


def _device_type(name: str) -> str | None:
    try:
        return torch.device(name).type
    except RuntimeError:
        return None


def gpu_slug(device_name: str) -> str:
    """The file stem of a GPU kind's table: ``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def preference_table_path(device_name: str) -> Path:
    """The table used for a GPU called ``device_name``: ``BEITFAST_PREFERENCES`` when set, else the
    package's file for that GPU kind (which may not exist)."""
    override = os.environ.get(PREFERENCES_ENV, "").strip()
    if override:
        return Path(override)
    return PREFERENCES_DIR / f"{gpu_slug(device_name)}.json"


def apply_preference_table(table: dict[str, Any], source: str = "preference table") -> None:
    """Use a measured table's ``preference`` as the CUDA auto order of each op it names.

    Backends it lists come first, the op's built-in order follows for the rest. Names of backends that
    do not exist in this install are ignored with a warning; ops replaced by ``set_preference`` keep
    their order.
    """
    orders = table.get("preference") if isinstance(table, dict) else None
    if not isinstance(orders, dict):
        raise ValueError(f"{source}: expected an object with a 'preference' mapping of op -> backend names")
    for op, measured in orders.items():
        if op not in _REGISTRY:
            warnings.warn(f"{source}: ignoring unknown op {op!r}; known ops: {sorted(_REGISTRY)}",
                          stacklevel=2)
            continue
        if (op, "cuda") in _SET_BY_USER:
            continue
        if not isinstance(measured, list) or not all(isinstance(n, str) for n in measured):
            raise ValueError(
                f"{source}: preference[{op!r}] must be a list of backend names, got {measured!r}")
        unknown = [n for n in measured if n not in _REGISTRY[op]]
        if unknown:
            warnings.warn(f"{source}: ignoring unknown {op} backends {unknown}; known: {backends(op)}",
                          stacklevel=2)
        listed = [n for n in measured if n in _REGISTRY[op]]
        built_in = _BUILT_IN_PREFERENCE.get(op, {}).get("cuda", [])
        _PREFERENCE.setdefault(op, {})["cuda"] = listed + [n for n in built_in if n not in listed]


def _read_cuda_table(device: torch.device) -> None:
    """Apply the table of ``device``'s GPU kind if there is one (see the module docstring). A missing
    or unreadable ``BEITFAST_PREFERENCES`` file raises on every selection until it is fixed."""
    global _cuda_table_read
    device_name = torch.cuda.get_device_name(device)
    path = preference_table_path(device_name)
    if not path.is_file():
        if os.environ.get(PREFERENCES_ENV, "").strip():
            raise FileNotFoundError(f"{PREFERENCES_ENV}={path}: no such file")
        _cuda_table_read = True
        return
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"preference table {path}: cannot read it ({error})") from error
    if isinstance(table, dict) and table.get("gpu") not in (None, device_name):
        warnings.warn(
            f"preference table {path} was measured on {table['gpu']!r}, this GPU is {device_name!r}",
            stacklevel=2)
    apply_preference_table(table, source=str(path))
    _cuda_table_read = True


def _known_op(op: str) -> None:
    if not isinstance(op, str) or op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")


def _env_choice(op: str) -> str | None:
    """The backend ``BEITFAST_BACKEND`` names for ``op``, or None (unset, "auto", or a global name
    ``op`` has no backend of). The whole value is checked at every call, whichever op asks."""
    value = os.environ.get("BEITFAST_BACKEND", "").strip()
    if not value or value == "auto":
        return None
    where = f"BEITFAST_BACKEND={value!r}"
    if "=" not in value:
        # A global name applies to the ops that have such a backend and leaves the others on auto.
        if value not in backend_names():
            raise ValueError(
                f"{where}: unknown backend {value!r}; known backends: {backend_names()}, or op=name "
                f"pairs separated by commas with ops {sorted(_REGISTRY)}")
        return value if value in _REGISTRY[op] else None
    chosen = {}
    for item in value.split(","):
        key, equals, name = (part.strip() for part in item.partition("="))
        if not equals or not key or not name:
            raise ValueError(f"{where}: {item.strip()!r} is not an op=name pair (e.g. attention=eager)")
        if key not in _REGISTRY:
            raise ValueError(f"{where}: unknown op {key!r}; known ops: {sorted(_REGISTRY)}")
        if name not in _REGISTRY[key] and name != "auto":
            raise ValueError(f"{where}: unknown {key} backend {name!r}; known: {['auto', *backends(key)]}")
        chosen[key] = name
    name = chosen.get(op, "auto")
    return None if name == "auto" else name


def explain(op: str, **inputs: Any) -> dict[str, Reasons]:
    """Each backend's reasons for refusing ``inputs`` (an empty list: it would take them)."""
    _known_op(op)
    return {name: b.reasons(inputs) for name, b in _REGISTRY[op].items()}


def _device(inputs: dict[str, Any]) -> torch.device:
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def select(op: str, backend: str | None, **inputs: Any) -> Backend:
    """The backend that runs ``op`` on ``inputs`` (see the module docstring for the rules)."""
    _known_op(op)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be None, 'auto' or a {op} backend name {backends(op)}, "
                        f"got {backend!r} ({type(backend).__name__})")
    requested = _env_choice(op) or (None if backend in (None, "auto") else backend)
    if requested is not None:
        if requested not in _REGISTRY[op]:
            raise ValueError(f"unknown {op} backend {requested!r}; known: {backends(op)}")
        chosen = _REGISTRY[op][requested]
        why = chosen.reasons(inputs)
        if why:
            raise ValueError(f"{op} backend {requested!r} cannot take these inputs: " + "; ".join(why))
        return chosen
    device = _device(inputs)
    device_type = device.type
    # File reading is no part of a torch.compile graph: a trace before any eager CUDA call uses the
    # built-in order, and the guard on this flag recompiles once the table is read.
    if device_type == "cuda" and not _cuda_table_read and not torch.compiler.is_compiling():
        _read_cuda_table(device)
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


def unsupported_dtypes(**tensors: torch.Tensor | None) -> Reasons:
    """A fused backend's reasons for the named tensors (None ones skipped) outside ``FUSED_DTYPES``."""
    return [
        f"{arg} dtype {t.dtype} is not supported (float32, float16, bfloat16)"
        for arg, t in tensors.items() if t is not None and t.dtype not in FUSED_DTYPES
    ]


def triton_device_reasons(device: torch.device, *dtypes: torch.dtype) -> Reasons:
    """Triton runs on CUDA tensors, or on CPU ones through its interpreter (``TRITON_INTERPRET=1``, for
    tests), which computes bfloat16 wrongly; ``dtypes`` are those the kernels load or compute in."""
    if device.type == "cuda":
        return []
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return [f"needs CUDA tensors (or CPU ones with TRITON_INTERPRET=1), got {device}"]
    if torch.bfloat16 in dtypes:
        return ["the Triton interpreter computes bfloat16 wrongly; use float32/float16 on CPU"]
    return []


def may_inspect_values(t: torch.Tensor) -> bool:
    """Value checks need the data on the host: free on CPU, a sync on CUDA (opt in with
    BEITFAST_CHECKS=1), and never inside torch.compile."""
    if torch.compiler.is_compiling():
        return False
    # Read whatever the device, so that a misspelt value is an error on CPU already.
    checks = os.environ.get("BEITFAST_CHECKS", "").strip()
    if checks not in ("", "0", "1"):
        raise ValueError(f"BEITFAST_CHECKS={checks!r}: must be 1 (check values on CUDA too), 0 or unset")
    return t.numel() > 0 and (t.device.type == "cpu" or checks == "1")
