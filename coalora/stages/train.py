"""``python train.py``: build data, model and method from the config; fit; evaluate; write results.

Order matters for "no half-written artifacts": everything that can fail on bad input (method /
quant pairing, data files, model) is checked before the run directory gets any file of ours.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from coalora.errors import CoaloraError, ConfigError
from coalora.io import atomic_write_json
from coalora.lit.resume import LastCheckpoint
from coalora.quant.record import RECORD_FILE
from coalora.report.curves import plot_run_curves
from coalora.stages.build import build_module, build_trainer, prepare
from coalora.stages.common import (
    finish_wandb,
    log_run_to_loggers,
    record_configurations,
    run_dir_lock,
    set_env_defaults,
    write_run_info,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    set_env_defaults()
    torch.set_float32_matmul_precision("high")
    log.info("run directory: %s", cfg.paths.output_dir)
    dm, model, method, ctx = prepare(cfg)  # bad input fails here, before any file of ours
    with run_dir_lock(ctx.run_dir, "train"):
        return _train(cfg, dm, model, method, ctx)


def _train(cfg: DictConfig, dm, model, method, ctx) -> dict[str, Any]:
    run_dir = ctx.run_dir
    check_fresh_run_dir(run_dir, cfg.get("ckpt_path"))
    t0 = time.perf_counter()
    method.setup(model, ctx)
    model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as found
    setup_s = time.perf_counter() - t0
    lit = build_module(cfg, model, method, ctx)
    n_train = sum(p.numel() for p in lit.parameters() if p.requires_grad)
    write_run_info(
        cfg, run_dir, "train", {"trainable_parameters": n_train, "target_layers": len(ctx.names)}
    )
    record_configurations(cfg, run_dir, method, ctx)  # allocations.json: what evaluate/export read
    trainer = build_trainer(cfg)
    try:
        t1 = time.perf_counter()
        try:
            trainer.fit(lit, datamodule=dm, ckpt_path=cfg.ckpt_path)
        except SIGTERMException:  # Lightning's is a SystemExit(0): schedulers would see success
            raise Interrupted(stop_on_sigterm(trainer, run_dir)) from None
        fit_s = time.perf_counter() - t1
        if trainer.received_sigterm:
            raise Interrupted(stop_on_sigterm(trainer, run_dir))
        metrics = dict(lit.last_val)
        if cfg.final_eval and lit.last_val_step != trainer.global_step:
            trainer.validate(lit, datamodule=dm, verbose=False)
            metrics = dict(lit.last_val)
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
            plot_run_curves(run_dir)
            log_run_to_loggers(trainer, cfg, results, run_dir)
            print_summary(results, run_dir)
    finally:
        finish_wandb()
    return results


class Interrupted(CoaloraError):
    """The run was stopped by a signal; a resumable checkpoint was written."""

    exit_code = 143  # 128 + SIGTERM, what schedulers expect from a terminated job


def check_fresh_run_dir(run_dir, ckpt_path) -> None:
    """A new run never writes into another run's directory (its last.ckpt and results would mix
    with ours); resuming (``ckpt_path``) continues the run that owns it."""
    if ckpt_path:
        if not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return
    files = ("run_info.json", "results.json", "checkpoints", RECORD_FILE)
    taken = [f for f in files if (run_dir / f).exists()]
    if taken:
        raise ConfigError(
            f"the run directory {run_dir} already holds another run ({', '.join(taken)}); "
            "choose a new hydra.run.dir, or resume it with ckpt_path=<run>/checkpoints/last.ckpt"
        )


def stop_on_sigterm(trainer, run_dir) -> str:
    """Say where the resumable last.ckpt is (``LastCheckpoint`` wrote it at the step reached;
    without that callback it is written here)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    if saved:
        ckpt = Path(saved[0].path)
    if not saved or saved[0].saved_step != trainer.global_step:
        trainer.save_checkpoint(str(ckpt), weights_only=False)
    return (
        f"stopped by SIGTERM at step {trainer.global_step}; resume with ckpt_path={ckpt} "
        "(no results were written)"
    )


def print_summary(results: dict[str, Any], run_dir: Path) -> None:
    """The final metrics and where the run's files are (the training time is on the progress
    callback's ``training done`` line)."""
    m = results["metrics"]
    lines = [
        f"{results['method']} on {results['model']}/{results['task']} after "
        f"{results['global_step']} steps; run directory: {run_dir}"
    ]
    if "avg_bits" in results:
        lines.append(f"  trained configuration: {results['avg_bits']:.3f} average bits")
    for k, v in m.items():
        lines.append(f"  {k:<20} {v:.4f}")
    log.info("\n".join(lines))  # console and train.log
