"""What a packed export's manifest may say, checked before anything it names is opened
(docs/packed.md, "What load checks").

* **Digest.** ``manifest_sha256`` is the sha256 of the manifest's canonical JSON (every other key,
  keys sorted, no spaces, ASCII); with it the file table's sha256s protect every byte of the
  export. It detects damage and edits, it is not a signature: the rules below hold whatever the
  digest says.
* **Paths.** Every path (``files`` keys, a configuration's ``config`` and ``adapter``) is relative,
  has no ``..``, stays inside the export once symlinks are resolved, and a configuration's paths
  are listed in ``files``.
* **Values.** Shapes are ``[d_out, d_in]`` of positive integers; every entry belongs to a target
  and has that target's shape and the option its key names; ``scaling`` and ``average_bits``
  are finite and positive; sizes are non-negative integers, sha256s 64 hex digits.

Every failure is one :class:`CoaloraError` line naming the manifest and the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from coalora.errors import CoaloraError
from coalora.quant.config import option_from_key

DIGEST = "manifest_sha256"
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a label is a file name stem
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REQUIRED = ("architecture", "model_type", "targets", "entries", "tied", "configurations", "files")
PATH_RULE = "allowed: a relative path inside the export, listed in 'files'"


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every key but the digest itself."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def sign_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its digest as the last key."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return {**body, DIGEST: manifest_digest(body)}


def check_digest(manifest: Mapping[str, Any], mpath: Path) -> None:
    recorded = manifest.get(DIGEST)
    if recorded is None:
        raise CoaloraError(
            f"{mpath}: no {DIGEST} (written before coalora checked its manifest, or removed); "
            "export it again, or pass verify=False to skip every check"
        )
    if recorded != manifest_digest(manifest):
        raise CoaloraError(
            f"{mpath}: content differs from its digest {DIGEST} (the manifest was edited or "
            "damaged); export it again"
        )


def _fail(mpath: Path, text: str) -> CoaloraError:
    return CoaloraError(f"{mpath}: {text}")


def _object(value: Any, key: str, mpath: Path, empty_ok: bool = False) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(mpath, f"key {key!r} must be an object, got {type(value).__name__}")
    if not value and not empty_ok:
        raise _fail(mpath, f"key {key!r} is empty")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_positive_int(v) for v in value)


def _targets(manifest: Mapping[str, Any], mpath: Path) -> Mapping[str, list[int]]:
    targets = _object(manifest["targets"], "targets", mpath)
    for name, shape in targets.items():
        if not name or not _shape(shape):
            raise _fail(
                mpath, f"targets[{name!r}]={shape!r}; allowed: [d_out, d_in], positive integers"
            )
    return targets


def _entries(manifest: Mapping[str, Any], targets: Mapping[str, list[int]], mpath: Path) -> None:
    for key, entry in _object(manifest["entries"], "entries", mpath).items():
        where = f"entries[{key!r}]"
        name, _, option = key.rpartition("::")
        if name not in targets:
            raise _fail(mpath, f"{where} names no target; allowed: <target>::<option key>")
        if not isinstance(entry, Mapping) or "shape" not in entry or "option" not in entry:
            raise _fail(mpath, f"{where} must be an object with 'shape' and 'option'")
        if not _shape(entry["shape"]):
            raise _fail(
                mpath,
                f"{where}.shape={entry['shape']!r}; allowed: [d_out, d_in], positive integers",
            )
        if entry["shape"] != targets[name]:
            raise _fail(
                mpath,
                f"{where}.shape={entry['shape']} but targets[{name!r}]={targets[name]} "
                "(transposed or another model's entry)",
            )
        if entry["option"] != option:
            raise _fail(
                mpath, f"{where}.option={entry['option']!r} differs from its key's {option!r}"
            )
        try:
            option_from_key(option)
        except CoaloraError as e:
            raise _fail(mpath, f"{where}: {e}") from None


def _configurations(manifest: Mapping[str, Any], mpath: Path) -> None:
    for label, info in _object(manifest["configurations"], "configurations", mpath).items():
        where = f"configurations[{label!r}]"
        if not LABEL.match(label):
            raise _fail(mpath, f"{where}: the label must match {LABEL.pattern}")
        if not isinstance(info, Mapping):
            raise _fail(mpath, f"{where} must be an object")
        for field in ("config", "average_bits"):
            if field not in info:
                raise _fail(mpath, f"{where}.{field} is missing")
        for field in ("average_bits", "scaling"):
            if field in info and not _positive_number(info[field]):
                raise _fail(
                    mpath, f"{where}.{field}={info[field]!r}; allowed: a finite number above 0"
                )
        if "scaling" in info and "adapter" not in info:
            raise _fail(mpath, f"{where} has a scaling but no adapter")
        if "adapter" in info and "scaling" not in info:
            raise _fail(mpath, f"{where}.scaling is missing (the adapter's LoRA scaling)")


def _files(manifest: Mapping[str, Any], mpath: Path, required: tuple[str, ...]) -> None:
    files = _object(manifest["files"], "files", mpath, empty_ok=True)
    for rel, info in files.items():
        where = f"files[{rel!r}]"
        if not isinstance(info, Mapping):
            raise _fail(mpath, f"{where} must be an object with 'sha256' and 'bytes'")
        size = info.get("bytes")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise _fail(mpath, f"{where}.bytes={size!r}; allowed: a non-negative integer")
        digest = info.get("sha256")
        if not (isinstance(digest, str) and SHA256.match(digest)):
            raise _fail(mpath, f"{where}.sha256={digest!r}; allowed: 64 lowercase hex digits")
    for rel in required:
        if rel not in files:
            raise _fail(mpath, f"files does not list {rel!r} (every file load opens is listed)")


def check_manifest(manifest: Any, mpath: Path, required: tuple[str, ...]) -> None:
    """Raise one ``CoaloraError`` line naming the first key whose value is not allowed;
    ``required`` are the file names ``files`` must list."""
    if not isinstance(manifest, Mapping):
        raise _fail(mpath, f"must be a JSON object, got {type(manifest).__name__}")
    for key in REQUIRED:
        if key not in manifest:
            raise _fail(mpath, f"key {key!r} is missing")
    for key in ("architecture", "model_type"):
        if not isinstance(manifest[key], str):
            raise _fail(mpath, f"key {key!r} must be a string")
    targets = _targets(manifest, mpath)
    _entries(manifest, targets, mpath)
    for key, other in _object(manifest["tied"], "tied", mpath, empty_ok=True).items():
        if not isinstance(other, str) or not other:
            raise _fail(mpath, f"tied[{key!r}]={other!r}; allowed: the name of a base weight")
    _configurations(manifest, mpath)
    _files(manifest, mpath, required)


def member(root: Path, rel: Any, key: str, mpath: Path, files: Mapping[str, Any] | None) -> Path:
    """``root / rel`` after the path rules: relative, no ``..``, inside ``root`` once symlinks are
    resolved, and (``files`` given) listed in ``files``. ``key`` names where the path was read
    (``files['x']`` names the path itself)."""
    what = key if key.startswith("files[") else f"{key}={rel!r}"
    if not isinstance(rel, str) or not rel:
        raise _fail(mpath, f"{what} is not a path; {PATH_RULE}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor:
        raise _fail(mpath, f"{what} is absolute; {PATH_RULE}")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts or "\x00" in rel:
        raise _fail(mpath, f"{what} leaves the export ('..'); {PATH_RULE}")
    if files is not None and rel not in files:
        raise _fail(mpath, f"{what} is not listed in 'files'; {PATH_RULE}")
    inside, real = root.resolve(), (root / rel).resolve()
    if inside not in real.parents:
        raise _fail(mpath, f"{what} resolves outside the export (to {real}); {PATH_RULE}")
    return root / rel


def check_paths(manifest: Mapping[str, Any], root: Path, mpath: Path) -> None:
    """Every configuration's ``config``/``adapter`` path (what load opens), then every ``files``
    key (what verification opens)."""
    files = manifest["files"]
    for label, info in manifest["configurations"].items():
        for field in ("config", "adapter"):
            if field in info:
                member(root, info[field], f"configurations[{label!r}].{field}", mpath, files)
    for rel in files:
        member(root, rel, f"files[{rel!r}]", mpath, None)


__all__ = [
    "DIGEST",
    "LABEL",
    "check_digest",
    "check_manifest",
    "check_paths",
    "manifest_digest",
    "member",
    "sign_manifest",
]
