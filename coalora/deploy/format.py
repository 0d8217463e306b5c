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
* ``config.json`` (the Hugging Face config), ``README.md`` (model card) and ``manifest.json``
  (format and version, architecture, targets, entries, tied weights, configurations and the
  sha256 and size of every file), written last.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from coalora.errors import CoaloraError
from coalora.quant.config import QuantConfig

FORMAT = "coalora-packed"
VERSION = 1
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a label is a file name stem
MANIFEST = "manifest.json"
PACKED = "packed.safetensors"
BASE = "base.safetensors"


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
    average_bits[, adapter, scaling]}; ``files`` as ``file_table``."""
    return {
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


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    """The export's manifest; with ``verify`` every file's size and sha256 are checked."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CoaloraError(f"{path}: not a coalora packed export (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CoaloraError(f"{mpath}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CoaloraError(
            f"{mpath}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
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


def pick_label(manifest: dict, budget: Any, path: Path) -> str:
    """The label ``budget`` names: a label, or a number equal to one (``3.0`` for ``"3"``); None
    when the export serves one configuration."""
    available = list(manifest["configurations"])
    if budget is None:
        if len(available) == 1:
            return available[0]
        raise CoaloraError(f"{path}: serves {available}; pass budget=<one of them>")
    if str(budget) in available:
        return str(budget)
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        for label in available:
            try:
                if float(label) == float(budget):
                    return label
            except ValueError:
                continue
    raise CoaloraError(f"{path}: budget={budget!r} is not in this export; available: {available}")


__all__ = [
    "BASE",
    "FORMAT",
    "LABEL",
    "MANIFEST",
    "PACKED",
    "VERSION",
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
