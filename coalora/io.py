"""Atomic file and directory writes (docs/reliability.md).

A file is written to a temporary sibling and renamed over the target, so readers see the old
content or the new one, never a half-written file. The temporary file gets the permissions a plain
``open(path, "w")`` would get (``0666 & ~umask``; ``0777 & ~umask`` for directories) rather than
``mkstemp``'s private 0600, so results, checkpoints and caches stay readable by a team; that
holds for what a writer creates itself (safetensors writes 0600 files) and for every file and
folder of a replaced directory. A failed write (full disk, read-only folder, no permission)
becomes one :class:`StorageError` line naming the path and the cause.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coalora.errors import CoaloraError, ConfigError, StorageError

# errno values that mean "this location cannot take the write", with a short cause for the message
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device (ENOSPC)",
    errno.EDQUOT: "disk quota exceeded (EDQUOT)",
    errno.EROFS: "read-only file system (EROFS)",
    errno.EACCES: "permission denied (EACCES)",
    errno.EPERM: "operation not permitted (EPERM)",
}
# a Rust writer's io::Error text ("... (os error 28)"): safetensors reports ENOSPC this way
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``); elsewhere set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _no_space_left(folder: Path) -> bool:
    """Whether ``folder``'s file system has no free blocks left for unprivileged writers."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail == 0


def storage_error(path: Path, exc: BaseException) -> StorageError | None:
    """A one-line :class:`StorageError` for ``exc`` when it is a storage failure, else None.

    Some writers hide the errno (torch's zip writer reports a full disk as ``unexpected pos``);
    a non-OSError is reported as ENOSPC only when the file system really has no space left.
    """
    if isinstance(exc, StorageError):
        return exc
    cause = None
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    rust = None if isinstance(exc, OSError) else _RUST_OS_ERROR.search(str(exc))
    if rust is not None:
        code = int(rust.group(1))
    if code in _STORAGE_ERRNOS:
        cause = _STORAGE_ERRNOS[code]
    elif not isinstance(exc, CoaloraError | KeyboardInterrupt | SystemExit) and _no_space_left(
        path.parent if path.parent.exists() else Path(".")
    ):
        cause = _STORAGE_ERRNOS[errno.ENOSPC]
    if cause is None:
        return None
    err = StorageError(f"cannot write {path}: {cause}")
    err.errno = code or errno.ENOSPC
    return err


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (storage_error(path.parent, e) or e) from None


def atomic_write(path: str | Path, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` then move the result to ``path``; nothing is left on failure.

    The file ends with mode ``0666 & ~umask`` (0644 under umask 022). Storage failures raise
    :class:`StorageError` naming ``path``; any other exception of ``writer`` propagates.
    """
    path = Path(path)
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (storage_error(path, e) or e) from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        writer(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # a writer may replace the file (safetensors: 0600)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        err = storage_error(path, e)
        if err is not None:
            raise err from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def make_temp_dir(target: Path) -> Path:
    """An empty directory beside ``target`` with mode ``0777 & ~umask`` (0755 under umask 022)."""
    _make_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError as e:
        raise (storage_error(target, e) or e) from None
    return tmp


def follow_umask(root: Path) -> None:
    """Give every folder under ``root`` (itself included) mode ``0777 & ~umask`` and every file
    ``0666 & ~umask`` (``0777 & ~umask`` when it was executable), whatever its writer chose."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):  # a link's mode is its target's: leave both alone
                continue
            full = stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR
            os.chmod(path, (0o777 if full else 0o666) & ~mask)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False when the
    system or file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    """Put ``tmp`` in place of the existing ``target`` and delete the old one. With an atomic
    exchange no moment is without ``target``; otherwise ``target`` is renamed aside and ``tmp``
    renamed in, and a failure in between puts the old one back, or names where it is kept."""
    if exchange_dirs(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    try:
        os.replace(target, old)  # rename over the empty placeholder directory
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.replace(old, target)
        except OSError:
            cause = storage_error(target, e)
            why = getattr(e, "strerror", None) or type(e).__name__
            text = str(cause) if cause is not None else f"cannot write {target}: {why}"
            kept = StorageError(f"{text}; the previous export is kept at {old} (rename it back)")
            kept.errno = getattr(e, "errno", None)
            raise kept from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_dir_atomically(
    target: str | Path,
    build: Callable[[Path], None],
    *,
    is_ours: Callable[[Path], bool],
    overwrite: bool = False,
    key: str = "overwrite",
) -> Path:
    """Build a directory with ``build(tmp)`` in a new sibling, then swap it in for ``target``.

    Order: build into the sibling; give everything in it the umask's modes (``follow_umask``);
    swap it with an existing ``target`` in one step where the system can (``exchange_dirs``),
    else rename ``target`` aside and the new one in; delete the old one. A failure (or a kill)
    before the swap leaves ``target`` untouched, an atomic exchange leaves no moment without
    ``target``, and a failure between two renames puts the old directory back (when even that
    fails, the :class:`StorageError` names where it is kept). An existing ``target`` is replaced
    only when it is empty, when ``is_ours(target)`` says this project wrote it, or when
    ``overwrite`` is true; otherwise, and when ``target`` is a file, :class:`CoaloraError` names
    the path and ``key``.
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CoaloraError(
            f"{target} exists and is not a directory; choose another output path "
            f"(it is never replaced, even with {key}=true)"
        )
    if target.is_dir() and any(target.iterdir()) and not overwrite and not is_ours(target):
        raise CoaloraError(
            f"{target} is a non-empty directory that this project did not write; choose another "
            f"output path or set {key}=true to replace it"
        )
    tmp = make_temp_dir(target)
    try:
        build(tmp)
        follow_umask(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(target, e)
        if err is not None:
            raise err from None
        raise
    try:
        if target.exists():
            _swap_in(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(target, e)
        if err is not None:
            raise err from None
        raise
    return target


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file; a missing file or malformed JSON is a ConfigError naming the file."""

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{what} {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None


def compact_json(obj: Any, depth: int = 0) -> str:
    """Indented JSON whose short lists of scalars (e.g. per-layer option rows) stay on one line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict) and obj:
        items = [
            f"{inner}{json.dumps(str(k))}: {compact_json(v, depth + 1)}" for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj:
        flat = json.dumps(obj)
        if len(flat) <= 60 and not any(isinstance(v, (list, dict)) for v in obj):
            return flat
        return (
            "[\n" + ",\n".join(inner + compact_json(v, depth + 1) for v in obj) + "\n" + pad + "]"
        )
    return json.dumps(obj)
