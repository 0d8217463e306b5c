"""The packed export format: directory layout, manifest schema, entry keys and labels, and reading
the manifest back (docs/packed.md, "Export format").

A packed export is one directory:

* ``packed.safetensors``: the bit-packed base, one entry per (layer, option) used by any of the
  exported configurations, deduplicated; entry ``<name>::<option key>`` is stored as the tensors
  ``<entry>::codes|q1|s2|offset`` of a ``PackedTensor`` (QLoRA-style NF codes + double-quantized
  scales, arXiv 2305.14314 §3; LQ-LoRA's per-layer options, arXiv 2311.12023 §3.2);
* ``base.safetensors``: every weight that is not a target linear's weight (embeddings, norms,
  biases, the task head), under its unwrapped name (``clean_state_dict``); tied weights once;
* ``configs/<label>.json``: each configuration (``ModelQuantConfig``); ``adapters/<label>
  .safetensors``: its adapter (LoRA A and B, for CoA-LoRA the B folded for that configuration,
  arXiv 2509.25214 §3), plus optional per-configuration overrides of base weights;
* the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``, ...) when the writer was
  given one, so ``transformers.AutoTokenizer.from_pretrained(<export>)`` gives the run's;
* ``config.json`` (the Hugging Face config), ``README.md`` (model card) and ``manifest.json``
  (format and version, architecture, targets, entries, tied weights, configurations, the sha256
  and size of every file, and ``manifest_sha256``, its own digest: ``coalora.deploy.schema``),
  written last.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from coalora.deploy.schema import (
    LABEL,
    check_digest,
    check_manifest,
    check_paths,
    member,
    sign_manifest,
)
from coalora.errors import CoaloraError
from coalora.quant.config import QuantConfig

FORMAT = "coalora-packed"
VERSION = 2  # 2: manifest_sha256, path rules, the tokenizer's files
VERSIONS = (1, 2)  # read; version 1 has no digest, so only with verify=False
MANIFEST = "manifest.json"
PACKED = "packed.safetensors"
BASE = "base.safetensors"
HF_CONFIG = "config.json"
REQUIRED_FILES = (PACKED, BASE, HF_CONFIG)  # what load opens besides a configuration's files


def entry_key(name: str, qc: QuantConfig) -> str:
    """The key of target ``name``'s entry under option ``qc`` in ``packed.safetensors``."""
    return f"{name}::{qc.key}"


def tensor_key(entry: str, field: str) -> str:
    """The safetensors key of one ``PackedTensor`` field of ``entry``."""
    return f"{entry}::{field}"


def config_file(label: str) -> str:
    return f"configs/{label}.json"


def adapter_file(label: str) -> str:
    return f"adapters/{label}.safetensors"


def check_labels(labels: Iterable[str]) -> None:
    bad = [label for label in labels if not LABEL.match(label)]
    if bad:
        raise CoaloraError(f"export: labels {bad} must match {LABEL.pattern}")


def clean_state_dict(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The model's weights under their unwrapped names, without the target linears' weights and
    without adapter tensors (a target keeps only its bias, ``<name>.bias``)."""
    targets = sorted(names, key=len, reverse=True)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        target = next((n for n in targets if key.startswith(n + ".")), None)
        if target is None:
            out[key] = value
            continue
        rest = key[len(target) + 1 :]
        while rest.startswith("base_layer."):
            rest = rest[len("base_layer.") :]
        if rest == "bias":
            out[f"{target}.bias"] = value
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` (relative path) with its sha256 and size, as the manifest lists
    them."""
    return {
        str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_manifest(
    architecture: str,
    model_type: str,
    targets: dict[str, list[int]],
    entries: dict[str, dict],
    tied: dict[str, str],
    configurations: dict[str, dict],
    files: dict[str, dict],
) -> dict:
    """The manifest: ``targets`` name → [d_out, d_in]; ``entries`` key → {shape, option};
    ``tied`` key → the key it shares storage with; ``configurations`` label → {config,
    average_bits[, adapter, scaling]}; ``files`` as ``file_table``; signed with its digest."""
    return sign_manifest(
        {
            "format": FORMAT,
            "version": VERSION,
            "architecture": architecture,
            "model_type": model_type,
            "targets": targets,
            "entries": entries,
            "tied": tied,
            "configurations": configurations,
            "files": files,
        }
    )


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    """The export's manifest after its schema, value and path rules (``coalora.deploy.schema``);
    with ``verify`` also its own digest and every listed file's size and sha256."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CoaloraError(f"{path}: not a coalora packed export (no {MANIFEST})")
    member(path, MANIFEST, MANIFEST, mpath, None)  # a symlink out of the export is refused
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CoaloraError(f"{mpath}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CoaloraError(f"{mpath}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(manifest, dict):
        raise CoaloraError(f"{mpath}: must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("version") not in VERSIONS:
        raise CoaloraError(
            f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {FORMAT!r} version {' or '.join(map(str, VERSIONS))}"
        )
    if verify:
        check_digest(manifest, mpath)
    check_manifest(manifest, mpath, REQUIRED_FILES)
    check_paths(manifest, path, mpath)
    if verify:
        for rel, info in manifest["files"].items():
            f = path / rel
            if not f.is_file():
                raise CoaloraError(f"{f}: missing (listed in {MANIFEST})")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise CoaloraError(
                    f"{f}: {size} bytes, {MANIFEST} says {info['bytes']} (truncated or replaced)"
                )
            if sha256(f) != info["sha256"]:
                raise CoaloraError(f"{f}: sha256 differs from {MANIFEST} (file was modified)")
    return manifest


def labels(path: str | Path) -> list[str]:
    """The configuration labels an export serves."""
    return list(read_manifest(path, verify=False)["configurations"])


def _budget_value(value: Any) -> float | None:
    """A budget or label as a number (``3``, ``3.0``, ``"3.00"``), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def pick_label(manifest: dict, budget: Any, path: Path) -> str:
    """The label ``budget`` names: the label itself, or any spelling of the same number (``3``,
    ``3.0``, ``"3"``, ``"3.00"`` all name label ``"3"`` or ``"3.0"``); with ``budget=None`` the
    one configuration of an export that serves one."""
    available = list(manifest["configurations"])
    if budget is None:
        if len(available) == 1:
            return available[0]
        raise CoaloraError(f"{path}: serves {available}; pass budget=<one of them>")
    if isinstance(budget, str) and budget in available:
        return budget
    value = _budget_value(budget)
    same = [label for label in available if value is not None and _budget_value(label) == value]
    if len(same) == 1:
        return same[0]
    if same:
        raise CoaloraError(f"{path}: budget={budget!r} names several labels {same}; pass one")
    raise CoaloraError(f"{path}: budget={budget!r} is not in this export; available: {available}")


__all__ = [
    "BASE",
    "FORMAT",
    "HF_CONFIG",
    "LABEL",
    "MANIFEST",
    "PACKED",
    "REQUIRED_FILES",
    "VERSION",
    "VERSIONS",
    "adapter_file",
    "check_labels",
    "clean_state_dict",
    "config_file",
    "entry_key",
    "file_table",
    "labels",
    "make_manifest",
    "pick_label",
    "read_manifest",
    "sha256",
    "tensor_key",
]
