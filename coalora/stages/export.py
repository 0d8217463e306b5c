"""``python export.py ckpt=<run> quant.budget=3.0``: the trained run for one configuration.

Two formats (``format=``):

* ``peft`` (LoRA-family methods): a PEFT LoRA adapter + ``quant_config.json`` for the base + a
  model card. For CoA-LoRA the adapter is the zero-cost adaptation B' = B (I + γU(c))
  (``coalora.adapt``); for the other LoRA methods it is the trained LoRA as is. Load it with
  :func:`load_quantized_base` + ``peft.PeftModel.from_pretrained``.
* ``merged`` (every method; the only one for QWHA, whose adapter is a sparse Walsh–Hadamard
  spectrum, and LQ-LoRA, whose base is its own decomposition Q): a plain ``transformers``
  checkpoint whose target linears hold the effective weights deq(Q(c)) + ΔW, read off each adapted
  layer as an affine map (f(I) − f(0)). ``AutoModelForSequenceClassification.from_pretrained``
  loads it with no coalora code; it reproduces the adapted model's logits in full precision
  (re-quantize it to deploy at the configuration's memory).

Methods trained on one configuration (QLoRA, LQ-LoRA, QWHA) export that configuration; a different
``quant.budget``/``quant.file`` is an error. Multi-configuration methods (CoA-LoRA, Shared-LoRA)
need one: a budget exports the run's configuration at that budget (the one recorded in its
``allocations.json``, else recomputed with the run's space, solver and sensitivity:
``MethodContext.allocations``). The output directory is written to a temporary sibling and renamed, so an interrupted
export leaves nothing half-written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from coalora.adapters import AdapterLayer, LoRALinear, adapter_modules
from coalora.errors import ConfigError
from coalora.io import atomic_write_json, replace_dir_atomically
from coalora.methods import registry
from coalora.models import build_tokenizer, task_kind
from coalora.quant import ModelQuantConfig, QuantLinear, fake_quantize
from coalora.quant.model import model_weights
from coalora.stages.build import build_backbone
from coalora.stages.restore import load_run_config, resolve_checkpoint, restore

FORMATS = ("auto", "peft", "merged", "packed")
MARKER = "coalora_export.json"


def export_configuration(cfg: DictConfig, lit) -> ModelQuantConfig | None:
    """The configuration ``quant.budget`` / ``quant.file`` asks for, for the run ``lit``."""
    q = cfg.quant
    method = lit.method
    if not method.switches_configs:  # trained on one configuration: that is what it serves
        return _trained_configuration(q, method)
    if q.mode == "file":
        if not q.file:
            raise ConfigError("quant=file needs quant.file=<configuration json>")
        if not Path(q.file).is_file():
            raise ConfigError(f"quant.file={q.file}: no such configuration file")
        config = ModelQuantConfig.from_json(q.file)
        config.validate_names(method.names)
        return config
    if q.mode == "budget":
        if q.budget is None:
            raise ConfigError("quant=budget needs quant.budget=<average bits>")
        b = float(q.budget)  # the configuration training validated on at this budget
        return lit.ctx.allocations(lit.model, [b])[b].config
    raise ConfigError(f"export: quant={q.mode} is not allowed; allowed: ['budget', 'file']")


def _trained_configuration(q: DictConfig, method) -> ModelQuantConfig | None:
    trained = method.config
    bits = "full precision" if trained is None else f"{trained.average_bits():.4f} bits"
    hint = (
        f"method={method.name} was trained on one configuration ({bits}) and exports only that; "
        "drop quant.budget / quant.file"
    )
    if q.mode == "file" and q.get("file"):
        asked = ModelQuantConfig.from_json(q.file)
        if trained is None or asked.to_dict() != trained.to_dict():
            raise ConfigError(f"quant.file={q.file} is not the trained configuration: {hint}")
    elif q.mode == "budget" and q.get("budget") is not None:
        if trained is None or abs(float(q.budget) - trained.average_bits()) > 0.05:
            raise ConfigError(f"quant.budget={q.budget} does not match the run: {hint}")
    elif q.mode not in ("budget", "file"):
        raise ConfigError(f"export: quant={q.mode} is not allowed; allowed: ['budget', 'file']")
    return trained


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


def class_names(task: DictConfig) -> list[str] | None:
    names = task.get("class_names") or task.get("label_names")
    return [str(n) for n in names] if names else None


@torch.no_grad()
def fold_label_affine(model: nn.Module, task: DictConfig, head: list[str]) -> None:
    """A regression task trained on standardised targets (``task.label_shift/label_scale``)
    exports a head that outputs the task's own scores: the last head linear becomes
    ``scale · (W x + b) + shift``."""
    if not task.get("is_regression"):
        return
    shift, scale = float(task.get("label_shift", 0.0)), float(task.get("label_scale", 1.0))
    if shift == 0.0 and scale == 1.0:
        return
    linears = [
        m for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(part in head for part in n.split("."))
    ]  # fmt: skip
    if not linears:
        raise ConfigError(f"export: no head linear among {head} to fold task.label_scale into")
    last = linears[-1]
    last.weight.mul_(scale)
    if last.bias is not None:
        last.bias.mul_(scale).add_(shift)


def merged_model(lit, run_cfg: DictConfig) -> nn.Module:
    """A fresh ``transformers`` model whose target linears hold the adapted model's effective
    weights and whose other parameters (head included) are copied from it."""

    lit.model.eval()
    fresh = build_backbone(run_cfg)
    source = lit.model.state_dict()
    target = fresh.state_dict()
    with torch.no_grad():
        for key, value in target.items():
            if key in source and source[key].shape == value.shape:
                value.copy_(source[key].to(value.dtype))
        for name in lit.method.names:
            linear = fresh.get_submodule(name)
            weight, bias = effective_linear(lit.model.get_submodule(name), linear.in_features)
            if not torch.isfinite(weight).all():
                raise RuntimeError(f"export: non-finite effective weight for {name}")
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(bias)
    names = class_names(run_cfg.task)
    if names and task_kind(run_cfg.task) != "causal_lm":
        fresh.config.id2label = dict(enumerate(names))
        fresh.config.label2id = {n: i for i, n in enumerate(names)}
    return fresh.eval()


def merged_card(run_cfg: DictConfig, config: ModelQuantConfig | None, source: str) -> str:
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


def model_card(run_cfg: DictConfig, config: ModelQuantConfig | None, source: str) -> str:
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
        "Load: build the base, quantize it with `coalora.stages.export.load_quantized_base`, then\n"
        "`peft.PeftModel.from_pretrained(base, <this folder>)`. The adapter was fitted to this\n"
        "quantized base; on another configuration export again (CoA-LoRA adapts in milliseconds).\n"
    )


def _check_target(out_dir: Path, run_dir: Path | None, overwrite: bool) -> None:
    """Never replace what coalora did not write: an existing ``out_dir`` must be an export of
    the same run (its marker file names the run) or ``overwrite=true`` must be given."""
    if run_dir is not None and (out_dir == run_dir or out_dir in run_dir.parents):
        raise ConfigError(f"out_dir={out_dir} would replace the training run {run_dir}")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"out_dir={out_dir} is an existing file; choose a directory path")
    if overwrite or not any(out_dir.iterdir()):
        return
    if not _is_export_of(out_dir, run_dir):
        raise ConfigError(
            f"out_dir={out_dir} exists and is not an export of this run; choose another "
            "out_dir or pass overwrite=true to replace it"
        )


def _is_export_of(path: Path, run_dir: Path | None) -> bool:
    """``path`` holds an export of ``run_dir`` (its marker file names the run)."""
    try:
        return run_dir is not None and json.loads((path / MARKER).read_text()).get(
            "run_dir"
        ) == str(run_dir)
    except (OSError, ValueError, AttributeError):
        return False


def write_export(
    out_dir: Path, files: dict[str, Any], run_dir: Path | None = None, overwrite: bool = False
) -> Path:
    """Write every file into a temp sibling directory, then swap it in
    (:func:`coalora.io.replace_dir_atomically`): an interruption leaves either the old or the
    new export whole."""
    out_dir = Path(out_dir).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else None
    _check_target(out_dir, run_dir, overwrite)

    def build(tmp: Path) -> None:
        for name, content in files.items():
            if isinstance(content, nn.Module):  # a transformers model: its own writer
                content.save_pretrained(str(tmp), safe_serialization=True)
            elif hasattr(content, "save_pretrained"):  # a tokenizer
                content.save_pretrained(str(tmp))
            elif name.endswith(".safetensors"):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            elif isinstance(content, str):
                (tmp / name).write_text(content)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        marker = {"run_dir": str(run_dir) if run_dir is not None else None, "files": sorted(files)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    return replace_dir_atomically(
        out_dir, build, is_ours=lambda p: _is_export_of(p, run_dir), overwrite=overwrite
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
            model.get_submodule(name).weight.copy_(fake_quantize(weights[name].float(), qc))
    return model


def export_format(requested: str, method) -> str:
    """The format to write: ``auto`` is the method's first declared export format."""
    if requested not in FORMATS:
        raise ConfigError(f"format={requested!r} is not allowed; allowed: {list(FORMATS)}")
    formats = tuple(method.export_formats)
    if requested == "auto":
        return formats[0]
    if requested not in formats:
        raise ConfigError(
            f"format={requested} is not available for method={method.name}; allowed: "
            f"{list(formats)} (QWHA's adapter is a sparse Walsh-Hadamard spectrum and LQ-LoRA's "
            "base is its own decomposition Q, not quant(W): they export format=merged)"
        )
    return requested


