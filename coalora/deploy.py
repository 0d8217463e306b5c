"""Deployable packed exports: one directory, many configurations, served without training code.

``save_packed`` writes a directory (docs/packed.md, "Export format"):

* ``packed.safetensors``: the bit-packed base, one entry per (layer, option) used by any of the
  exported configurations, deduplicated (QLoRA-style NF codes + double-quantized scales, arXiv
  2305.14314 §3; LQ-LoRA's per-layer options, arXiv 2311.12023 §3.2);
* ``base.safetensors``: every weight that is not a target linear's weight (embeddings, norms,
  biases, the task head);
* ``configs/<label>.json``: each configuration (``ModelQuantConfig``); ``adapters/<label>
  .safetensors``: its adapter (LoRA A and B, for CoA-LoRA the B folded for that configuration,
  arXiv 2509.25214 §3), plus optional per-configuration overrides of base weights;
* ``config.json`` (the Hugging Face config), ``README.md`` (model card) and ``manifest.json``
  (targets, entries, configurations and the sha256 and size of every file).

It is written to a temporary sibling directory and renamed into place. ``load(path, budget)``
verifies the manifest and rebuilds a ``transformers`` model whose target linears are packed
``QuantLinear`` layers (+ LoRA). This module imports neither Lightning, Hydra nor botorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coalora.errors import CoaloraError
from coalora.quant.bnb import bnb_linear4bit
from coalora.quant.config import ModelQuantConfig, QuantConfig
from coalora.quant.linear import DequantCache, QuantLinear
from coalora.quant.model import base_linear
from coalora.quant.nf import quantize_nf
from coalora.quant.packing import PackedTensor, dequantize_packed, pack_quantized

FORMAT = "coalora-packed"
VERSION = 1
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIELDS = ("codes", "q1", "s2", "offset")


class PackedLoRALinear(nn.Module):
    """Inference LoRA on a packed base: ``base(x) + s * (x Aᵀ) Bᵀ`` (B already folded)."""

    def __init__(self, base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # (r, d_in)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)  # (d_out, r)
        self.scaling = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.lora_A.to(x.dtype))  # (..., r)
        return self.base_layer(x) + F.linear(h, self.lora_B.to(x.dtype)) * self.scaling


def lora_tensors(model: nn.Module, names: list[str]) -> tuple[dict[str, Tensor], float]:
    """``{<name>.lora_A, <name>.lora_B}`` of the model's LoRA wrappers at the current
    configuration (B = ``effective_B()``: folded / mixed for CoA-LoRA) and their common scaling."""
    out: dict[str, Tensor] = {}
    scalings = set()
    for name in names:
        m = model.get_submodule(name)
        if not hasattr(m, "lora_A"):
            raise CoaloraError(f"export: {name} has no LoRA adapter ({type(m).__name__})")
        B = m.effective_B() if hasattr(m, "effective_B") else m.lora_B
        out[f"{name}.lora_A"] = m.lora_A.detach().cpu().clone().contiguous()
        out[f"{name}.lora_B"] = B.detach().cpu().clone().contiguous()
        scalings.add(float(m.scaling))
    if len(scalings) > 1:
        raise CoaloraError(f"export: LoRA scalings differ across layers: {sorted(scalings)}")
    return out, scalings.pop() if scalings else 1.0


def _base_module(model: nn.Module, name: str) -> nn.Module:
    module = base_linear(model, name)
    if not isinstance(module, (QuantLinear, nn.Linear)):
        raise CoaloraError(f"export: target {name!r} is {type(module).__name__}, not a linear")
    return module


def _entry(module: nn.Module, qc: QuantConfig) -> PackedTensor:
    if isinstance(module, QuantLinear):
        return module.packed_entry(qc)
    with torch.no_grad():
        return pack_quantized(quantize_nf(module.weight.detach(), qc))


def _entry_key(name: str, qc: QuantConfig) -> str:
    return f"{name}::{qc.key}"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _card(model_type: str, arch: str, configs: dict[str, ModelQuantConfig], extra: str) -> str:
    rows = "\n".join(
        f"| {label} | {c.average_bits():.4f} | {len(c)} |" for label, c in configs.items()
    )
    return (
        f"# coalora packed export: {arch} ({model_type})\n\n"
        "Quantized base stored packed (NF codes + double-quantized scales); one adapter per\n"
        "configuration.\n\n| configuration | average bits | quantized linears |\n|---|---|---|\n"
        f"{rows}\n\n"
        "Load (no training code needed):\n\n```python\nimport coalora.deploy\n"
        f"model = coalora.deploy.load(path, budget={next(iter(configs))!r})\n```\n\n"
        f"{extra}"
    )


def save_packed(
    model: nn.Module,
    names: list[str],
    configs: Mapping[Any, ModelQuantConfig],
    adapters: Mapping[Any, Mapping[str, Tensor]] | None,
    out_dir: str | Path,
    scaling: float | Mapping[Any, float] = 1.0,
    card: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``configs`` (label → configuration) with their ``adapters`` (label →
    ``{<name>.lora_A, <name>.lora_B, <other state key>: tensor}``) as one packed export.

    ``model`` is the trained model (target linears plain, ``QuantLinear`` or adapter-wrapped);
    its non-target weights (head included) are exported as they are. Returns ``out_dir``.
    """
    names = list(names)
    labels = {str(k): v for k, v in configs.items()}
    if not labels:
        raise CoaloraError("export: no configurations to export")
    bad = [label for label in labels if not _LABEL.match(label)]
    if bad:
        raise CoaloraError(f"export: labels {bad} must match {_LABEL.pattern}")
    adapters = {str(k): v for k, v in (adapters or {}).items()}
    unknown = sorted(set(adapters) - set(labels))
    if unknown:
        raise CoaloraError(f"export: adapters for {unknown} have no configuration")
    for config in labels.values():
        config.validate_names(names)
    modules = {n: _base_module(model, n) for n in names}
    base = clean_state_dict(model, names)

    entries: dict[str, PackedTensor] = {}
    for config in labels.values():
        for n in names:
            entries.setdefault(_entry_key(n, config[n]), _entry(modules[n], config[n]))
    tensors: dict[str, Tensor] = {}
    entry_meta: dict[str, dict] = {}
    for key, p in entries.items():
        for field in _FIELDS:
            tensors[f"{key}::{field}"] = getattr(p, field).detach().cpu().contiguous()
        entry_meta[key] = {"shape": list(p.shape), "option": p.qc.key}

    seen: dict[tuple, str] = {}
    base_out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for key, value in base.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]  # shared storage (tied weights) is written once
            continue
        seen[ident] = key
        base_out[key] = value.detach().cpu().clone().contiguous()

    adapter_files: dict[str, dict[str, Tensor]] = {}
    for label, tensors_l in adapters.items():
        checked = {}
        for key, t in tensors_l.items():
            stem, _, kind = key.rpartition(".")
            if kind in ("lora_A", "lora_B") and stem in modules:
                d_out, d_in = modules[stem].out_features, modules[stem].in_features
                ok = t.dim() == 2 and (
                    t.shape[1] == d_in if kind == "lora_A" else t.shape[0] == d_out
                )
            else:
                ok = key in base and tuple(base[key].shape) == tuple(t.shape)
            if not ok:
                raise CoaloraError(
                    f"export: adapter {label!r} tensor {key!r} {tuple(t.shape)} matches no "
                    "target LoRA (<name>.lora_A/B) or base weight"
                )
            checked[key] = t.detach().cpu().clone().contiguous()
        adapter_files[label] = checked

    hf_config = model.config.to_dict() if hasattr(model, "config") else {}
    arch = type(model).__name__  # the class serving the export (config.architectures may
    # name another head, e.g. BertModel for a sentence-transformers checkpoint)
    model_type = hf_config.get("model_type", "")
    scalings = {
        label: float(scaling[label] if isinstance(scaling, Mapping) else scaling)
        for label in adapter_files
    }
    return _write(
        Path(out_dir),
        overwrite,
        tensors,
        entry_meta,
        base_out,
        tied,
        labels,
        adapter_files,
        scalings,
        {**hf_config, "architectures": [arch]},
        {n: [modules[n].out_features, modules[n].in_features] for n in names},
        _card(model_type, arch, labels, card),
    )


