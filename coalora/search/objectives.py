"""The search's loss objective: task loss of a configuration on fixed calibration batches
(DESIGN §5; papers.md §1.5 f1; algorithms.md §4.7 "Scoring a candidate").

The reference code scored candidates with a fresh LoRA (B = 0), a freshly random head and a new
random batch per candidate (algorithms.md §7.2 item 5), so losses were neither comparable across
candidates nor related to the adapter being trained. Here every configuration of one search is
scored on the *same* batches with the *same* weights:

* with a trained CoA-LoRA / Shared-LoRA run (`from_checkpoint`): its adapters, mapper and head,
* without one (`fresh`): the quantized base with freshly built adapters (B = 0: identity) and a
  seeded fresh head — the paper's starting point, useful before anything is trained,
* in training (`coalora.lit.search_refresh`): the live model.

Scoring switches the base through the method's dequantization cache (``method.apply``: a lookup
after first use, plus the mapper call for CoA-LoRA); the model is never rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from coalora.errors import ConfigError
from coalora.quant import ModelQuantConfig

SWITCHING_METHODS = ("coalora", "shared_lora")


def require_switching(method: Any, where: str) -> None:
    """The objective needs a method that switches configurations (``apply``)."""
    from coalora.methods.multiconfig import MultiConfigMethod

    if not isinstance(method, MultiConfigMethod):
        name = getattr(method, "name", type(method).__name__)
        raise ConfigError(
            f"{where}: method {name} trains one fixed configuration; the search objective needs "
            f"one of {list(SWITCHING_METHODS)}"
        )


class CalibrationObjective:
    """``objective(config) -> loss``: mean task loss over fixed batches, eval mode, no grad.

    ``seconds`` records the wall time of every call (base switch + mapper + forwards).
    """

    def __init__(self, model: nn.Module, method: Any, batches: Sequence[dict[str, torch.Tensor]]):
        if not batches:
            raise ConfigError("the calibration objective needs at least one batch")
        require_switching(method, "search objective")
        self.model = model
        self.method = method
        device = next(model.parameters()).device
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self.seconds: list[float] = []

    @property
    def names(self) -> list[str]:
        return list(self.method.names)

    @property
    def numels(self) -> dict[str, int]:
        return dict(self.method.numels)

    @torch.no_grad()
    def __call__(self, config: ModelQuantConfig) -> float:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            self.method.apply(self.model, config)
            total = 0.0
            for batch in self.batches:
                total += float(self.model(**batch).loss)
        finally:
            self.model.train(was_training)
        self.seconds.append(time.perf_counter() - t0)
        return total / len(self.batches)

    def release(self) -> None:
        """Drop the per-configuration adapter state the last score left (CoA-LoRA's mixing)."""
        after = getattr(self.method, "after_eval", None)
        if after is not None:
            after(self.model)

    # ------------------------------------------------------------------ builders
    @classmethod
    def fresh(cls, cfg: DictConfig) -> tuple[CalibrationObjective, Any]:
        """Quantized base + fresh adapters (B = 0) + seeded fresh head, built from ``cfg`` (the
        search config: model, task, quant.space, method). Returns (objective, datamodule)."""
        from coalora.stages.train import prepare

        dm, model, method, ctx = prepare(cfg)
        require_switching(method, f"method={cfg.method.name}")
        method.setup(model, ctx)
        batches = calibration_batches(dm, cfg)
        return cls(model, method, batches), dm

    @classmethod
    def from_checkpoint(cls, cfg: DictConfig, ckpt: str | Path) -> tuple[CalibrationObjective, Any]:
        """The trained adapter (+ mapper) and head of the run at ``ckpt``; the calibration batches
        come from the search config's data (same task, validated by the stage)."""
        from coalora.models import build_tokenizer
        from coalora.stages.restore import restore
        from coalora.stages.train import build_datamodule

        _, lit = restore(ckpt, cache_dir=cfg.paths.cache_dir, with_data=False)
        require_switching(lit.method, f"ckpt={ckpt}")
        dm = build_datamodule(cfg, build_tokenizer(cfg.model))
        return cls(lit.model, lit.method, calibration_batches(dm, cfg)), dm


def calibration_batches(dm: Any, cfg: DictConfig) -> list[dict[str, torch.Tensor]]:
    """``search.calib_batches`` fixed training batches drawn with the run's seed."""
    s = cfg.search
    return dm.calibration_batches(
        int(s.calib_batches), seed=int(cfg.seed), batch_size=int(s.calib_batch_size)
    )
