"""The packed export reader: ``load(path, budget)`` serves one configuration of a packed export.

It reads the manifest under its rules (``coalora.deploy.schema``: digest, paths, values, shapes;
docs/packed.md "What load checks") and verifies every file's size and sha256, builds the
``transformers`` class the manifest names (only a ``PreTrainedModel`` subclass, ``model_class``)
from ``config.json`` (or fills a given instance), loads the base weights
and replaces each target linear by a packed ``QuantLinear`` holding only the chosen
configuration's entries (docs/packed.md), wrapped in the project's ``LoRALinear`` (LoRA, arXiv
2106.09685; frozen, B already folded for CoA-LoRA, arXiv 2509.25214 §3) when the configuration
has an adapter. ``merge=True`` folds the LoRA into the base by re-quantizing ``deq(Q) + s·BA``
with the same option; ``backend="bnb"`` serves the same values through bitsandbytes'
``Linear4bit`` (``coalora.quant.bnb.bnb_linear4bit``). ``load_tokenizer`` returns the run's
tokenizer shipped beside the export. Imports neither Lightning, Hydra nor botorch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from coalora.adapters.lora import LoRALinear
from coalora.deploy.format import (
    BASE,
    HF_CONFIG,
    MANIFEST,
    PACKED,
    clean_state_dict,
    entry_key,
    pick_label,
    read_manifest,
    tensor_key,
)
from coalora.errors import CoaloraError
from coalora.quant.bnb import bnb_linear4bit
from coalora.quant.config import ModelQuantConfig
from coalora.quant.gguf_space import GGUFPacked
from coalora.quant.linear import DequantCache, QuantLinear
from coalora.quant.model import replace_module
from coalora.quant.packing import (
    PackedTensor,
    dequantize_packed,
    entry_fields,
    entry_from_fields,
    pack_option,
)

BACKENDS = ("packed", "bnb")
TOKENIZER_CONFIG = "tokenizer_config.json"  # every transformers tokenizer writes it


def model_class(name: str, mpath: Path) -> type:
    """The ``transformers`` class ``name`` names; only subclasses of ``PreTrainedModel`` are
    allowed (the manifest's ``architecture`` is called with the export's config)."""
    import transformers

    cls = getattr(transformers, name, None) if re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name) else None
    if (
        not isinstance(cls, type)
        or not issubclass(cls, transformers.PreTrainedModel)
        or cls is transformers.PreTrainedModel
    ):
        raise CoaloraError(
            f"{mpath}: architecture={name!r} is not allowed: it must name a model class of "
            f"transformers {transformers.__version__} (a subclass of PreTrainedModel, e.g. "
            "'BertForSequenceClassification')"
        )
    return cls


def _skeleton(manifest: dict, path: Path, base_model: nn.Module | None) -> nn.Module:
    """The model to fill: ``base_model``, or the export's architecture built from its config;
    either must have the export's targets with their shapes."""
    if base_model is None:
        import transformers

        cls = model_class(manifest["architecture"], path / MANIFEST)
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CoaloraError(f"{path / HF_CONFIG}: not a transformers config ({first})") from None
        if cls.config_class is not None and not isinstance(config, cls.config_class):
            raise CoaloraError(
                f"{path / HF_CONFIG}: model_type {config.model_type!r} does not fit architecture "
                f"{manifest['architecture']!r} (it takes {cls.config_class.__name__})"
            )
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


def _tensors(path: Path, rel: str) -> dict[str, Tensor]:
    """A safetensors file of the export (one line naming it when it cannot be read)."""
    try:
        return load_file(str(path / rel))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CoaloraError(f"{path / rel}: not a readable safetensors file ({e})") from None


def _configuration(path: Path, rel: str, targets: dict[str, list[int]]) -> ModelQuantConfig:
    """A configuration file, which must cover exactly the targets with their sizes."""
    source = path / rel
    try:
        config = ModelQuantConfig.from_dict(json.loads(source.read_text()), source=str(source))
        config.validate_names(list(targets))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        text = str(e) if str(source) in str(e) else f"{source}: {e}"
        raise CoaloraError(text.splitlines()[0]) from None
    for name, (d_out, d_in) in targets.items():
        if config.numels[name] != d_out * d_in:
            raise CoaloraError(
                f"{source}: layers[{name!r}].numel={config.numels[name]}, the target has "
                f"{d_out} x {d_in} = {d_out * d_in}"
            )
    return config


def _load_base(model: nn.Module, path: Path, manifest: dict, adapter: dict[str, Tensor]) -> None:
    """Fill the non-target weights from ``base.safetensors`` (+ the adapter's overrides)."""
    base = _tensors(path, BASE)
    expected = clean_state_dict(model, list(manifest["targets"]))
    missing = sorted(set(expected) - set(base) - set(manifest["tied"]))
    shape_bad = [k for k, v in base.items() if k in expected and expected[k].shape != v.shape]
    unexpected = sorted(set(base) - set(expected))
    if missing or shape_bad or unexpected:
        raise CoaloraError(
            f"{path}: export for another model: base weights missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shape_bad[:3]}"
        )
    overrides = {
        k: v for k, v in adapter.items() if k.rpartition(".")[2] not in ("lora_A", "lora_B")
    }
    model.load_state_dict({**base, **overrides}, strict=False)
    if manifest["tied"] and hasattr(model, "tie_weights"):
        model.tie_weights()


