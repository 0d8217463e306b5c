"""Training one adapter over a *set* of quantization configurations (Shared-LoRA, CoA-LoRA).

Each step draws ``configs_per_step`` configurations from the training set, switches the frozen
base to each through the dequantization cache (a lookup after first use, never a disk load),
runs the same batch, and averages the losses; one backward pass accumulates the gradients of all
k configurations. The draw is seeded by (seed, global step) so a resumed run draws what the
uninterrupted run would have.

One optimizer state: all configurations update the same parameters through one AdamW, so the
moments see every configuration's gradients — the adapter *is* shared, and its statistics too.

``method.init`` (:mod:`coalora.methods.shared_init`): ``zero`` starts at ΔW = 0; ``lpq`` / ``lq``
start the adapter at a low-rank part ``L`` of the weights and make every configuration's base
``quantize_c(W − L)`` (docs/methods.md, "Quantization-aware initialisation (method.init)").
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig
from torch import Tensor, nn

from coalora.adapters import LoRALinear, adapter_modules
from coalora.errors import ConfigError
from coalora.methods.base import Batch, Method, MethodContext
from coalora.methods.shared_init import (
    InitSettings,
    SharedInit,
    fit_shared_init,
    fitting_configs,
    init_loras,
    install_residual_bases,
)
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

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.init = InitSettings.from_cfg(cfg)
        self.shared_init: SharedInit | None = None  # the fitted L (method.init=lpq|lq)

    @classmethod
    def export_refusal(cls, cfg: DictConfig, fmt: str) -> str | None:
        """A PEFT export pairs the adapter with quant_config.json applied to ``W``; a run whose
        bases quantize ``W − L`` would count ``L`` twice there."""
        init = cfg.get("init", "zero")
        if fmt == "peft" and init != "zero":
            return (
                f"format=peft cannot serve a method.init={init} run: its adapter starts at a "
                "low-rank part L of the weights and its bases quantize W − L, while a PEFT "
                "export's base (load_quantized_base) quantizes W; use format=packed or "
                "format=merged"
            )
        return None

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
        if self.init.active:  # before quantizing: every configuration quantizes W − L
            self.shared_init = self._fit_init(model, weights, ctx)
            install_residual_bases(model, self.names, self.cache, self.shared_init)
        self.qlayers = quantize_model(model, self.names, self.config, self.cache)
        self.inject_adapters(model, ctx)
        loras = adapter_modules(model, LoRALinear)
        self.loras: list[LoRALinear] = [loras[n] for n in self.names]
        if self.shared_init is not None:  # s·B·A = L
            init_loras({n: loras[n] for n in self.names}, self.shared_init)
            self.shared_init.factors.clear()  # the layers hold them (buffers follow .to())
        self.freeze(model, ctx)

    def _fit_init(self, model: nn.Module, weights, ctx: MethodContext) -> SharedInit:
        configs = fitting_configs(self.train_set, self.init.configs)
        sens = ctx.sensitivity(model) if self.init.mode == "lq" else None  # W is still fp here
        return fit_shared_init(
            {n: weights[n] for n in self.names},
            self.init,
            int(self.cfg.rank),
            configs,
            None if sens is None else sens.fisher,
        )

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
            searched = cs.provenance.get("init", "zero")  # configsets before method.init: zero
            if searched != self.init.mode:
                raise ConfigError(
                    f"method.configset={self.cfg.configset} was searched with method.init="
                    f"{searched}, but this run has method.init={self.init.mode}: pass "
                    f"method.init={searched} or search again with method.init={self.init.mode}"
                )
            entries = [e for e in cs.entries if e.pareto] if self.cfg.get("pareto_only") else []
            entries = entries or cs.entries
            if not entries:
                raise ConfigError(
                    f"method.configset={self.cfg.configset} has no entries to train on"
                )
            return [cs.entry_config(e) for e in entries]
        grid = PoolGrid.from_cfg(self.cfg.pool, "method.pool")
        space = self.space
        if space.kind == "gguf":  # the row rule narrows the budgets this model reaches
            space = space.for_layers({n: w.shape[-1] for n, w in weights.items()}, self.numels)
        configs, _ = initial_pool(
            weights, space, grid, ctx.table_cache_dir, ctx.model_name, self.solver,
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

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"init": self.init.mode}
        if self.shared_init is not None:
            state["init_digest"] = self.shared_init.report["digest"]
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another ``method.init`` (its adapter was fitted to other
        bases); warn when ``L`` was recomputed differently (another machine or torch build)."""
        theirs = state.get("init", "zero")  # checkpoints before method.init: zero
        if theirs != self.init.mode:
            raise ConfigError(
                f"the checkpoint was trained with method.init={theirs}, but this run has "
                f"method.init={self.init.mode}: pass method.init={theirs}"
            )
        digest = state.get("init_digest")
        ours = self.shared_init.report["digest"] if self.shared_init is not None else None
        if digest and ours and digest != ours:
            log.warning(
                "method.init=%s: the low-rank part L recomputed here (digest %s) differs from "
                "training's (%s), e.g. another machine or torch build; its bases may differ "
                "from training's in the last bits",
                self.init.mode,
                ours,
                digest,
            )

    def describe(self) -> dict[str, Any]:
        out = {
            "method": self.name,
            "init": self.init.mode,
            "train_configs": len(self.train_set),
            "eval_avg_bits": {k: round(c.average_bits(), 4) for k, c in self.eval_set.items()},
            "cache": self.cache.stats() if self.cache is not None else None,
        }
        if self.shared_init is not None:
            out["init_fit"] = dict(self.shared_init.report)
        return out
