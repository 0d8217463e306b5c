"""Training one adapter over a *set* of quantization configurations (Shared-LoRA, CoA-LoRA).

Each step draws ``configs_per_step`` configurations from the training set, switches the frozen
base to each through the dequantization cache (a lookup after first use, never a disk load),
runs the same batch, and averages the losses; one backward pass accumulates the gradients of all
k configurations. The draw is seeded by (seed, global step) so a resumed run draws what the
uninterrupted run would have.

One optimizer state: all configurations update the same parameters through one AdamW, so the
moments see every configuration's gradients — the adapter *is* shared, and its statistics too.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from coalora.adapters import LoRALinear, adapter_modules
from coalora.errors import ConfigError
from coalora.methods.base import Batch, Method, MethodContext
from coalora.quant import ModelQuantConfig, QuantSettings, quantize_model, set_model_config
from coalora.quant.model import model_weights
from coalora.search.configset import ConfigSet
from coalora.search.pool import PoolGrid, initial_pool

log = logging.getLogger(__name__)

# What the adapter is trained on: `pool` -- the configuration set (method.configset, else the
# allocations on method.pool's grid); `eval_budgets` -- only the allocations at
# method.eval_budgets, the Shared-LoRA baseline as the CoA-LoRA paper trains it
# (arXiv 2509.25214, baselines: one LoRA over the four budget models; docs/methods.md).
TRAIN_ON = ("pool", "eval_budgets")


class MultiConfigMethod(Method):
    """LoRA trained while the base configuration changes every step."""

    quant_modes = None  # the base follows the configuration set; quant.* gives space and cache
    switches_configs = True

    def check(self, quant: QuantSettings) -> None:
        super().check(quant)
        c = self.cfg
        k = c.get("configs_per_step")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"method.configs_per_step={k!r} must be an integer >= 1")
        budgets = list(c.get("eval_budgets") or [])
        if not budgets:
            raise ConfigError("method.eval_budgets must list at least one budget (average bits)")
        bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, float))]
        if bad:
            raise ConfigError(f"method.eval_budgets={bad} must be numbers (average bits)")
        lo, hi = quant.space.min_bits(), quant.space.max_bits()
        outside = [b for b in budgets if not lo <= float(b) <= hi]
        if outside:
            raise ConfigError(
                f"method.eval_budgets={outside} outside the achievable average bits "
                f"[{lo:.4f}, {hi:.4f}] of quant.space"
            )
        train_on = c.get("train_on", "pool")
        if train_on not in TRAIN_ON:
            raise ConfigError(f"method.train_on={train_on!r}; allowed: {', '.join(TRAIN_ON)}")
        if train_on == "eval_budgets" and c.get("configset"):
            raise ConfigError(
                "method.train_on=eval_budgets trains on the evaluation budgets' allocations; "
                f"it cannot be combined with method.configset={c.configset}"
            )
        if train_on == "pool" and not c.get("configset"):
            PoolGrid.from_cfg(c.pool, "method.pool").budgets(quant.space, "method.pool")

    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        q = ctx.quant
        self.names = list(ctx.names)
        self.space = q.space
        self.seed = int(ctx.seed)
        self.solver = q.solver
        weights = model_weights(model, self.names)
        self.numels = {n: w.numel() for n, w in weights.items()}
        self.eval_set = self._eval_allocations(model, ctx)
        self.train_set = self._training_set(model, weights, ctx)
        log.info(
            "%s: %d training configurations (%.2f-%.2f bits), eval budgets %s",
            self.name,
            len(self.train_set),
            min(c.average_bits() for c in self.train_set),
            max(c.average_bits() for c in self.train_set),
            list(self.eval_set),
        )
        self.cache = q.build_cache()
        self.config = next(iter(self.eval_set.values()))
        self.qlayers = quantize_model(model, self.names, self.config, self.cache)
        self.inject_adapters(model, ctx)
        self.loras: list[LoRALinear] = [adapter_modules(model, LoRALinear)[n] for n in self.names]
        self.freeze(model, ctx)

    # ------------------------------------------------------------------ configuration sets
    def _eval_allocations(
        self, model: nn.Module, ctx: MethodContext
    ) -> dict[str, ModelQuantConfig]:
        """The run's allocation at each evaluation budget (recorded, else with its settings)."""
        self.solved = ctx.allocations(model, self.cfg.eval_budgets)
        return {f"{b:g}": a.config for b, a in self.solved.items()}

    def _training_set(
        self, model: nn.Module, weights, ctx: MethodContext
    ) -> list[ModelQuantConfig]:
        if ctx.record is not None and ctx.record.train_set:  # restored / resumed: as recorded
            return list(ctx.record.train_set)
        if self.cfg.get("train_on", "pool") == "eval_budgets":
            return list(self.eval_set.values())
        if self.cfg.get("configset"):
            cs = ConfigSet.load(self.cfg.configset, expected_names=self.names, space=self.space)
            wrong = {
                n: (cs.numels[n], self.numels[n])
                for n in self.names
                if cs.numels.get(n) != self.numels[n]
            }
            if wrong:
                first = dict(list(wrong.items())[:3])
                raise ConfigError(
                    f"method.configset={self.cfg.configset}: layer sizes differ from this model's "
                    f"(file, model), e.g. {first}: it was written for another model"
                )
            entries = [e for e in cs.entries if e.pareto] if self.cfg.get("pareto_only") else []
            entries = entries or cs.entries
            if not entries:
                raise ConfigError(
                    f"method.configset={self.cfg.configset} has no entries to train on"
                )
            return [cs.entry_config(e) for e in entries]
        grid = PoolGrid.from_cfg(self.cfg.pool, "method.pool")
        configs, _ = initial_pool(
            weights, self.space, grid, ctx.table_cache_dir, ctx.model_name, self.solver,
            sensitivity=ctx.sensitivity(model),
        )  # fmt: skip
        return configs

    def train_configs(self) -> list[ModelQuantConfig]:
        return list(self.train_set)

    def set_training_set(self, configs: list[ModelQuantConfig]) -> None:
        """Swap the configurations drawn from (the in-training search refresh uses this)."""
        if not configs:
            raise ConfigError("the new training configuration set is empty")
        self.train_set = list(configs)

    # ------------------------------------------------------------------ per-configuration switch
    def switch_base(self, model: nn.Module, config: ModelQuantConfig) -> None:
        set_model_config(model, config, self.qlayers)

    @contextlib.contextmanager
    def configured(self, model: nn.Module, config: ModelQuantConfig | None) -> Iterator[nn.Module]:
        if config is None:
            raise ConfigError(f"method={self.name} needs a configuration to run in")
        self.switch_base(model, config)
        yield model

    def adapt(self, model: nn.Module, config: ModelQuantConfig | None) -> nn.Module:
        if config is None:
            raise ConfigError(f"method={self.name} needs a configuration to adapt to")
        config.validate_names(self.names)
        self.switch_base(model, config)
        return model

    def draw(self, step: int) -> list[ModelQuantConfig]:
        k = int(self.cfg.configs_per_step)
        rng = random.Random(self.seed * 1_000_003 + step)
        return rng.sample(self.train_set, min(k, len(self.train_set)))

    def training_loss(self, model: nn.Module, batch: Batch, step: int) -> Tensor:
        configs = self.draw(step)
        total = 0.0
        for config in configs:
            with self.configured(model, config):
                total = total + model(**batch).loss
        return total / len(configs)

    # ------------------------------------------------------------------ evaluation
    def eval_configs(self) -> dict[str, Any]:
        return dict(self.eval_set)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "train_configs": len(self.train_set),
            "eval_avg_bits": {k: round(c.average_bits(), 4) for k, c in self.eval_set.items()},
            "cache": self.cache.stats() if self.cache is not None else None,
        }
