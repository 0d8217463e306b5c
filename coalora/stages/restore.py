"""Rebuild a trained run (model + method + trainable weights) from its run directory."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.lit import CoaloraModule
from coalora.methods import SetupContext, build_method
from coalora.models import build_model, target_names


def resolve_checkpoint(ckpt: str | Path) -> tuple[Path, Path]:
    """``ckpt`` is a run directory or a ``.ckpt`` inside one -> (run_dir, checkpoint file)."""
    p = Path(ckpt)
    if p.is_dir():
        f = p / "checkpoints" / "last.ckpt"
        run_dir = p
    else:
        f = p
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if not f.is_file():
        raise ConfigError(f"ckpt={ckpt}: no checkpoint at {f}")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"ckpt={ckpt}: no config.yaml in the run directory {run_dir}")
    return run_dir, f


def restore(
    ckpt: str | Path, cache_dir: str | Path | None = None, with_data: bool = False
) -> tuple[DictConfig, CoaloraModule]:
    """The run's resolved config and its LightningModule with the trained parameters loaded."""
    run_dir, ckpt_file = resolve_checkpoint(ckpt)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    method = build_method(cfg)
    model = build_model(cfg.model, num_labels=cfg.task.num_labels, seed=cfg.seed)
    names = target_names(model, list(cfg.model.target_modules))
    dm = None
    if with_data:
        from coalora.models import build_tokenizer
        from coalora.stages.train import build_datamodule

        dm = build_datamodule(cfg, build_tokenizer(cfg.model))
    ctx = SetupContext(
        cfg=cfg,
        names=names,
        datamodule=dm,
        run_dir=run_dir,
        cache_dir=Path(cache_dir or cfg.paths.cache_dir),
    )
    method.setup(model, ctx)
    lit = CoaloraModule(model, method, cfg.task, cfg.optim, ctx)
    state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    missing = set(lit.trainable_state_dict()) - set(state["state_dict"])
    if missing:
        raise ConfigError(f"ckpt={ckpt_file} lacks trained parameters: {sorted(missing)[:5]}...")
    lit.load_state_dict(state["state_dict"], strict=False)
    lit.method.load_extra_state(state.get("coalora", {}))
    lit.eval()
    return cfg, lit
