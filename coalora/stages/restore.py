"""Rebuild a trained run (model + method + trainable weights) from its run directory.

Nothing read from a run directory is executed: the method class comes from the package's own
registry by ``method.name`` (a ``_target_`` in the run's ``config.yaml`` is never imported), the
config is plain YAML and the checkpoint is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.lit import FinetuneModule
from coalora.models import build_tokenizer
from coalora.stages.build import (
    build_backbone,
    build_datamodule,
    build_module,
    check_run,
    method_context,
)
from coalora.stages.common import read_checkpoint

log = logging.getLogger(__name__)


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


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's resolved ``config.yaml`` (one line naming the file when it is not valid YAML)."""
    path = Path(run_dir) / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a valid run config ({first})") from None
    if not isinstance(cfg, DictConfig) or "method" not in cfg or "model" not in cfg:
        raise ConfigError(f"{path}: not a coalora run config (no method/model section)")
    return cfg


@dataclass
class RestoredRun:
    cfg: DictConfig
    lit: FinetuneModule
    datamodule: Any = None
    run_dir: Path | None = None
    checkpoint: Path | None = None
    step: int | None = None  # the global step the checkpoint was written at


def load_checkpoint_state(ckpt_file: Path) -> dict[str, Any]:
    """A checkpoint's tensors, loaded without executing anything (``weights_only=True``)."""
    state = read_checkpoint(ckpt_file, str(ckpt_file))
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ConfigError(f"{ckpt_file}: not a coalora checkpoint (no state_dict)")
    return state


def load_run(
    ckpt: str | Path,
    cache_dir: str | Path | None = None,
    with_data: bool = False,
    max_eval_samples: int | None = None,
) -> RestoredRun:
    """The run at ``ckpt`` rebuilt with its trained parameters (and its data when asked;
    ``max_eval_samples`` bounds the dev split it builds)."""
    run_dir, ckpt_file = resolve_checkpoint(ckpt)
    cfg = load_run_config(run_dir)
    if max_eval_samples is not None:
        cfg.task.max_eval_samples = int(max_eval_samples)
    state = load_checkpoint_state(ckpt_file)
    tag = state.get("coalora_method")
    if tag is not None and tag != cfg.method.get("name"):
        raise ConfigError(
            f"{ckpt_file} was written by method={tag}, but the run's config.yaml says "
            f"method={cfg.method.get('name')}"
        )
    method, quant = check_run(cfg)
    model = build_backbone(cfg)
    dm = build_datamodule(cfg, build_tokenizer(cfg.model)) if with_data else None
    # the configurations the run recorded (allocations.json) are read, never recomputed
    ctx = method_context(
        cfg, model, quant, dm, run_dir, cache_dir or cfg.paths.cache_dir, record_dir=run_dir
    )
    method.setup(model, ctx)
    lit = build_module(cfg, model, method, ctx)
    expected = lit.trainable_state_dict()
    missing = set(expected) - set(state["state_dict"])
    if missing:
        raise ConfigError(f"ckpt={ckpt_file} lacks trained parameters: {sorted(missing)[:5]}...")
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state["state_dict"].items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ConfigError(
            f"{ckpt_file}: {len(wrong)} tensors do not match the run's config.yaml (checkpoint "
            f"vs model), e.g. {wrong[0]}: was method.rank or the model changed?"
        )
    lit.load_state_dict(state["state_dict"], strict=False)
    lit.method.load_extra_state(state.get("coalora", {}))
    lit.eval()
    step = state.get("global_step")
    log.info("restored %s (step %s)", ckpt_file, step)
    return RestoredRun(cfg, lit, dm, run_dir, ckpt_file, step)


def restore(
    ckpt: str | Path, cache_dir: str | Path | None = None, with_data: bool = False
) -> tuple[DictConfig, FinetuneModule]:
    """The run's resolved config and its LightningModule with the trained parameters loaded."""
    run = load_run(ckpt, cache_dir, with_data)
    return run.cfg, run.lit
