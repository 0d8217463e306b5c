"""LQ-LoRA (Guo et al., arXiv 2311.12023): LoRA initialised from ``W ≈ Q + L1 L2``.

arXiv 2311.12023 §3.1 (decomposition), §3.2 (budget ILP with decomposition-aware costs), §3.4
(Fisher weighting); docs/methods.md ("LQ-LoRA").  Per target layer, with the
layer's QuantConfig ``c`` from the resolved base configuration (``quant=nf4|uniform|file|budget``):

    L1, L2, Q = lq_decompose(W, r, quantize_c)      best iterate (stop at the first non-improvement)
    frozen base  = Q                                (exactly representable in configuration c)
    LoRA         : A = L2/√s, B = L1/√s, s = α/r    so that s·B·A = L1 L2 at step 0

How the base serves ``Q`` without touching ``coalora.quant``: :class:`DecomposedQuantLinear` is a
``QuantLinear`` whose dequantized weight *for its own configuration* is the precomputed ``Q`` (a
non-persistent buffer) instead of ``fake_quantize(W, c)``.  Switching it to any other configuration
falls back to ``QuantLinear``'s behaviour (quantize ``W``), which no longer matches the LoRA init.

``quant=budget``: the allocation minimises the decomposition error ``‖W − (Q + L1L2)‖²`` (LQ-LoRA's
ILP), from a table built with few iterations and dominance pruning (:mod:`coalora.methods.lq_table`);
``method.lq.allocation=quantization`` uses the plain table every other method shares (the evaluation
protocol of docs/methods.md).
Optional Fisher weighting (``method.lq.fisher``): the diagonal empirical Fisher of the fp model on
``calib_batches × data.batch_size`` training examples weights the SVD (``heuristic``);
``quant.sensitivity=fisher`` weights the allocation costs (and the decomposition error) with the
run's cached sensitivity (``coalora.quant.sensitivity``), which then also weights the SVD.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from coalora.adapters import LoRALinear, inject, replace_module
from coalora.errors import CoaloraError, ConfigError
from coalora.methods.base import Method, MethodContext, settings_from_cfg
from coalora.methods.lq_table import cached_lq_error_table
from coalora.quant import (
    DequantCache,
    ModelQuantConfig,
    QuantConfig,
    QuantLinear,
    QuantSettings,
    cached_error_table,
    fake_quantize,
    model_weights,
)
from coalora.quant.lq import HEURISTICS, lora_init_from_lq, lq_decompose

log = logging.getLogger(__name__)

ALLOCATIONS = ("decomposition", "quantization")


class DecomposedQuantLinear(QuantLinear):
    """A ``QuantLinear`` that serves a precomputed quantized weight for one configuration.

    ``weight_q`` (d_out, d_in) is LQ-LoRA's ``Q = quantize_c(W − L1 L2)``; ``lq_config`` is ``c``.
    ``weight_fp`` stays the original ``W`` (targets of other configurations, Fisher, error tables).
    """

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        cache: DequantCache | None,
        lq_config: QuantConfig,
        weight_q: Tensor,
    ) -> None:
        super().__init__(linear, name, cache)
        if tuple(weight_q.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{name}: Q has shape {tuple(weight_q.shape)}, expected "
                f"({self.out_features}, {self.in_features})"
            )
        self.lq_config = lq_config
        self.register_buffer("weight_q", weight_q.detach().to(self.weight_fp), persistent=False)
        self.set_config(lq_config)

    def _dequantized(self, qc: QuantConfig) -> Tensor:
        if qc == self.lq_config:
            return self.weight_q  # follows .to()/.cuda() with the module (a buffer)
        return super()._dequantized(qc)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lq_config={self.lq_config.key}"


@dataclass(frozen=True)
class LQSettings:
    """``method.lq``: decomposition and allocation-table options (validated, ConfigError)."""

    iters: int = 20
    randomized: bool = True
    oversampling: int = 10
    heuristic: str = "two-sided"
    fisher: bool = False
    calib_batches: int = 8
    allocation: str = "decomposition"
    table_iters: int = 2
    table_prune: bool = True
    seed: int = 0

    @classmethod
    def from_cfg(cls, cfg: Any) -> LQSettings:
        s = settings_from_cfg(cls, cfg, "method.lq")
        for key in ("iters", "calib_batches", "table_iters"):
            v = getattr(s, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"method.lq.{key}={v!r} must be an integer >= 1")
        if (
            isinstance(s.oversampling, bool)
            or not isinstance(s.oversampling, int)
            or s.oversampling < 0
        ):
            raise ConfigError(f"method.lq.oversampling={s.oversampling!r} must be an integer >= 0")
        if s.heuristic not in HEURISTICS:
            raise ConfigError(
                f"method.lq.heuristic={s.heuristic!r} is not allowed; allowed: {list(HEURISTICS)}"
            )
        if s.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"method.lq.allocation={s.allocation!r} is not allowed; "
                f"allowed: {list(ALLOCATIONS)}"
            )
        for key in ("randomized", "fisher", "table_prune"):
            if not isinstance(getattr(s, key), bool):
                raise ConfigError(f"method.lq.{key}={getattr(s, key)!r} must be true or false")
        return s


class LQLoRA(Method):
    name = "lq_lora"
    # bnb_nf4 has no dequantized weight to replace by Q; none has no Q at all
    quant_modes = ("nf4", "uniform", "budget", "file")
    # the base is its own decomposition Q, not quant(W): only the merged weights are portable
    export_formats = ("merged",)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.lq = LQSettings.from_cfg(cfg.get("lq"))
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ base = Q
    def build_base(self, model: nn.Module, ctx: MethodContext) -> None:
        q = ctx.quant
        weights = {n: w.to(torch.float32) for n, w in model_weights(model, self.names).items()}
        t0 = time.perf_counter()
        sens = ctx.sensitivity(model) if q.needs_sensitivity else None  # weights the allocation
        fisher = None if sens is None else sens.fisher
        if fisher is None and self.lq.fisher:  # the SVD's own Fisher (cached like any sensitivity)
            n_examples = self.lq.calib_batches * int(ctx.batch_size)
            fisher = ctx.sensitivity(model, kind="fisher", examples=n_examples).fisher
        if fisher is not None:
            self.report["fisher_examples"] = (
                q.sensitivity_examples if sens else self.lq.calib_batches * int(ctx.batch_size)
            )
            self.report["fisher_seconds"] = round(time.perf_counter() - t0, 2)
        self.config = self._configuration(model, q, weights, fisher, sens, ctx)
        self.cache = q.build_cache()
        t0 = time.perf_counter()
        layers: dict[str, dict[str, Any]] = {}
        for name in self.names:
            w, qc = weights[name], self.config[name]
            res = lq_decompose(
                w,
                int(self.cfg.rank),
                lambda m, qc=qc: fake_quantize(m, qc),
                iters=self.lq.iters,
                randomized=self.lq.randomized,
                oversampling=self.lq.oversampling,
                fisher=fisher[name] if (self.lq.fisher and fisher is not None) else None,
                heuristic=self.lq.heuristic,
                seed=self.lq.seed,
            )
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise CoaloraError(
                    f"lq_lora: target {name!r} is {type(module).__name__}, "
                    "expected the full-precision nn.Linear"
                )
            replace_module(model, name, DecomposedQuantLinear(module, name, self.cache, qc, res.q))
            self._factors[name] = (res.l1, res.l2)
            layers[name] = {
                "config": qc.key,
                "err_quant": float((w - fake_quantize(w, qc)).norm()),
                "err_lq": float((w - res.q - res.l1 @ res.l2).norm()),
                "iters": len(res.errors),
            }
        self.report["decompose_seconds"] = round(time.perf_counter() - t0, 2)
        self.report["err_quant_total"] = sum(v["err_quant"] ** 2 for v in layers.values()) ** 0.5
        self.report["err_lq_total"] = sum(v["err_lq"] ** 2 for v in layers.values()) ** 0.5
        self.report["layers"] = layers

    def _configuration(
        self, model: nn.Module, q: QuantSettings, weights, fisher, sens, ctx: MethodContext
    ) -> ModelQuantConfig:
        """The base configuration through the one quant path; with ``quant=budget`` and
        ``method.lq.allocation=decomposition`` it plugs in the decomposition-aware table.
        A restored or resumed run reads the configuration it recorded."""
        if ctx.record is not None and ctx.record.trained is not None:
            return ctx.record.trained
        if q.mode != "budget":
            return q.base_config(weights, None)
        if self.lq.allocation == "quantization":  # the allocation every method is scored on
            self.solved = ctx.allocations(model, [q.budget])
            return self.solved[q.budget].config
        cache_dir = str(ctx.cache_dir) if (q.table_cache and ctx.cache_dir) else None
        quant_fisher = None if sens is None else sens.fisher
        kind = None if sens is None else sens.table_kind
        plain = None
        if self.lq.table_prune:
            plain = cached_error_table(
                weights, q.space, cache_dir, ctx.model_name, quant_fisher, kind=kind
            )
        table, seconds = cached_lq_error_table(
            weights, q.space, cache_dir, ctx.model_name,
            int(self.cfg.rank), self.lq.table_iters,
            randomized=self.lq.randomized, oversampling=self.lq.oversampling,
            fisher=fisher, weighted_error=sens is not None,
            weighted_svd=self.lq.heuristic if self.lq.fisher else None,
            plain=plain, seed=self.lq.seed,
        )  # fmt: skip
        self.report["table_seconds"] = round(seconds, 2)
        self.report["table_kind"] = table.kind
        return q.base_config(weights, None, ctx.cache_dir, ctx.model_name, sens, table)

    # ------------------------------------------------------------------ LoRA = L1 L2
    def inject_adapters(self, model: nn.Module, ctx) -> None:
        c = self.cfg
        loras = inject(model, self.names, lambda _, m: LoRALinear(m, c.rank, c.alpha, c.dropout))
        with torch.no_grad():
            for name, lora in loras.items():
                l1, l2 = self._factors.pop(name)
                a, b = lora_init_from_lq(l1, l2, lora.scaling)  # s·B·A = L1 L2
                lora.lora_A.copy_(a)
                lora.lora_B.copy_(b)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["lq"] = {k: v for k, v in self.report.items() if k != "layers"}
        out["lq"]["layers"] = self.report.get("layers", {})
        return out
