"""Run assembly: everything that turns a composed config into the parts of a run — run directory,
tokenizer, datamodule, model, method (+ its context), LightningModule and Trainer. ``train``,
``restore``, ``search`` and ``evaluate`` all build through here (docs/architecture.md).

Order matters for "nothing half-written": :func:`check_run` validates every cheap thing (method,
quant settings, data and optimisation keys) before any model or data is loaded, and nothing here
writes to the run directory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from coalora.data import GlueDataModule
from coalora.data.lm import LMDataModule, check_context_length
from coalora.errors import ConfigError
from coalora.lit import FinetuneModule
from coalora.lit.module import SCHEDULES
from coalora.lit.search_refresh import SearchRefreshCallback
from coalora.methods import CONF, Method, MethodContext, build_method
from coalora.models import (
    build_causal_lm,
    build_model,
    build_tokenizer,
    check_model_task,
    find_targets,
    task_kind,
)
from coalora.quant import QuantSettings
from coalora.quant.record import read_record
from coalora.stages.common import AtomicCheckpointIO, instantiate_dict


def run_dir_of(cfg: DictConfig) -> Path:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # composed without Hydra's runtime (tests): paths.output_dir unresolvable
        return Path(cfg.paths.log_dir) / "run"


# ---------------------------------------------------------------- validation (nothing built)
def _int(cfg: Any, key: str, minimum: int, where: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}.{key}={v!r} must be an integer >= {minimum}")
    return v


def _number(cfg: Any, key: str, where: str, positive: bool = False) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and not v > 0) or v < 0:
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{where}.{key}={v!r} must be a number {bound}")
    return float(v)


def check_data(cfg: DictConfig) -> None:
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r} must be an integer")
    d = cfg.data
    _int(d, "batch_size", 1, "data")
    _int(d, "eval_batch_size", 1, "data")
    _int(d, "num_workers", 0, "data")


def check_optim(cfg: DictConfig) -> None:
    o = cfg.optim
    if o.get("schedule") not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule={o.get('schedule')!r} is not allowed; allowed: {list(SCHEDULES)}"
        )
    _number(o, "lr", "optim", positive=True)
    _number(o, "weight_decay", "optim")
    ratio = _number(o, "warmup_ratio", "optim")
    if ratio >= 1:
        raise ConfigError(f"optim.warmup_ratio={ratio} must be in [0, 1)")
    if o.get("warmup_steps") is not None:
        _int(o, "warmup_steps", 0, "optim")


def check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    steps, epochs = t.get("max_steps"), t.get("max_epochs")
    for key, v in (("max_steps", steps), ("max_epochs", epochs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < -1 or v == 0):
            raise ConfigError(f"trainer.{key}={v!r} must be a positive integer or -1 (no limit)")
    if (steps is None or steps == -1) and (epochs is None or epochs == -1):
        raise ConfigError(
            "trainer.max_steps and trainer.max_epochs are both unlimited (-1): set one of them"
        )
    v = t.get("val_check_interval")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise ConfigError(
            f"trainer.val_check_interval={v!r} must be a step count >= 1 or an epoch fraction in "
            "(0, 1]"
        )
    if isinstance(v, float) and v > 1:
        raise ConfigError(f"trainer.val_check_interval={v!r}: a fraction of an epoch must be <= 1")


def check_run(cfg: DictConfig) -> tuple[Method, QuantSettings]:
    """Validate the method, its quant pairing and the cheap run keys; build nothing."""
    check_model_task(cfg.model, cfg.task)
    quant = QuantSettings.from_cfg(cfg.quant)
    method = build_method(cfg.method)
    method.check(quant)
    check_data(cfg)
    if "optim" in cfg:
        check_optim(cfg)
    if "trainer" in cfg:
        check_trainer(cfg)
    return method, quant


# ---------------------------------------------------------------- builders
def build_backbone(cfg: DictConfig):
    """The transformers model the run fine-tunes: a causal LM for ``task.kind=causal_lm``
    (docs/decoder_lms.md), else a sequence classifier with the task's labels."""
    if task_kind(cfg.task) == "causal_lm":
        return build_causal_lm(cfg.model, seed=cfg.seed)
    return build_model(cfg.model, num_labels=cfg.task.num_labels, seed=cfg.seed)


def build_datamodule(cfg: DictConfig, tokenizer):
    """GLUE TSV/hub data, or packed token blocks for ``task.kind=causal_lm``; set up at once so
    missing data fails early with one clear line."""
    common = dict(
        task=cfg.task,
        tokenizer=tokenizer,
        data_dir=cfg.paths.data_dir,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        allow_hub=cfg.data.allow_hub,
    )
    if task_kind(cfg.task) == "causal_lm":
        dm = LMDataModule(**common)
    else:
        dm = GlueDataModule(**common, group_by_length=cfg.data.group_by_length)
    dm.setup("fit")
    return dm


