"""``python train.py``: build data, model and method from the config; fit; evaluate; write results.

Order matters for "no half-written artifacts": everything that can fail on bad input (method /
quant pairing, data files, model) is checked before the run directory gets any file of ours.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from coalora.data import GlueDataModule
from coalora.io import atomic_write_json
from coalora.lit import CoaloraModule
from coalora.methods import SetupContext, build_method
from coalora.models import build_model, build_tokenizer, target_names
from coalora.stages.common import (
    AtomicCheckpointIO,
    finish_wandb,
    instantiate_dict,
    set_env_defaults,
    write_run_info,
)

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # composed without Hydra's runtime (tests): paths.output_dir unresolvable
        return Path(cfg.paths.log_dir) / "run"


def build_datamodule(cfg: DictConfig, tokenizer) -> GlueDataModule:
    dm = GlueDataModule(
        task=cfg.task,
        tokenizer=tokenizer,
        data_dir=cfg.paths.data_dir,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        group_by_length=cfg.data.group_by_length,
        allow_hub=cfg.data.allow_hub,
    )
    dm.setup("fit")  # fails early (one clear line) when the task's data cannot be found
    return dm


def prepare(cfg: DictConfig) -> tuple[Any, ...]:
    """Validate and build (datamodule, model, method, ctx). Writes nothing."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method = build_method(cfg)
    method.check(cfg)
    tokenizer = build_tokenizer(cfg.model)
    dm = build_datamodule(cfg, tokenizer)
    model = build_model(cfg.model, num_labels=cfg.task.num_labels, seed=cfg.seed)
    names = target_names(model, list(cfg.model.target_modules))
    ctx = SetupContext(
        cfg=cfg,
        names=names,
        datamodule=dm,
        run_dir=run_dir_of(cfg),
        cache_dir=Path(cfg.paths.cache_dir),
    )
    return dm, model, method, ctx


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    refresh_every = cfg.method.get("search_refresh_every_n_epochs")
    if refresh_every:  # paper mode: Pareto search between epochs (coalora.lit.search_refresh)
        from coalora.lit.search_refresh import SearchRefreshCallback

        callbacks.append(SearchRefreshCallback(refresh_every, cfg.method.search_refresh))
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        _convert_="partial",
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    set_env_defaults()
    torch.set_float32_matmul_precision("high")
    dm, model, method, ctx = prepare(cfg)
    run_dir = ctx.run_dir
    t0 = time.perf_counter()
    method.setup(model, ctx)
    model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found
    setup_s = time.perf_counter() - t0
    lit = CoaloraModule(model, method, cfg.task, cfg.optim, ctx)
    n_train = sum(p.numel() for p in lit.parameters() if p.requires_grad)
    write_run_info(
        cfg, run_dir, "train", {"trainable_parameters": n_train, "target_layers": len(ctx.names)}
    )
    trainer = build_trainer(cfg, run_dir)
    try:
        t1 = time.perf_counter()
        trainer.fit(lit, datamodule=dm, ckpt_path=cfg.ckpt_path)
        fit_s = time.perf_counter() - t1
        metrics = dict(lit.last_val)
        if cfg.final_eval and lit.last_val_step != trainer.global_step:
            trainer.validate(lit, datamodule=dm, verbose=False)
            metrics = dict(lit.last_val)
    finally:
        finish_wandb()
    results = {
        **method.describe(),
        "model": cfg.model.name,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "global_step": trainer.global_step,
        "setup_seconds": round(setup_s, 2),
        "fit_seconds": round(fit_s, 2),
        "seconds_per_step": round(fit_s / max(1, trainer.global_step), 4),
        "trainable_parameters": n_train,
        "metrics": metrics,
        "config": OmegaConf.to_container(cfg.method, resolve=True),
    }
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "results.json", results)
        from coalora.report.curves import plot_run_curves

        plot_run_curves(run_dir)
        print_summary(results)
    return results


def print_summary(results: dict[str, Any]) -> None:
    m = results["metrics"]
    lines = [
        f"{results['method']} on {results['model']}/{results['task']}: "
        f"{results['global_step']} steps in {results['fit_seconds']:.0f}s"
    ]
    if "avg_bits" in results:
        lines.append(f"  trained configuration: {results['avg_bits']:.3f} average bits")
    for k, v in m.items():
        lines.append(f"  {k:<20} {v:.4f}")
    print("\n".join(lines), flush=True)