def _write(
    out_dir: Path,
    overwrite: bool,
    tensors: dict,
    entry_meta: dict,
    base: dict,
    tied: dict,
    labels: dict[str, ModelQuantConfig],
    adapter_files: dict,
    scalings: dict,
    hf_config: dict,
    targets: dict,
    card: str,
) -> Path:
    from safetensors.torch import save_file

    if out_dir.exists() and not overwrite:
        raise CoaloraError(f"export: {out_dir} exists; pass overwrite=True or choose another path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "adapters").mkdir()
        save_file(tensors, str(tmp / "packed.safetensors"), metadata={"format": FORMAT})
        save_file(base, str(tmp / "base.safetensors"), metadata={"format": FORMAT})
        configurations = {}
        for label, config in labels.items():
            (tmp / "configs" / f"{label}.json").write_text(json.dumps(config.to_dict(), indent=2))
            entry = {"config": f"configs/{label}.json", "average_bits": config.average_bits()}
            if label in adapter_files:
                rel = f"adapters/{label}.safetensors"
                save_file(adapter_files[label], str(tmp / rel), metadata={"format": FORMAT})
                entry.update(adapter=rel, scaling=scalings[label])
            configurations[label] = entry
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        (tmp / "README.md").write_text(card)
        files = {
            str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "architecture": hf_config["architectures"][0],
            "model_type": hf_config.get("model_type", ""),
            "targets": targets,
            "entries": entry_meta,
            "tied": tied,
            "configurations": configurations,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():  # overwrite: swap, then remove the old export
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    """The export's manifest; with ``verify`` every file's size and sha256 are checked."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CoaloraError(f"{path}: not a coalora packed export (no manifest.json)")
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
                raise CoaloraError(f"{f}: missing (listed in manifest.json)")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise CoaloraError(
                    f"{f}: {size} bytes, manifest.json says {info['bytes']} (truncated or replaced)"
                )
            if _sha256(f) != info["sha256"]:
                raise CoaloraError(f"{f}: sha256 differs from manifest.json (file was modified)")
    return manifest


def labels(path: str | Path) -> list[str]:
    """The configuration labels an export serves."""
    return list(read_manifest(path, verify=False)["configurations"])


def _pick_label(manifest: dict, budget: Any, path: Path) -> str:
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


def _skeleton(manifest: dict, path: Path, base_model: nn.Module | None) -> nn.Module:
    if base_model is None:
        import transformers

        cls = getattr(transformers, manifest["architecture"], None)
        if cls is None:
            raise CoaloraError(
                f"{path}: architecture {manifest['architecture']!r} is unknown to transformers "
                f"{transformers.__version__}"
            )
        config = transformers.AutoConfig.from_pretrained(str(path))
        with torch.no_grad():
            base_model = cls(config)
    hf = getattr(base_model, "config", None)
    arch = type(base_model).__name__
    if arch != manifest["architecture"] or getattr(hf, "model_type", "") != manifest["model_type"]:
        raise CoaloraError(
            f"{path}: export is for {manifest['architecture']} ({manifest['model_type']}), "
            f"the model is {arch} ({getattr(hf, 'model_type', '')})"
        )
    for name, (d_out, d_in) in manifest["targets"].items():
        try:
            m = base_model.get_submodule(name)
        except AttributeError:
            m = None
        if not isinstance(m, nn.Linear) or (m.out_features, m.in_features) != (d_out, d_in):
            got = None if m is None else tuple(getattr(m, "weight", torch.empty(0)).shape)
            raise CoaloraError(
                f"{path}: export for another model: target {name} is ({d_out}, {d_in}) in the "
                f"export, {got} in the model"
            )
    return base_model


BACKENDS = ("packed", "bnb")


def load(
    path: str | Path,
    budget: Any = None,
    merge: bool = False,
    base_model: nn.Module | None = None,
    verify: bool = True,
    backend: str = "packed",
) -> nn.Module:
    """A ready ``transformers`` model serving configuration ``budget`` of the export at ``path``.

    Target linears become packed ``QuantLinear`` layers (+ ``PackedLoRALinear`` when the
    configuration has an adapter). ``merge=True`` folds the LoRA into the base by re-quantizing
    ``deq(Q) + s·BA`` with the same option; the relative error that adds is in
    ``model.coalora_export["merge_error"]``. ``base_model`` (optional) is an instance to fill
    instead of building one from ``config.json``; it must be the exported architecture.
    ``backend="bnb"`` builds bitsandbytes ``Linear4bit`` layers instead (every option of the
    configuration must be bits=4, block0=64; same values, see ``bnb_linear4bit``).
    """
    if backend not in BACKENDS:
        raise CoaloraError(f"backend={backend!r} is not allowed; allowed: {list(BACKENDS)}")
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    label = _pick_label(manifest, budget, path)
    info = manifest["configurations"][label]
    config = ModelQuantConfig.from_dict(
        json.loads((path / info["config"]).read_text()), source=str(path / info["config"])
    )
    model = _skeleton(manifest, path, base_model)

    base = load_file(str(path / "base.safetensors"))
    names = list(manifest["targets"])
    expected = clean_state_dict(model, names)
    missing = sorted(set(expected) - set(base) - set(manifest["tied"]))
    shape_bad = [k for k, v in base.items() if k in expected and expected[k].shape != v.shape]
    unexpected = sorted(set(base) - set(expected))
    if missing or shape_bad or unexpected:
        raise CoaloraError(
            f"{path}: export for another model: base weights missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shape_bad[:3]}"
        )
    adapter: dict[str, Tensor] = {}
    if "adapter" in info:
        adapter = load_file(str(path / info["adapter"]))
    overrides = {
        k: v for k, v in adapter.items() if k.rpartition(".")[2] not in ("lora_A", "lora_B")
    }
    model.load_state_dict({**base, **overrides}, strict=False)
    if manifest["tied"] and hasattr(model, "tie_weights"):
        model.tie_weights()

    merge_error: dict[str, float] = {}
    cache = DequantCache(0, storage="packed")
    with safe_open(str(path / "packed.safetensors"), framework="pt") as f:
        for name in names:
            qc = config[name]
            key = _entry_key(name, qc)
            if key not in manifest["entries"]:
                raise CoaloraError(f"{path}: entry {key} of configuration {label!r} is missing")
            try:
                fields = {fd: f.get_tensor(f"{key}::{fd}") for fd in _FIELDS}
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CoaloraError(f"{path}/packed.safetensors: cannot read {key}: {e}") from None
            p = PackedTensor(**fields, shape=tuple(manifest["entries"][key]["shape"]), qc=qc)
            p.validate(f"packed.safetensors: entry {key}")
            linear = model.get_submodule(name)
            A, B = adapter.get(f"{name}.lora_A"), adapter.get(f"{name}.lora_B")
            s = float(info.get("scaling", 1.0))
            if merge and A is not None:
                with torch.no_grad():
                    target = dequantize_packed(p) + s * (B.float() @ A.float())  # (d_out, d_in)
                    p = pack_quantized(quantize_nf(target, qc))
                    err = dequantize_packed(p) - target
                    merge_error[name] = float(err.norm() / target.norm().clamp_min(1e-30))
                A = B = None
            if backend == "bnb":
                layer = bnb_linear4bit(p, linear.bias, linear.weight.dtype)
            else:
                layer = QuantLinear.from_packed(name, {qc: p}, linear.bias, cache)
            new = layer if A is None else PackedLoRALinear(layer, A, B, s)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    model.coalora_export = {
        "path": str(path),
        "label": label,
        "config": config,
        "average_bits": config.average_bits(),
        "merged": bool(merge),
        "merge_error": merge_error,
        "backend": backend,
    }
    return model.eval()


__all__ = [
    "BACKENDS",
    "FORMAT",
    "VERSION",
    "PackedLoRALinear",
    "clean_state_dict",
    "labels",
    "load",
    "lora_tensors",
    "read_manifest",
    "save_packed",
]
