"""``python export.py ckpt=<run> quant.budget=3.0``: a PEFT-format LoRA adapter for one
configuration, plus ``quant_config.json`` for the base and a model card.

For CoA-LoRA the adapter is the zero-cost adaptation B' = B (I + γU(c)) (``coalora.adapt``); for
the other LoRA methods it is the trained LoRA as is. The output directory is written to a temporary
sibling and renamed, so an interrupted export leaves nothing half-written. Load it with
:func:`load_quantized_base` + ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from coalora.adapters import LoRALinear, adapter_modules
from coalora.errors import ConfigError
from coalora.io import atomic_write_json
from coalora.quant import ModelQuantConfig, QuantSpace, fake_quantize
from coalora.quant.model import model_weights
from coalora.stages.restore import restore

PEFT_METHODS = ("lora", "qlora", "shared_lora", "coalora")


def export_configuration(
    cfg: DictConfig, run_cfg: DictConfig, lit, cache_dir: str | None = None
) -> ModelQuantConfig:
    q = cfg.quant
    method = lit.method
    if q.mode == "file":
        if not q.file:
            raise ConfigError("quant=file needs quant.file=<configuration json>")
        config = ModelQuantConfig.from_json(q.file)
        config.validate_names(method.names)
        return config
    if q.mode == "budget":
        if q.budget is None:
            raise ConfigError("quant=budget needs quant.budget=<average bits>")
        from coalora.methods.pool import allocations

        space = getattr(method, "space", None) or QuantSpace.from_cfg(run_cfg.quant.space)
        weights = model_weights(lit.model, method.names)
        b = float(q.budget)
        cache = Path(cache_dir) if cache_dir else None
        return allocations(weights, [b], space, cache, run_cfg.model.name, q.solver)[b]
    raise ConfigError(f"export: quant={q.mode} is not allowed; allowed: ['budget', 'file']")


def peft_state(model: nn.Module, names: list[str], head: list[str]) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys: base_model.model.<name>.lora_{A,B}.weight (+ the head, modules_to_save)."""
    loras = adapter_modules(model, LoRALinear)
    out: dict[str, torch.Tensor] = {}
    for n in names:
        m = loras[n]
        out[f"base_model.model.{n}.lora_A.weight"] = m.lora_A.detach().clone().contiguous()
        out[f"base_model.model.{n}.lora_B.weight"] = m.effective_B().detach().clone().contiguous()
    for mn, mod in model.named_modules():
        if mn.split(".")[-1] in head:
            for pn, p in mod.named_parameters():
                out[f"base_model.model.{mn}.{pn}"] = p.detach().clone().contiguous()
    empty = [k for k, v in out.items() if v.numel() == 0 or not torch.isfinite(v).all()]
    if empty or not out:
        raise RuntimeError(f"export: empty or non-finite tensors {empty[:5]}")
    return out


def adapter_config(run_cfg: DictConfig, names: list[str], head: list[str]) -> dict[str, Any]:
    m = run_cfg.method
    base = run_cfg.model.get("hub_id") or run_cfg.model.name
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base,
        "r": int(m.rank),
        "lora_alpha": float(m.alpha),
        "lora_dropout": 0.0,
        "target_modules": list(names),
        "modules_to_save": list(head),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def model_card(run_cfg: DictConfig, config: ModelQuantConfig, source: str) -> str:
    return (
        f"# coalora adapter: {run_cfg.method.name} on {run_cfg.model.name} / {run_cfg.task.name}\n\n"
        f"* configuration: {source}, {config.average_bits():.4f} average bits over "
        f"{len(config)} quantized linears (`quant_config.json`)\n"
        f"* adapter: LoRA r={run_cfg.method.rank}, alpha={run_cfg.method.alpha} (PEFT format)\n\n"
        "Load: build the base, quantize it with `coalora.stages.export.load_quantized_base`, then\n"
        "`peft.PeftModel.from_pretrained(base, <this folder>)`. The adapter was fitted to this\n"
        "quantized base; on another configuration export again (CoA-LoRA adapts in milliseconds).\n"
    )


def write_export(out_dir: Path, files: dict[str, Any]) -> Path:
    """Write every file into a temp sibling directory, then rename it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            elif isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_quantized_base(model: nn.Module, quant_config: str | Path | ModelQuantConfig) -> nn.Module:
    """Replace each target linear's weight by its quantize-dequantize under ``quant_config``
    (plain ``nn.Linear`` layers, so vanilla PEFT can wrap them)."""
    config = (
        quant_config
        if isinstance(quant_config, ModelQuantConfig)
        else ModelQuantConfig.from_json(quant_config)
    )
    weights = model_weights(model, list(config))
    with torch.no_grad():
        for name, qc in config.items():
            model.get_submodule(name).weight.copy_(fake_quantize(weights[name].float(), qc))
    return model


def run(cfg: DictConfig) -> Path:
    run_cfg, lit = restore(cfg.ckpt, cache_dir=cfg.paths.cache_dir)
    if lit.method.name not in PEFT_METHODS:
        raise ConfigError(
            f"export writes PEFT LoRA adapters; method={lit.method.name} is not supported "
            f"(supported: {list(PEFT_METHODS)}). QWHA's adapter is a sparse Walsh-Hadamard "
            "spectrum and LQ-LoRA's base is its own decomposition Q, not quant(W)."
        )
    config = export_configuration(cfg, run_cfg, lit, cfg.paths.cache_dir)
    method = lit.method
    if method.name == "coalora":
        from coalora.methods.coalora import adapt

        adapt(lit, config)
    elif hasattr(method, "apply"):
        method.apply(lit.model, config)
    source = f"budget {cfg.quant.budget}" if cfg.quant.mode == "budget" else str(cfg.quant.file)
    head = list(run_cfg.model.get("head_modules", ["classifier", "score"]))
    head = [h for h in head if any(n.split(".")[-1] == h for n, _ in lit.model.named_modules())]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.paths.output_dir) / "adapter"
    files = {
        "adapter_config.json": adapter_config(run_cfg, method.names, head),
        "adapter_model.safetensors": peft_state(lit.model, method.names, head),
        "quant_config.json": config.to_dict(),
        "README.md": model_card(run_cfg, config, source),
    }
    write_export(out_dir, files)
    atomic_write_json(
        Path(cfg.paths.output_dir) / "export.json",
        {"adapter_dir": str(out_dir), "avg_bits": config.average_bits(), "ckpt": str(cfg.ckpt)},
    )
    print(f"exported {method.name} adapter at {config.average_bits():.4f} bits to {out_dir}")
    return out_dir