def run(cfg: DictConfig) -> Path:
    requested = str(cfg.get("format", "auto"))
    if requested not in FORMATS:
        raise ConfigError(f"format={requested!r} is not allowed; allowed: {list(FORMATS)}")
    run_dir, _ = resolve_checkpoint(cfg.ckpt)
    run_cfg = load_run_config(run_dir)
    fmt = export_format(requested, registry_method(run_cfg))
    if cfg.out_dir:
        _check_target(Path(cfg.out_dir).resolve(), run_dir.resolve(), bool(cfg.get("overwrite")))
    run_cfg, lit = restore(cfg.ckpt, cache_dir=cfg.paths.cache_dir)
    if fmt == "packed":
        return export_packed(cfg, run_cfg, lit, run_dir)
    config = export_configuration(cfg, lit)
    method = lit.method
    method.adapt(lit.model, config)
    head_names = list(run_cfg.model.get("head_modules", ["classifier", "score"]))
    fold_label_affine(lit.model, run_cfg.task, head_names)
    if not method.switches_configs:
        source = "the trained configuration"
    elif cfg.quant.mode == "budget":
        source = f"budget {cfg.quant.budget}"
    else:
        source = str(cfg.quant.file)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.paths.output_dir) / fmt_dir(fmt)
    files: dict[str, Any] = {}
    if fmt == "peft":
        head = list(run_cfg.model.get("head_modules", ["classifier", "score"]))
        head = [h for h in head if any(n.split(".")[-1] == h for n, _ in lit.model.named_modules())]
        files["adapter_config.json"] = adapter_config(run_cfg, method.names, head)
        files["adapter_model.safetensors"] = peft_state(lit.model, method.names, head)
        files["README.md"] = model_card(run_cfg, config, source)

        files["tokenizer"] = build_tokenizer(run_cfg.model)  # the adapter's inputs, beside it
    else:
        files["model"] = merged_model(lit, run_cfg)
        files["tokenizer"] = build_tokenizer(run_cfg.model)
        files["README.md"] = merged_card(run_cfg, config, source)
    if config is not None:
        files["quant_config.json"] = config.to_dict()
    write_export(out_dir, files, run_dir=run_dir, overwrite=bool(cfg.get("overwrite")))
    bits = None if config is None else config.average_bits()
    atomic_write_json(
        Path(cfg.paths.output_dir) / "export.json",
        {
            "format": fmt,
            "adapter_dir" if fmt == "peft" else "model_dir": str(out_dir),
            "avg_bits": bits,
            "ckpt": str(cfg.ckpt),
        },
    )
    where = "full precision" if bits is None else f"{bits:.4f} bits"
    what = "adapter" if fmt == "peft" else "merged model"
    print(f"exported {method.name} {what} at {where} to {out_dir}")
    return out_dir