def lazy_calibration(cfg: DictConfig):
    """``calibration_batches`` of the run's datamodule, built on first use (a restored run needs
    its data only to recompute a sensitivity it did not find cached)."""
    built: list = []

    def calibration(n: int, seed: int = 0, batch_size: int | None = None):
        if not built:
            built.append(build_datamodule(cfg, build_tokenizer(cfg.model)))
        return built[0].calibration_batches(n, seed=seed, batch_size=batch_size)

    return calibration


def method_context(
    cfg: DictConfig,
    model,
    quant: QuantSettings,
    datamodule: Any = None,
    run_dir: Path | None = None,
    cache_dir: str | Path | None = None,
    record_dir: Path | None = None,
) -> MethodContext:
    """What a method may use: target names and layer structure, seed, data (the datamodule's
    calibration batches, else the run's data built on first use), cache, a full-precision
    backbone builder, and the configurations recorded in ``record_dir`` (``allocations.json``,
    ``coalora.quant.record``) when it holds a record that matches the run."""
    targets = find_targets(model, list(cfg.model.target_modules))  # from the module tree
    names = [t.name for t in targets]
    record = read_record(
        record_dir, quant, names, str(cfg.model.name), str(cfg.task.name), int(cfg.seed)
    )
    return MethodContext(
        names=names,
        quant=quant,
        seed=int(cfg.seed),
        model_name=str(cfg.model.name),
        task_name=str(cfg.task.name),
        positions=[t.block for t in targets],
        module_types=[t.module_type for t in targets],
        num_layers=int(cfg.model.get("num_layers", 0) or 0),
        head_modules=list(cfg.model.get("head_modules", ["classifier", "score"])),
        batch_size=int(cfg.data.batch_size) if "data" in cfg else 32,
        calibration=lazy_calibration(cfg) if datamodule is None else datamodule.calibration_batches,
        cache_dir=Path(cache_dir or cfg.paths.cache_dir),
        run_dir=run_dir,
        fp_model=lambda: build_backbone(cfg),
        record=record,
    )


def prepare(cfg: DictConfig, with_data: bool = True) -> tuple[Any, Any, Method, MethodContext]:
    """Validate and build (datamodule, model, method, ctx); the method is not set up yet.
    Writes nothing. A resumed run (``ckpt_path``) reads the configurations its run recorded."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method, quant = check_run(cfg)
    dm = build_datamodule(cfg, build_tokenizer(cfg.model)) if with_data else None
    model = build_backbone(cfg)
    if task_kind(cfg.task) == "causal_lm":
        check_context_length(cfg.task, getattr(model.config, "max_position_embeddings", None))
    resumed = cfg.get("ckpt_path")
    record_dir = checkpoint_run_dir(resumed) if resumed else None
    ctx = method_context(cfg, model, quant, dm, run_dir_of(cfg), record_dir=record_dir)
    return dm, model, method, ctx


def compose_train(overrides: Sequence[str], cache_dir: Path, out_dir: Path) -> DictConfig:
    """``train.py``'s config (conf/train.yaml + ``overrides``, Hydra's compose API) for a script
    that builds a run without training it: caches in ``cache_dir``, no logger or callbacks,
    outputs in ``out_dir``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.cache_dir={cache_dir}", "logger=none",
                                          "callbacks=none", *overrides])  # fmt: skip
    cfg.paths.output_dir = str(out_dir)
    return cfg


def build_untrained(
    overrides: Sequence[str], cache_dir: Path, out_dir: Path, state: dict | None = None
) -> tuple[Any, Any, Method, float]:
    """(datamodule, model, method, setup seconds) of the run ``overrides`` describe
    (:func:`compose_train`), its method set up (timed) and not trained. ``state`` (a backbone
    state dict, e.g. a fine-tuned model's merged weights and head) replaces the built weights
    before the setup."""
    cfg = compose_train(overrides, cache_dir, out_dir)
    dm, model, method, ctx = prepare(cfg)
    if state is not None:
        model.load_state_dict(state)
    t0 = time.perf_counter()
    method.setup(model, ctx)
    return dm, model, method, time.perf_counter() - t0


def checkpoint_run_dir(ckpt: str | Path) -> Path:
    """The run directory of a checkpoint (``<run>/checkpoints/x.ckpt``) or of a run directory."""
    p = Path(ckpt)
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def build_module(cfg: DictConfig, model, method: Method, ctx: MethodContext) -> FinetuneModule:
    return FinetuneModule(model, method, cfg.task, cfg.optim, ctx)


def build_trainer(cfg: DictConfig) -> L.Trainer:
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    refresh_every = cfg.method.get("search_refresh_every_n_epochs")
    if refresh_every:  # paper mode: Pareto search between epochs (coalora.lit.search_refresh)
        callbacks.append(SearchRefreshCallback(refresh_every, cfg.method.search_refresh))
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        _convert_="partial",
    )
