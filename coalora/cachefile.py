"""Checksummed, locked cache files shared by concurrent runs (docs/reliability.md).

A cache file is an envelope: one header line ``#coalora-cache v1 sha256=<hex> bytes=<n>`` and the
payload bytes. A file whose header, length or digest does not match (truncated, tampered, written
by something else) is reported with a warning naming it and treated as a miss; the caller
recomputes and the file is rewritten. Writes are atomic (``coalora.io``).

:func:`get_or_compute` holds an exclusive ``fcntl`` lock on ``<file>.lock`` while it re-reads,
computes and writes, so two runs that miss the same entry at once compute it once: the second
waits and reads the first one's result. A cache folder that cannot be written (read-only, full,
no permission) costs a warning and the value is returned uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from coalora.errors import StorageError
from coalora.io import atomic_write_bytes, current_umask

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock, the checksum still guards every read
    fcntl = None

log = logging.getLogger(__name__)

T = TypeVar("T")
MAGIC = b"#coalora-cache v1 "
_HEADER = re.compile(rb"#coalora-cache v1 sha256=([0-9a-f]{64}) bytes=(\d+)\n")
_MAX_HEADER = 128


def envelope(payload: bytes) -> bytes:
    """The bytes of a cache file holding ``payload``."""
    digest = hashlib.sha256(payload).hexdigest()  # (64,) hex
    return MAGIC + f"sha256={digest} bytes={len(payload)}\n".encode() + payload


def open_envelope(data: bytes) -> bytes:
    """The payload of a cache file's bytes; ``ValueError`` saying what does not match."""
    m = _HEADER.match(data[:_MAX_HEADER])
    if m is None:
        raise ValueError("no coalora-cache header (not written by this version, or overwritten)")
    digest, size = m.group(1).decode(), int(m.group(2))
    payload = data[m.end() :]
    if len(payload) != size:
        raise ValueError(f"payload is {len(payload)} bytes, the header says {size} (truncated?)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError("sha256 of the payload does not match the header (modified?)")
    return payload


def read_verified(path: str | Path, what: str = "cache file") -> bytes | None:
    """The payload of ``path``, or None when it is missing or fails verification (warning)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("ignoring %s %s: cannot read it (%s)", what, path, e.strerror or e)
        return None
    try:
        return open_envelope(data)
    except ValueError as e:
        log.warning("ignoring %s %s: %s; recomputing", what, path, e)
        return None


def write_verified(path: str | Path, payload: bytes, what: str = "cache file") -> bool:
    """Write ``payload`` with its checksum atomically; False (and a warning) when the folder
    cannot take the write, so a read-only or full cache never fails the run."""
    return _write_raw(Path(path), envelope(payload), what)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[bool]:
    """Exclusive inter-process lock on ``<path>.lock`` for the ``with`` body.

    Yields True when the lock is held, False when the lock file cannot be created (read-only
    folder; the caller then computes without caching). The lock file is left in place: removing
    it would let a third process lock a new inode while the second holds the old one.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    except OSError:
        yield False
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks until the holder releases it
        yield True
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def get_or_compute(
    path: str | Path,
    compute: Callable[[], T],
    encode: Callable[[T], bytes],
    decode: Callable[[bytes], T],
    what: str = "cache file",
    framed: bool = True,
) -> T:
    """The cached value at ``path``, else ``compute()`` written there; one computation at a time.

    ``decode`` may raise (``ValueError``, ``KeyError``, ...) when a verified payload is stale
    (other weights, other schema); that is a miss with a warning. The value returned on a miss
    is ``decode(encode(compute()))``, so a hit and a miss give identical objects. With
    ``framed=False`` the file holds ``encode``'s bytes as they are (for formats that carry their
    own checksum, e.g. error tables); ``decode`` must then verify them.
    """
    path = Path(path)

    def hit() -> tuple[bool, Any]:
        payload = read_verified(path, what) if framed else _read_raw(path, what)
        if payload is None:
            return False, None
        try:
            return True, decode(payload)
        except Exception as e:  # stale or incompatible content: recompute and overwrite
            log.warning("ignoring %s %s: %s; recomputing", what, path, e)
            return False, None

    seen = _signature(path)
    found, value = hit()
    if found:
        return value
    with locked(path) as have_lock:
        if not have_lock:
            log.warning("cache folder %s is not writable; computing %s uncached", path.parent, what)
        elif _signature(path) != seen:
            found, value = hit()  # another process wrote it while we waited for the lock
            if found:
                return value
        payload = encode(compute())
        if have_lock:
            write_verified(path, payload, what) if framed else _write_raw(path, payload, what)
    return decode(payload)


def _signature(path: Path) -> tuple | None:
    """Identity of the file's current version (inode, size, mtime), None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_raw(path: Path, what: str) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("ignoring %s %s: cannot read it (%s)", what, path, e.strerror or e)
        return None


def _write_raw(path: Path, data: bytes, what: str) -> bool:
    try:
        atomic_write_bytes(path, data)
    except StorageError as e:
        log.warning("not caching %s: %s", what, e)
        return False
    return True


def json_bytes(obj: Any) -> bytes:
    """JSON bytes for a cache payload (key order kept: layer order is meaningful)."""
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def json_value(payload: bytes) -> Any:
    return json.loads(payload.decode("utf-8"))


__all__ = [
    "envelope",
    "get_or_compute",
    "json_bytes",
    "json_value",
    "locked",
    "open_envelope",
    "read_verified",
    "write_verified",
]


def parse_safetensors(data: bytes, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensors) of safetensors ``data``; ``ValueError`` "not a readable <what> (...)"
    when the bytes are truncated or not safetensors (checksummed cache files, e.g. error tables
    and sensitivities)."""
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 + size:
            raise ValueError(f"{len(data)} bytes, shorter than its header")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        return meta, load(data)
    except Exception as e:
        raise ValueError(f"not a readable {what} ({e})") from None