def _merge(
    p: PackedTensor | GGUFPacked, A: Tensor, B: Tensor, s: float
) -> tuple[PackedTensor | GGUFPacked, float]:
    """``deq(p) + s·BA`` re-quantized with ``p``'s option, and the relative error that adds."""
    with torch.no_grad():
        target = dequantize_packed(p) + s * (B.float() @ A.float())  # (d_out, d_in)
        merged = pack_option(target, p.qc)
        err = dequantize_packed(merged) - target
    return merged, float(err.norm() / target.norm().clamp_min(1e-30))


def load(
    path: str | Path,
    budget: Any = None,
    merge: bool = False,
    base_model: nn.Module | None = None,
    verify: bool = True,
    backend: str = "packed",
) -> nn.Module:
    """A ready ``transformers`` model serving configuration ``budget`` of the export at ``path``.

    Target linears become packed ``QuantLinear`` layers (+ a frozen ``LoRALinear`` when the
    configuration has an adapter). ``merge=True`` folds the LoRA into the base by re-quantizing
    ``deq(Q) + s·BA`` with the same option; the relative error that adds is in
    ``model.coalora_export["merge_error"]``. ``base_model`` (optional) is an instance to fill
    instead of building one from ``config.json``; it must be the exported architecture.
    ``backend="bnb"`` builds bitsandbytes ``Linear4bit`` layers instead (every option of the
    configuration must be bits=4, block0=64; same values, see ``bnb_linear4bit``).
    """
    if backend not in BACKENDS:
        raise CoaloraError(f"backend={backend!r} is not allowed; allowed: {list(BACKENDS)}")
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    label = pick_label(manifest, budget, path)
    info = manifest["configurations"][label]
    config = _configuration(path, info["config"], manifest["targets"])
    model = _skeleton(manifest, path, base_model)
    adapter = _tensors(path, info["adapter"]) if "adapter" in info else {}
    _load_base(model, path, manifest, adapter)

    merge_error: dict[str, float] = {}
    cache = DequantCache(0, storage="packed")
    s = float(info.get("scaling", 1.0))
    with safe_open(str(path / PACKED), framework="pt") as f:
        for name in manifest["targets"]:
            qc = config[name]
            key = entry_key(name, qc)
            if key not in manifest["entries"]:
                raise CoaloraError(f"{path}: entry {key} of configuration {label!r} is missing")
            try:
                fields = {fd: f.get_tensor(tensor_key(key, fd)) for fd in entry_fields(qc)}
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise CoaloraError(f"{path}/{PACKED}: cannot read {key}: {e}") from None
            p = entry_from_fields(fields, manifest["entries"][key]["shape"], qc)
            p.validate(f"{PACKED}: entry {key}")
            linear = model.get_submodule(name)
            A, B = adapter.get(f"{name}.lora_A"), adapter.get(f"{name}.lora_B")
            if (A is None) != (B is None):
                raise CoaloraError(f"{path / info['adapter']}: {name} has only one of lora_A/B")
            if merge and A is not None:
                p, merge_error[name] = _merge(p, A, B, s)
                A = B = None
            if backend == "bnb" and not isinstance(p, PackedTensor):
                raise CoaloraError(
                    f"backend='bnb' reads NF4 entries; {key} is {qc.key}: use backend='packed'"
                )
            if backend == "bnb":
                layer = bnb_linear4bit(p, linear.bias, linear.weight.dtype)
            else:
                layer = QuantLinear.from_packed(name, {qc: p}, linear.bias, cache)
            if A is not None:
                try:
                    layer = LoRALinear.from_weights(layer, A, B, s)
                except (ValueError, AttributeError, TypeError) as e:  # B missing, wrong shapes
                    raise CoaloraError(f"{path / info['adapter']}: {name}: {e}") from None
            replace_module(model, name, layer)
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


def load_tokenizer(path: str | Path, verify: bool = True) -> Any:
    """The run's tokenizer, shipped beside a packed export: ``AutoTokenizer.from_pretrained`` on
    the export folder after the manifest's checks. The tokenizer may read any file of the top
    folder, so with ``verify`` each one must be listed in the manifest (and match it)."""
    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    if TOKENIZER_CONFIG not in manifest["files"]:
        raise CoaloraError(
            f"{path}: this export has no tokenizer (written without one; {TOKENIZER_CONFIG} is "
            "not in its manifest); load the base model's tokenizer instead"
        )
    unlisted = sorted(
        p.name
        for p in path.iterdir()
        if not p.is_dir() and p.name != MANIFEST and p.name not in manifest["files"]
    )
    if verify and unlisted:
        raise CoaloraError(
            f"{path}: {unlisted} not listed in {MANIFEST}; the tokenizer could read them "
            "(remove them or export again)"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


__all__ = ["BACKENDS", "load", "load_tokenizer", "model_class"]
