"""Training one adapter over a *set* of quantization configurations (Shared-LoRA, CoA-LoRA).

Each step draws ``configs_per_step`` configurations from the training set, switches the frozen
base to each through the dequantization cache (a lookup after first use — never a disk load, unlike
the reference code), runs the same batch, and averages the losses; one backward pass accumulates
the gradients of all k configurations. The draw is seeded by (seed, global step) so a resumed run
draws what the uninterrupted run would have.

One optimizer state: the reference Shared-LoRA kept separate Adam moments per configuration
(its optimizer was re-pointed at per-configuration model copies). Here all configurations update
the same parameters through one AdamW, so the moments see every configuration's gradients — the
adapter *is* shared, and its statistics should be too.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coalora.adapters import LoRALinear, adapter_modules
from coalora.errors import ConfigError
from coalora.methods.base import Method, SetupContext
from coalora.methods.pool import allocations, initial_pool
from coalora.quant import (
    DequantCache,
    ModelQuantConfig,
    QuantSpace,
    quantize_model,
    set_model_config,
)
from coalora.quant.model import model_weights

log = logging.getLogger(__name__)


class MultiConfigMethod(Method):
    """LoRA trained while the base configuration changes every step."""

    quant_modes = None  # the base follows the configuration set; quant.* gives space and cache

    def setup(self, model: nn.Module, ctx: SetupContext) -> None:
        q = ctx.cfg.quant
        self.names = ctx.names
        self.space = QuantSpace.from_cfg(q.space)
        self.seed = int(ctx.cfg.seed)
        weights = model_weights(model, self.names)
        self.numels = {n: w.numel() for n, w in weights.items()}
        cache_dir = Path(ctx.cache_dir) if ctx.cache_dir else None
        self.eval_set = self._eval_allocations(weights, cache_dir, ctx)
        self.train_set = self._training_set(weights, cache_dir, ctx)
        log.info(
            "%s: %d training configurations (%.2f-%.2f bits), eval budgets %s",
            self.name,
            len(self.train_set),
            min(c.average_bits() for c in self.train_set),
            max(c.average_bits() for c in self.train_set),
            list(self.eval_set),
        )
        self.cache = DequantCache(limit_mb=q.cache_limit_mb)
        self.config = next(iter(self.eval_set.values()))
        self.qlayers = quantize_model(model, self.names, self.config, self.cache)
        self.inject_adapters(model, ctx)
        self.loras: list[LoRALinear] = [adapter_modules(model, LoRALinear)[n] for n in self.names]
        self.freeze(model, ctx)

    # ------------------------------------------------------------------ configuration sets
    def _eval_allocations(self, weights, cache_dir, ctx) -> dict[str, ModelQuantConfig]:
        budgets = [float(b) for b in self.cfg.eval_budgets]
        lo, hi = self.space.min_bits(), self.space.max_bits()
        bad = [b for b in budgets if not lo <= b <= hi]
        if bad:
            raise ConfigError(
                f"method.eval_budgets={bad} outside the achievable average bits "
                f"[{lo:.4f}, {hi:.4f}] of quant.space"
            )
        allocs = allocations(
            weights, budgets, self.space, cache_dir, ctx.cfg.model.name, ctx.cfg.quant.solver
        )
        return {f"{b:g}": c for b, c in allocs.items()}

    def _training_set(self, weights, cache_dir, ctx) -> list[ModelQuantConfig]:
        if self.cfg.get("configset"):
            from coalora.search.configset import ConfigSet

            cs = ConfigSet.load(self.cfg.configset, expected_names=self.names, space=self.space)
            entries = [e for e in cs.entries if e.pareto] if self.cfg.get("pareto_only") else []
            entries = entries or cs.entries
            if not entries:
                raise ConfigError(
                    f"method.configset={self.cfg.configset} has no entries to train on"
                )
            return [cs.entry_config(e) for e in entries]
        p = self.cfg.pool
        return initial_pool(
            weights,
            self.space,
            p.start,
            p.stop,
            p.step,
            cache_dir,
            ctx.cfg.model.name,
            ctx.cfg.quant.solver,
        )

    def set_training_set(self, configs: list[ModelQuantConfig]) -> None:
        """Swap the configurations drawn from (the in-training search refresh uses this)."""
        if not configs:
            raise ConfigError("the new training configuration set is empty")
        self.train_set = list(configs)

    # ------------------------------------------------------------------ per-configuration switch
    def apply(self, model: nn.Module, config: ModelQuantConfig) -> None:
        """Put the base (and, for CoA-LoRA, the adapters) into ``config``."""
        set_model_config(model, config, self.qlayers)

    def draw(self, step: int) -> list[ModelQuantConfig]:
        k = int(self.cfg.configs_per_step)
        if k < 1:
            raise ConfigError(f"method.configs_per_step={k} must be >= 1")
        rng = random.Random(self.seed * 1_000_003 + step)
        return rng.sample(self.train_set, min(k, len(self.train_set)))

    def training_loss(self, lit, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        configs = self.draw(lit.global_step)
        total = 0.0
        for config in configs:
            self.apply(lit.model, config)
            total = total + lit.model(**batch).loss
        return total / len(configs)

    # ------------------------------------------------------------------ evaluation
    def eval_configs(self, ctx) -> dict[str, Any]:
        return dict(self.eval_set)

    def on_eval_config(self, model: nn.Module, label: str, config) -> None:
        self.apply(model, config)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "train_configs": len(self.train_set),
            "eval_avg_bits": {k: round(c.average_bits(), 4) for k, c in self.eval_set.items()},
            "cache": self.cache.stats() if self.cache is not None else None,
        }
