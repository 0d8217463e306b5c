"""``export.py format=merged``: a plain ``transformers`` checkpoint holding the adapted model's
effective weights, for every method.

The only format for QWHA, whose adapter is a sparse Walsh–Hadamard spectrum (arXiv 2509.17428),
and LQ-LoRA, whose base is its own decomposition Q (arXiv 2311.12023 §3.1). Each target linear
holds deq(Q(c)) + ΔW, read off the adapted layer through the adapter contract (``delta_weight()``,
docs/architecture.md "Adapters") or, for a base without a plain weight, as an affine map
(f(I) − f(0)). ``AutoModelForSequenceClassification.from_pretrained`` loads it with no coalora
code; it reproduces the adapted model's logits in full precision (re-quantize it to deploy at the
configuration's memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coalora.adapters import AdapterLayer
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
from coalora.quant.linear import QuantLinear


def _dequantized_weight(base: nn.Module) -> torch.Tensor | None:
    """The weight a frozen base applies, in full precision, or None if it has no plain form."""
    if isinstance(base, (nn.Linear, QuantLinear)):
        return base.weight.detach().float()
    return None


@torch.no_grad()
def effective_linear(module: nn.Module, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of an adapted layer in eval mode: W = deq(base) + ΔW from the adapter contract
    (``delta_weight()``), b = the base bias. A base without a plain weight (bitsandbytes'
    Linear4bit) is read off as an affine map instead: b = f(0), W = (f(I) − f(0))ᵀ."""
    if isinstance(module, AdapterLayer):
        base = module.get_base_layer()
        w = _dequantized_weight(base)
        if w is not None:
            bias = getattr(base, "bias", None)
            weight = w + (0 if module.merged else module.delta_weight().float())
            b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float().clone()
            return weight.contiguous(), b
    zero = module(torch.zeros(1, in_features))
    eye = module(torch.eye(in_features))
    return (eye - zero).T.contiguous(), zero[0].clone()


def class_names(task: Any) -> list[str] | None:
    names = task.get("class_names") or task.get("label_names")
    return [str(n) for n in names] if names else None


def merged_model(model: nn.Module, names: list[str], fresh: nn.Module, task: Any) -> nn.Module:
    """``fresh`` (a new ``transformers`` model of the run) with the adapted ``model``'s effective
    weights in its target linears ``names`` and every other parameter (head included) copied
    from ``model``; a classification task's class names become its labels."""
    model.eval()
    source = model.state_dict()
    target = fresh.state_dict()
    with torch.no_grad():
        for key, value in target.items():
            if key in source and source[key].shape == value.shape:
                value.copy_(source[key].to(value.dtype))
        for name in names:
            linear = fresh.get_submodule(name)
            weight, bias = effective_linear(model.get_submodule(name), linear.in_features)
            if not torch.isfinite(weight).all():
                raise RuntimeError(f"export: non-finite effective weight for {name}")
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(bias)
    labels = class_names(task)
    if labels and task_kind(task) != "causal_lm":
        fresh.config.id2label = dict(enumerate(labels))
        fresh.config.label2id = {n: i for i, n in enumerate(labels)}
    return fresh.eval()


def merged_card(run_cfg: Any, config: ModelQuantConfig | None, source: str) -> str:
    base = (
        "a full-precision base"
        if config is None
        else f"{source}, {config.average_bits():.4f} average bits (`quant_config.json`)"
    )
    return (
        f"# coalora merged model: {run_cfg.method.name} on {run_cfg.model.name} / "
        f"{run_cfg.task.name}\n\n"
        f"* configuration: {base}\n"
        "* weights: each target linear holds deq(Q) + ΔW, the adapted layer as trained, in full\n"
        "  precision; every other parameter (head included) as trained\n\n"
        "Load with `transformers.AutoModelForSequenceClassification.from_pretrained(<this folder>)`;\n"
        "it gives the adapted model's logits. To serve it at the configuration's memory, quantize\n"
        "the target linears again (e.g. with `quant_config.json`).\n"
    )


def write_merged(job: ExportJob) -> Written:
    """The merged checkpoint of ``job``'s one configuration, beside its tokenizer."""
    if job.backbone is None:
        raise ValueError("format=merged needs ExportJob.backbone (a fresh model of the run)")
    config = job.single("merged")
    job.adapt(config)
    fold_label_affine(job.model, job.run_cfg.task, job.heads())
    files: dict[str, Any] = {
        "model": merged_model(job.model, job.names, job.backbone(), job.run_cfg.task),
        "tokenizer": build_tokenizer(job.run_cfg.model),
        "README.md": merged_card(job.run_cfg, config, job.source),
    }
    if config is not None:
        files["quant_config.json"] = config.to_dict()
    write_export(job.out_dir, files, run_dir=job.run_dir, overwrite=job.overwrite)
    return Written(
        {"format": "merged", "model_dir": str(job.out_dir), "avg_bits": average_bits(config)},
        f"merged model at {describe_bits(config)}",
    )


__all__ = ["class_names", "effective_linear", "merged_card", "merged_model", "write_merged"]
