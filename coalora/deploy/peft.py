"""``export.py format=peft``: a PEFT LoRA adapter for one configuration, and the quantized base it
was fitted to.

The directory holds the adapter in PEFT's layout (``adapter_config.json``,
``adapter_model.safetensors``: ``base_model.model.<name>.lora_{A,B}.weight`` and the task head as
``modules_to_save``), ``quant_config.json`` (the base's configuration), the tokenizer and a model
card. For CoA-LoRA the adapter is the zero-cost adaptation B' = B (I + γU(c)) (arXiv 2509.25214
§3); for the other LoRA methods (LoRA, arXiv 2106.09685; QLoRA, arXiv 2305.14314) the trained LoRA
as is. Load it with :func:`load_quantized_base` + ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from coalora.adapters import LoRALinear, adapter_modules
from coalora.deploy.writer import (
    ExportJob,
    Written,
    average_bits,
    describe_bits,
    fold_label_affine,
    write_export,
)
from coalora.models import build_tokenizer, task_kind
from coalora.quant.config import ModelQuantConfig
from coalora.quant.model import base_linear, model_weights
from coalora.quant.nf import fake_quantize


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


def adapter_config(run_cfg: Any, names: list[str], head: list[str]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the run's LoRA (``method.rank``, ``method.alpha``)."""
    m = run_cfg.method
    base = run_cfg.model.get("hub_id") or run_cfg.model.name
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if task_kind(run_cfg.task) == "causal_lm" else "SEQ_CLS",
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


def model_card(run_cfg: Any, config: ModelQuantConfig | None, source: str) -> str:
    base = (
        f"* base: full precision ({run_cfg.quant.mode})\n"
        if config is None
        else f"* configuration: {source}, {config.average_bits():.4f} average bits over "
        f"{len(config)} quantized linears (`quant_config.json`)\n"
    )
    return (
        f"# coalora adapter: {run_cfg.method.name} on {run_cfg.model.name} / {run_cfg.task.name}\n\n"
        + base
        + f"* adapter: LoRA r={run_cfg.method.rank}, alpha={run_cfg.method.alpha} (PEFT format)\n\n"
        "Load: build the base, quantize it with `coalora.deploy.peft.load_quantized_base`, then\n"
        "`peft.PeftModel.from_pretrained(base, <this folder>)`. The adapter was fitted to this\n"
        "quantized base; on another configuration export again (CoA-LoRA adapts in milliseconds).\n"
    )


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
            base_linear(model, name).weight.copy_(fake_quantize(weights[name].float(), qc))
    return model


def write_peft(job: ExportJob) -> Written:
    """The PEFT adapter of ``job``'s one configuration, beside its tokenizer."""
    config = job.single("peft")
    job.adapt(config)
    heads = job.heads()
    fold_label_affine(job.model, job.run_cfg.task, heads)
    present = {n.split(".")[-1] for n, _ in job.model.named_modules()}
    head = [h for h in heads if h in present]
    files: dict[str, Any] = {
        "adapter_config.json": adapter_config(job.run_cfg, job.names, head),
        "adapter_model.safetensors": peft_state(job.model, job.names, head),
        "README.md": model_card(job.run_cfg, config, job.source),
        "tokenizer": build_tokenizer(job.run_cfg.model),  # the adapter's inputs, beside it
    }
    if config is not None:
        files["quant_config.json"] = config.to_dict()
    write_export(job.out_dir, files, run_dir=job.run_dir, overwrite=job.overwrite)
    return Written(
        {"format": "peft", "adapter_dir": str(job.out_dir), "avg_bits": average_bits(config)},
        f"adapter at {describe_bits(config)}",
    )


__all__ = ["adapter_config", "load_quantized_base", "model_card", "peft_state", "write_peft"]
