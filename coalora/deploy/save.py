"""The packed export writer: many configurations in one directory, served without training code.

``save_packed`` writes the layout of ``coalora.deploy.format`` (docs/packed.md, "Export format"):
one deduplicated set of bit-packed (layer, option) entries for every exported configuration
(``PackedTensor``: NF codes + double-quantized scales, QLoRA arXiv 2305.14314 §3, with LQ-LoRA's
per-layer options, arXiv 2311.12023 §3.2) plus one small LoRA per configuration (CoA-LoRA: B
folded for it, arXiv 2509.25214 §3). The directory is built in a temporary sibling and swapped
in by ``coalora.io.replace_dir_atomically``, so nothing is ever half-written. ``write_packed`` is
``export.py format=packed``'s writer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from coalora.deploy.format import (
    BASE,
    FORMAT,
    HF_CONFIG,
    MANIFEST,
    PACKED,
    adapter_file,
    check_labels,
    clean_state_dict,
    config_file,
    entry_key,
    file_table,
    make_manifest,
    tensor_key,
)
from coalora.deploy.writer import ExportJob, Written, check_target
from coalora.errors import CoaloraError
from coalora.io import replace_dir_atomically
from coalora.quant.config import LayerOption, ModelQuantConfig
from coalora.quant.gguf_space import GGUFPacked
from coalora.quant.linear import QuantLinear
from coalora.quant.model import base_linear
from coalora.quant.packing import PackedTensor, pack_option


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


def _target(model: nn.Module, name: str) -> nn.Module:
    module = base_linear(model, name)
    if not isinstance(module, (QuantLinear, nn.Linear)):
        raise CoaloraError(f"export: target {name!r} is {type(module).__name__}, not a linear")
    return module


def _entry(module: nn.Module, qc: LayerOption) -> PackedTensor | GGUFPacked:
    if isinstance(module, QuantLinear):
        return module.packed_entry(qc)
    with torch.no_grad():
        return pack_option(module.weight.detach(), qc)


def _card(
    model_type: str, arch: str, configs: dict[str, ModelQuantConfig], extra: str, tokenizer: bool
) -> str:
    rows = "\n".join(
        f"| {label} | {c.average_bits():.4f} | {len(c)} |" for label, c in configs.items()
    )
    tok = (
        "tokenizer = coalora.deploy.load_tokenizer(path)  # the run's, shipped here\n"
        if tokenizer
        else ""
    )
    note = (
        "The tokenizer's files are in this folder: `load_tokenizer` checks them against\n"
        "`manifest.json` and calls `transformers.AutoTokenizer.from_pretrained(path)`.\n\n"
        if tokenizer
        else "This export has no tokenizer: use the base model's.\n\n"
    )
    return (
        f"# coalora packed export: {arch} ({model_type})\n\n"
        "Quantized base stored packed (NF codes + double-quantized scales); one adapter per\n"
        "configuration.\n\n| configuration | average bits | quantized linears |\n|---|---|---|\n"
        f"{rows}\n\n"
        "Load (no training code needed):\n\n```python\nimport coalora.deploy\n"
        f"model = coalora.deploy.load(path, budget={next(iter(configs))!r})\n{tok}```\n\n"
        f"{note}{extra}"
    )


def _base_tensors(base: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The base weights to write, each storage once, and key → the key it is tied to."""
    seen: dict[tuple, str] = {}
    out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for key, value in base.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]  # shared storage (tied weights) is written once
            continue
        seen[ident] = key
        out[key] = value.detach().cpu().clone().contiguous()
    return out, tied


def _adapter_tensors(
    label: str, tensors: Mapping[str, Tensor], modules: dict[str, nn.Module], base: dict
) -> dict[str, Tensor]:
    """An adapter's tensors, each checked against a target's LoRA shape or a base weight."""
    checked = {}
    for key, t in tensors.items():
        stem, _, kind = key.rpartition(".")
        if kind in ("lora_A", "lora_B") and stem in modules:
            d_out, d_in = modules[stem].out_features, modules[stem].in_features
            ok = t.dim() == 2 and (t.shape[1] == d_in if kind == "lora_A" else t.shape[0] == d_out)
        else:
            ok = key in base and tuple(base[key].shape) == tuple(t.shape)
        if not ok:
            raise CoaloraError(
                f"export: adapter {label!r} tensor {key!r} {tuple(t.shape)} matches no "
                "target LoRA (<name>.lora_A/B) or base weight"
            )
        checked[key] = t.detach().cpu().clone().contiguous()
    return checked