def fmt_dir(fmt: str) -> str:
    return {"peft": "adapter", "merged": "merged", "packed": "packed"}[fmt]


def export_packed(cfg: DictConfig, run_cfg: DictConfig, lit, run_dir: Path) -> Path:
    """``format=packed``: the deployable artefact (docs/packed.md). One shared set of bit-packed
    (layer, option) entries for every requested configuration plus one small LoRA per
    configuration (CoA-LoRA: B' folded for it); ``coalora.deploy.load(path, budget=...)`` serves
    any of them without Lightning, Hydra or BoTorch."""
    from coalora import deploy

    method = lit.method
    budgets = list(cfg.quant.get("budgets") or [])
    if budgets and not method.switches_configs:
        raise ConfigError(
            f"quant.budgets: method={method.name} was trained on one configuration and exports "
            "only that one; drop quant.budgets"
        )
    configs: dict[str, ModelQuantConfig] = {}
    if budgets:
        for b in budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ConfigError(f"quant.budgets={budgets}: {b!r} is not a number (average bits)")
        allocs = lit.ctx.allocations(lit.model, budgets)
        configs = {f"{b:g}": a.config for b, a in allocs.items()}
    else:
        config = export_configuration(cfg, lit)
        if config is None:
            raise ConfigError(
                f"format=packed needs a quantized base; method={method.name} ran on "
                f"quant={run_cfg.quant.mode}: use format=peft or format=merged"
            )
        configs = {f"{config.average_bits():.4g}": config}
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    scaling = 1.0
    for label, config in configs.items():
        method.adapt(lit.model, config)
        adapters[label], scaling = deploy.lora_tensors(lit.model, method.names)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.paths.output_dir) / "packed"
    card = (
        f"Trained with coalora: method={method.name}, model={run_cfg.model.name}, "
        f"task={run_cfg.task.name}, run {run_dir}.\n"
    )
    deploy.save_packed(
        lit.model, method.names, configs, adapters, out_dir, scaling=scaling, card=card,
        overwrite=True,  # out_dir was checked above: empty, ours, or overwrite=true
    )  # fmt: skip
    sizes = {k: round(c.average_bits(), 4) for k, c in configs.items()}
    atomic_write_json(
        Path(cfg.paths.output_dir) / "export.json",
        {"format": "packed", "model_dir": str(out_dir), "avg_bits": sizes, "ckpt": str(cfg.ckpt)},
    )
    print(f"exported {method.name} packed model for {sizes} average bits to {out_dir}")
    return out_dir


def registry_method(run_cfg: DictConfig):
    """The method class a run was trained with (from the package registry, by name)."""
    cls = registry().get(run_cfg.method.get("name"))
    if cls is None:
        raise ConfigError(f"method.name={run_cfg.method.get('name')!r} is not a coalora method")
    return cls
