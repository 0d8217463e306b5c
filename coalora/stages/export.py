"""``python export.py ckpt=<run> quant.budget=3.0``: the trained run for one configuration.

This stage restores the run, chooses the format (``format=``, ``auto``: the method's first) and
the configurations, and calls that format's writer (``WRITERS``: one module of ``coalora.deploy``
each, docs/architecture.md "Stage flow"):

* ``peft`` (LoRA-family methods, ``coalora.deploy.peft``): a PEFT LoRA adapter +
  ``quant_config.json`` for the base + a model card. For CoA-LoRA the adapter is the zero-cost
  adaptation B' = B (I + γU(c)) (``coalora.adapt``); for the other LoRA methods it is the trained
  LoRA as is. Load it with ``coalora.deploy.peft.load_quantized_base`` +
  ``peft.PeftModel.from_pretrained``.
* ``merged`` (every method; the only one for QWHA and LQ-LoRA, ``coalora.deploy.merged``): a
  plain ``transformers`` checkpoint whose target linears hold the effective weights deq(Q(c)) + ΔW.
* ``packed`` (``coalora.deploy.save``): the bit-packed base shared by several configurations
  (``quant.budgets``) + one LoRA each; ``coalora.deploy.load`` serves it (docs/packed.md).
* ``gguf`` (LoRA-pair methods of a run trained with ``quant.space.kind=gguf``,
  ``coalora.deploy.gguf``): per configuration (``quant.budget`` or ``quant.budgets``) a llama.cpp
  base GGUF + GGUF LoRA adapter, a manifest and a model card (docs/gguf.md).

A Shared-LoRA / CoA-LoRA run with ``method.init=lpq|lq`` quantizes ``W − L`` (docs/methods.md,
"Quantization-aware initialisation"): ``packed`` carries those entries and ``merged`` folds
deq(Q(W − L)) + ΔW, but a PEFT base quantizes ``W``, so ``peft`` is refused and ``auto`` is
``merged``.

Methods trained on one configuration (QLoRA, LQ-LoRA, QWHA) export that configuration; a different
``quant.budget``/``quant.file`` is an error. Multi-configuration methods (CoA-LoRA, Shared-LoRA)
need one: a budget exports the run's configuration at that budget (the one recorded in its
``allocations.json``, else recomputed with the run's space, solver and sensitivity:
``MethodContext.allocations``). Every writer builds its directory in a temporary sibling and
renames it into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from coalora.deploy.gguf import write_gguf
from coalora.deploy.gguf_base import EMBEDDING_TYPES, check_gguf_run
from coalora.deploy.merged import write_merged
from coalora.deploy.peft import write_peft
from coalora.deploy.save import write_packed
from coalora.deploy.writer import ExportJob, Writer, check_target
from coalora.errors import ConfigError
from coalora.io import atomic_write_json
from coalora.methods import registry
from coalora.models import build_tokenizer
from coalora.quant import ModelQuantConfig
from coalora.stages.build import build_backbone
from coalora.stages.restore import load_run_config, resolve_checkpoint, restore

WRITERS: dict[str, Writer] = {
    "peft": write_peft, "merged": write_merged, "packed": write_packed, "gguf": write_gguf,
}  # fmt: skip
FORMATS = ("auto", *WRITERS)
DIRS = {"peft": "adapter"}  # default folder of a format's export (else the format's name)


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


def export_format(requested: str, method, method_cfg: DictConfig | None = None) -> str:
    """The format to write: ``auto`` is the method's first declared export format that the run
    (``method_cfg``, its ``method`` group) allows; a format the run's settings exclude (e.g. PEFT
    for ``method.init=lpq``) is one line saying which to use."""
    if requested not in FORMATS:
        raise ConfigError(f"format={requested!r} is not allowed; allowed: {list(FORMATS)}")
    formats = tuple(method.export_formats)
    if requested == "auto":
        if method_cfg is None:
            return formats[0]
        return next(f for f in formats if method.export_refusal(method_cfg, f) is None)
    if requested == "gguf":  # LoRA pairs on a quantized base: wherever a packed export is
        if "packed" in formats:
            return requested
        raise ConfigError(
            f"format=gguf writes a quantized base + LoRA adapter; method={method.name} has no "
            "such pair: use format=merged"
        )
    reason = None if method_cfg is None else method.export_refusal(method_cfg, requested)
    if reason is not None and requested in formats:
        raise ConfigError(reason)
    if requested not in formats:
        raise ConfigError(
            f"format={requested} is not available for method={method.name}; allowed: "
            f"{list(formats)} (QWHA's adapter is a sparse Walsh-Hadamard spectrum and LQ-LoRA's "
            "base is its own decomposition Q, not quant(W): they export format=merged)"
        )
    return requested


def export_configurations(
    cfg: DictConfig, run_cfg: DictConfig, lit, fmt: str
) -> tuple[dict[str, ModelQuantConfig | None], str]:
    """label → configuration to write, and how it was chosen (for the model card). ``packed``
    may take several budgets (``quant.budgets``); the other formats write one configuration."""
    method = lit.method
    budgets = list(cfg.quant.get("budgets") or []) if fmt in ("packed", "gguf") else []
    if budgets and not method.switches_configs:
        raise ConfigError(
            f"quant.budgets: method={method.name} was trained on one configuration and exports "
            "only that one; drop quant.budgets"
        )
    if budgets:
        for b in budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ConfigError(f"quant.budgets={budgets}: {b!r} is not a number (average bits)")
        allocs = lit.ctx.allocations(lit.model, budgets)
        return {f"{b:g}": a.config for b, a in allocs.items()}, f"budgets {budgets}"
    config = export_configuration(cfg, lit)
    if config is None and fmt in ("packed", "gguf"):
        raise ConfigError(
            f"format={fmt} needs a quantized base; method={method.name} ran on "
            f"quant={run_cfg.quant.mode}: use format=peft or format=merged"
        )
    if not method.switches_configs:
        source = "the trained configuration"
    elif cfg.quant.mode == "budget":
        source = f"budget {cfg.quant.budget}"
    else:
        source = str(cfg.quant.file)
    label = "fp" if config is None else f"{config.average_bits():.4g}"
    return {label: config}, source


def run(cfg: DictConfig) -> Path:
    requested = str(cfg.get("format", "auto"))
    if requested not in FORMATS:
        raise ConfigError(f"format={requested!r} is not allowed; allowed: {list(FORMATS)}")
    run_dir, _ = resolve_checkpoint(cfg.ckpt)
    run_cfg = load_run_config(run_dir)
    fmt = export_format(requested, registry_method(run_cfg), run_cfg.method)
    embedding = str(cfg.get("gguf_embedding") or "F16")
    if embedding not in EMBEDDING_TYPES:
        raise ConfigError(
            f"gguf_embedding={embedding!r} is not allowed; allowed: {list(EMBEDDING_TYPES)}"
        )
    if fmt == "gguf":
        check_gguf_run(run_cfg)  # before the restore: one line for an encoder or an NF run
    overwrite = bool(cfg.get("overwrite"))
    if cfg.out_dir:
        check_target(Path(cfg.out_dir), run_dir, overwrite)
    run_cfg, lit = restore(cfg.ckpt, cache_dir=cfg.paths.cache_dir)
    configs, source = export_configurations(cfg, run_cfg, lit, fmt)
    method = lit.method
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.paths.output_dir) / DIRS.get(fmt, fmt)
    job = ExportJob(
        model=lit.model,
        names=list(method.names),
        configs=configs,
        adapt=lambda config: method.adapt(lit.model, config),
        run_cfg=run_cfg,
        out_dir=out_dir,
        run_dir=run_dir,
        overwrite=overwrite,
        source=source,
        backbone=lambda: build_backbone(run_cfg),
        tokenizer=lambda: build_tokenizer(run_cfg.model),
        options={"gguf_embedding": embedding},
    )
    written = WRITERS[fmt](job)
    atomic_write_json(
        Path(cfg.paths.output_dir) / "export.json", {**written.record, "ckpt": str(cfg.ckpt)}
    )
    print(f"exported {method.name} {written.summary} to {out_dir}")
    return out_dir


def registry_method(run_cfg: DictConfig):
    """The method class a run was trained with (from the package registry, by name)."""
    cls = registry().get(run_cfg.method.get("name"))
    if cls is None:
        raise ConfigError(f"method.name={run_cfg.method.get('name')!r} is not a coalora method")
    return cls