def save_packed(
    model: nn.Module,
    names: list[str],
    configs: Mapping[Any, ModelQuantConfig],
    adapters: Mapping[Any, Mapping[str, Tensor]] | None,
    out_dir: str | Path,
    scaling: float | Mapping[Any, float] = 1.0,
    card: str = "",
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write ``configs`` (label → configuration) with their ``adapters`` (label →
    ``{<name>.lora_A, <name>.lora_B, <other state key>: tensor}``) as one packed export.

    ``model`` is the trained model (target linears plain, ``QuantLinear`` or adapter-wrapped);
    its non-target weights (head included) are exported as they are. ``tokenizer`` (a
    ``transformers`` tokenizer) is saved beside them, so ``AutoTokenizer.from_pretrained`` on
    the export gives it. Returns ``out_dir``.
    """
    names = list(names)
    labels = {str(k): v for k, v in configs.items()}
    if not labels:
        raise CoaloraError("export: no configurations to export")
    check_labels(labels)
    adapters = {str(k): v for k, v in (adapters or {}).items()}
    unknown = sorted(set(adapters) - set(labels))
    if unknown:
        raise CoaloraError(f"export: adapters for {unknown} have no configuration")
    for config in labels.values():
        config.validate_names(names)
    modules = {n: _target(model, n) for n in names}
    base = clean_state_dict(model, names)

    entries: dict[str, PackedTensor] = {}
    for config in labels.values():
        for n in names:
            entries.setdefault(entry_key(n, config[n]), _entry(modules[n], config[n]))
    packed = {
        tensor_key(key, field): getattr(p, field).detach().cpu().contiguous()
        for key, p in entries.items()
        for field in p.FIELDS
    }
    entry_meta = {key: {"shape": list(p.shape), "option": p.qc.key} for key, p in entries.items()}
    base_out, tied = _base_tensors(base)
    adapter_files = {
        label: _adapter_tensors(label, tensors, modules, base)
        for label, tensors in adapters.items()
    }
    hf_config = model.config.to_dict() if hasattr(model, "config") else {}
    arch = type(model).__name__  # the class serving the export (config.architectures may
    # name another head, e.g. BertModel for a sentence-transformers checkpoint)
    hf_config = {**hf_config, "architectures": [arch]}
    targets = {n: [modules[n].out_features, modules[n].in_features] for n in names}
    text = _card(hf_config.get("model_type", ""), arch, labels, card, tokenizer is not None)

    def build(tmp: Path) -> None:
        save = safetensors.torch.save_file  # read at write time: a patched writer is the one used
        if tokenizer is not None:  # first: the export's own files below win any name clash
            tokenizer.save_pretrained(str(tmp))
        (tmp / "configs").mkdir()
        (tmp / "adapters").mkdir()
        save(packed, str(tmp / PACKED), metadata={"format": FORMAT})
        save(base_out, str(tmp / BASE), metadata={"format": FORMAT})
        configurations = {}
        for label, config in labels.items():
            (tmp / config_file(label)).write_text(json.dumps(config.to_dict(), indent=2))
            entry = {"config": config_file(label), "average_bits": config.average_bits()}
            if label in adapter_files:
                rel = adapter_file(label)
                save(adapter_files[label], str(tmp / rel), metadata={"format": FORMAT})
                s = scaling[label] if isinstance(scaling, Mapping) else scaling
                entry.update(adapter=rel, scaling=float(s))
            configurations[label] = entry
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2, default=str))
        (tmp / "README.md").write_text(text)
        manifest = make_manifest(
            arch, hf_config.get("model_type", ""), targets, entry_meta, tied, configurations,
            file_table(tmp),
        )  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CoaloraError(f"export: {out_dir} exists; pass overwrite=True or choose another path")
    return replace_dir_atomically(out_dir, build, is_ours=lambda _: overwrite, overwrite=overwrite)


def write_packed(job: ExportJob) -> Written:
    """``export.py format=packed``: every configuration of ``job`` in one packed export, each
    with its LoRA at that configuration; ``coalora.deploy.load(path, budget=...)`` serves any of
    them without Lightning, Hydra or BoTorch."""
    if any(config is None for config in job.configs.values()):
        raise CoaloraError("format=packed needs a quantized base")
    check_target(job.out_dir, job.run_dir, job.overwrite)
    adapters: dict[str, dict[str, Tensor]] = {}
    scaling = 1.0
    for label, config in job.configs.items():
        job.adapt(config)
        adapters[label], scaling = lora_tensors(job.model, job.names)
    run = job.run_cfg
    card = (
        f"Trained with coalora: method={run.method.name}, model={run.model.name}, "
        f"task={run.task.name}, run {job.run_dir}.\n"
    )
    save_packed(
        job.model, job.names, job.configs, adapters, job.out_dir, scaling=scaling, card=card,
        overwrite=True,  # check_target above: empty, an export of this run, or overwrite=true
        tokenizer=job.tokenizer() if job.tokenizer is not None else None,
    )  # fmt: skip
    sizes = {k: round(c.average_bits(), 4) for k, c in job.configs.items()}
    return Written(
        {"format": "packed", "model_dir": str(job.out_dir), "avg_bits": sizes},
        f"packed model for {sizes} average bits",
    )


__all__ = ["lora_tensors", "save_packed", "write_packed"]
