"""Files that are never left half-written and never read back damaged.

Writes are atomic (:func:`write_atomically`). Every checkpoint and tokenizer file records a SHA-256
of its contents (:func:`content_digest`: tensors, config and other values), which readers verify, and
readers refuse non-finite floating-point tensors (:func:`check_contents` for ``torch.save`` payloads,
:func:`check_safetensors`); files without a digest (foreign ones, or written by an older beitfast) get
the finiteness check only. Every problem is a
:class:`FileIntegrityError` naming the file and what failed.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import re
import secrets
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

__all__ = [
    "FileIntegrityError", "write_atomically", "keep_previous", "remove_stale_temporaries", "content_digest",
    "add_digest", "split_digest", "add_safetensors_digest", "verify_digest", "check_finite", "check_contents",
    "check_safetensors", "check_not_empty", "read_torch_file", "DIGEST_KEY",
]

# Where the digest is kept: a key of a torch.save payload (a dict), or of the safetensors metadata.
DIGEST_KEY = "beitfast_sha256"


class FileIntegrityError(ValueError):
    """A file is empty, truncated, damaged or holds non-finite values."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path, self.problem = os.fspath(path), problem


# -- writing ---------------------------------------------------------------------------------------


def _temporary_name(path: Path) -> Path:
    # The pattern remove_stale_temporaries recognises: ".<name>.<8 characters>.tmp".
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it, even for a moment,
    would apply to files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(temp_path)`` into a temporary file of ``path``'s folder, flush it to disk, then rename it
    over ``path``: a failure or a kill at any moment leaves the old file or the new one, never a torn one.
    The file gets the usual permissions (``0o666`` minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temp)
        # After writing: mkstemp makes owner-only files, and some writers (safetensors) recreate the file.
        os.chmod(temp, 0o666 & ~_umask())
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    _sync_folder(path.parent)
    return path


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> None:
    """Make ``previous`` a copy of ``path`` (if it exists) before ``path`` is replaced. A hard link
    where the file system has them, else a copy; ``path`` itself is never missing, even for a moment."""
    path, previous = Path(path), Path(previous)
    if not path.exists():
        return
    if previous.exists() and os.path.samefile(path, previous):
        return  # a kill after the last link left both names on one file; renaming over it does nothing
    temp = _temporary_name(previous)
    try:
        try:
            os.link(path, temp)
        except OSError:
            shutil.copyfile(path, temp)
        os.replace(temp, previous)
    except BaseException:
        if temp.exists():
            temp.unlink()
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete the temporary files that writes of ``folder/<name>`` killed midway left behind (only
    ``.<name>.<8 characters>.tmp`` files directly in ``folder``)."""
    folder = Path(folder)
    pattern = re.compile("|".join(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.tmp" for name in names))
    if folder.is_dir():
        for entry in folder.iterdir():
            if pattern.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink()


# -- checking --------------------------------------------------------------------------------------


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of every tensor and plain value of a nested payload, in a fixed order
    (mapping keys sorted, so the order of insertion does not matter)."""
    if isinstance(obj, Mapping):
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            yield from _leaves(obj[key], f"{path}/{type(key).__name__}:{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, obj


def _frame(digest, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def content_digest(payload: Any) -> str:
    """SHA-256 (hex) of a nested payload: every tensor's path, dtype, shape and bytes and every other
    value's path and ``repr``. Equal for a payload and what ``torch.load`` or safetensors gives back."""
    digest = hashlib.sha256()
    for path, leaf in _leaves(payload):
        if isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().cpu().contiguous()
            _frame(digest, f"T{path}|{tensor.dtype}|{list(tensor.shape)}".encode())
            _frame(digest, tensor.reshape(-1).view(torch.uint8).numpy().data)
        else:
            _frame(digest, f"V{path}|{type(leaf).__name__}|{leaf!r}".encode())
    return digest.hexdigest()


def add_digest(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` (a ``torch.save`` dict) with its digest under :data:`DIGEST_KEY`."""
    return {**payload, DIGEST_KEY: content_digest(payload)}


def split_digest(payload: Any) -> tuple[Any, str | None]:
    """``(payload without its digest, the digest)`` of what ``torch.load`` read; ``(payload, None)``
    when it has none (a foreign file, or one of an older beitfast)."""
    if isinstance(payload, Mapping) and isinstance(payload.get(DIGEST_KEY), str):
        return {k: v for k, v in payload.items() if k != DIGEST_KEY}, payload[DIGEST_KEY]
    return payload, None


def add_safetensors_digest(tensors: Mapping[str, torch.Tensor],
                           metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` for ``safetensors.torch.save_file`` with the digest of the tensors and of the metadata
    itself (a damaged config is caught too)."""
    return {**metadata, DIGEST_KEY: content_digest({"metadata": metadata, "tensors": tensors})}


def _check_extents(path: str | os.PathLike, contents: Any) -> None:
    """Refuse a tensor that views more bytes than its storage holds (overlapping strides, such as a
    damaged stride of 0): checks and digests would materialise all of them, a damaged size makes that
    gigabytes. Checkpoints hold no such views."""
    for name, leaf in _leaves(contents):
        if not isinstance(leaf, torch.Tensor):
            continue
        held = leaf.untyped_storage().nbytes()
        if leaf.numel() * leaf.element_size() > held:
            raise FileIntegrityError(
                path, f"{_readable(name)!r} has shape {list(leaf.shape)} and strides {list(leaf.stride())}: "
                f"more elements than its storage of {held} bytes holds (a damaged file)"
            )


def verify_digest(path: str | os.PathLike, contents: Any, recorded_digest: str | None) -> None:
    """Refuse ``contents`` read from ``path`` unless its digest is ``recorded_digest`` (``None``: no
    digest to compare)."""
    if recorded_digest is None:
        return
    _check_extents(path, contents)
    actual = content_digest(contents)
    if actual != recorded_digest:
        raise FileIntegrityError(
            path, f"content checksum mismatch: the contents hash to sha256 {actual[:16]}..., the file "
            f"records {recorded_digest[:16]}... (the file was damaged or modified after it was written)"
        )


def check_finite(path: str | os.PathLike, contents: Any) -> None:
    """Refuse ``contents`` read from ``path`` if a floating-point tensor in it holds NaN or infinity."""
    _check_extents(path, contents)
    for name, leaf in _leaves(contents):
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex()):
            finite = torch.isfinite(leaf)
            if not bool(finite.all()):
                nan = int(torch.isnan(leaf).sum())
                raise FileIntegrityError(
                    path, f"non-finite weights: {_readable(name)!r} has {nan} NaN and "
                    f"{leaf.numel() - int(finite.sum()) - nan} infinite values"
                )


def check_contents(path: str | os.PathLike, contents: Any, recorded_digest: str | None) -> None:
    """:func:`verify_digest` and :func:`check_finite`: what a ``torch.save`` payload read from ``path``
    must pass (after :func:`split_digest`)."""
    verify_digest(path, contents, recorded_digest)
    check_finite(path, contents)


def check_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> None:
    """What the tensors and metadata of a safetensors file read from ``path`` must pass: the digest of
    :func:`add_safetensors_digest`, when recorded, and finite tensors."""
    rest = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    verify_digest(path, {"metadata": rest, "tensors": tensors}, metadata.get(DIGEST_KEY))
    check_finite(path, tensors)


def _readable(path: str) -> str:
    """``/str:model/str:blocks.0.w`` -> ``model.blocks.0.w``."""
    return ".".join(re.sub(r"^[A-Za-z_]+:", "", part) for part in path.strip("/").split("/"))


def check_not_empty(path: str | os.PathLike) -> None:
    if os.path.getsize(path) == 0:
        raise FileIntegrityError(path, "empty file (0 bytes): it was never completely written")


def _unreadable(error: BaseException) -> str:
    text = str(error)
    # torch's weights-only refusal: the reason is on its "WeightsUnpickler error:" line.
    refusal = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if refusal:
        return (f"refused by torch.load's weights only unpickler: {refusal.group(1).strip()} (a damaged "
                "file, or one holding objects besides tensors and plain data, which could run code)")
    # The first sentence: torch's reader errors go on with generic advice.
    line = re.split(r"(?<=\.)\s", text.strip().splitlines()[0])[0] if text.strip() else ""
    reason = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return f"cannot be read as a torch.save file, truncated or damaged ({reason})"


def _check_torch_header(path: str | os.PathLike) -> bool:
    """torch.save writes a zip archive, or in its legacy format a pickle (protocol byte 0x80): a file that
    starts otherwise (a text file given by mistake) is not one, whatever else is wrong with it. Returns
    whether it is a zip archive."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise FileIntegrityError(path, f"not a torch.save file (it starts with {head!r}, not a zip archive "
                                       "or a pickle): not a checkpoint, or its first bytes are damaged")
    return head == b"PK\x03\x04"


def _check_zip_records(path: str | os.PathLike, zipped: bool) -> None:
    """Check the CRC-32 of every record of a ``torch.save`` zip archive before torch reads it: damage is
    then caught in foreign files too, and never reaches torch's reader (a damaged pickle can make it
    allocate gigabytes). Records whose CRC is 0 are not checked: ``torch.serialization.set_crc32_options
    (False)`` writes no checksums."""
    if not zipped:
        return  # torch's legacy format: no checksums to check
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                with archive.open(record) as data:  # the CRC is checked when the last bytes are read
                    while data.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise FileIntegrityError(path, f"damaged or truncated zip archive ({reason})") from None


_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")
_LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, the storage keys


def _check_memo_indices(path: str | os.PathLike, zipped: bool) -> None:
    """Refuse a pickle that stores to a memo slot beyond its number of opcodes, before unpickling: the C
    unpickler zero-fills its memo up to the slot, so a damaged 4-byte index makes it write gigabytes."""
    try:
        if zipped:  # checked by _check_zip_records; the object is its record data.pkl
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                streams, count = io.BytesIO(archive.read(name)), 1
        else:
            streams, count = open(path, "rb"), _LEGACY_PICKLES
        with streams as stream:
            for _ in range(count):
                if not stream.read(1):
                    break  # the end: a plain pickle holds one object
                stream.seek(-1, io.SEEK_CUR)
                for ops, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
                    if opcode.name in _MEMO_PUTS and arg > ops:
                        raise ValueError(f"memo slot {arg} at opcode {ops}")
    except (ValueError, StopIteration, zipfile.BadZipFile, EOFError) as error:
        raise FileIntegrityError(path, f"damaged pickle ({type(error).__name__}: {error})") from None


def read_torch_file(path: str | os.PathLike, safe_globals: Iterable = (), passthrough: tuple = (),
                    **load_kwargs) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True, **load_kwargs)`` with ``safe_globals``
    allowed; an empty, truncated or unreadable file is a :class:`FileIntegrityError` naming it (errors of
    the types in ``passthrough`` are raised as they are). Digest and finiteness: :func:`check_contents`."""
    check_not_empty(path)
    zipped = _check_torch_header(path)
    _check_zip_records(path, zipped)
    _check_memo_indices(path, zipped)
    kwargs = {"map_location": "cpu", "weights_only": True, **load_kwargs}
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(os.fspath(path), **kwargs)
    except (PermissionError, FileNotFoundError, IsADirectoryError, *passthrough):
        raise
    # What torch.load raises for damaged files (the zip reader's OSError and RuntimeError, the unpickler's,
    # the assertions of torch's persistent-id loader).
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError,
            AttributeError, IndexError, OverflowError, UnicodeDecodeError, MemoryError,
            AssertionError) as error:
        raise FileIntegrityError(path, _unreadable(error)) from error
