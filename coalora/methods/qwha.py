"""QWHA (Jeon et al., arXiv 2509.17428): Walsh-Hadamard adapters with quantization-aware init.

arXiv 2509.17428 §3 (adapter, Eq. 4), §4 (AdaAlloc, value refinement); docs/methods.md ("QWHA");
adapter and init code in ``coalora.adapters.qwha`` / ``qwha_init`` (docs/methods.md).  As a method:

1. **Grams on the full-precision model.** ``init.calib_batches`` fixed *training-split* batches
   (``datamodule.calibration_batches``, never the dev split — the reference calibrates on the test
   split it reports on) run through the fp model; ``GramCollector`` accumulates
   ``G = Σ xᵀx`` per target layer over non-padding tokens.
2. **Quantized base** from ``quant=`` (any mode with a dequantized weight: not ``bnb_nf4``).
3. **Adapters.** Each target is wrapped by ``WHTAdapterLinear`` with ``p = r·(d_in + d_out)``
   coefficients (LoRA rank r's parameter count), ``ΔW = s·F·Ĥ``.
4. **Init.** ``qwha_initialize(W, W_q, G, p)`` per layer (AdaAlloc + LS refinement), loaded with
   ``set_coefficients``.  The per-layer calibration output error ``‖X(W − W_q − ΔW)ᵀ‖_F`` before
   (ΔW = 0) and after initialisation is in ``describe()["qwha"]``.

Trainable: the spectra and the task head.  ``scaling`` multiplies the orthonormal ΔW; the init is
stored as ``values / s``, so ``s`` does not change the model at step 0 and acts as a learning-rate
multiplier on ΔW under Adam (reference ``s = 4000`` ≈ our ``4000/√(d_in·d_out)``).  Positions are
buffers, not parameters: they are saved in the checkpoint's method state so a restored run does not
depend on recomputing the init.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from coalora.adapters import WHTAdapterLinear, inject
from coalora.adapters.qwha_init import GramCollector, qwha_initialize
from coalora.errors import ConfigError
from coalora.methods.base import Method, MethodContext, settings_from_cfg
from coalora.quant import QuantLinear, QuantSettings

log = logging.getLogger(__name__)

SOLVERS = ("lstsq", "normal")
ALLOC_METRICS = ("output", "weight")
POSITION_SCORES = ("gram", "magnitude")


class FusedWHTAdapterLinear(WHTAdapterLinear):
    """``WHTAdapterLinear`` whose forward folds ΔW into the base weight: ``x (W_q + ΔW)ᵀ + b``.

    Same parameters, same ΔW, same output (tested).  The unfused ``base(x) + x ΔWᵀ`` costs two
    dense matmuls forward and four backward (x-gradients through both, ΔW's gradient); fused it is
    one forward and two backward — about 1.5x faster per adapted layer on CPU (MiniLM shapes,
    1.2k tokens).  The reference does the same (``F.linear(x, dequant(W_Q) + ΔW)``).  Needs a
    base with ``weight``/``bias`` (``nn.Linear``, ``QuantLinear``).
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        w = base.weight + self.delta_weight().to(base.weight.dtype)  # (d_out, d_in)
        return F.linear(x, w.to(x.dtype), None if base.bias is None else base.bias.to(x.dtype))


@dataclass(frozen=True)
class QWHAInitSettings:
    """``method.init``: the quantization-aware initialisation (validated, ConfigError)."""

    enabled: bool = True
    calib_batches: int = 8
    temperature: float = 1.0
    refine: bool = True
    solver: str = "lstsq"
    alloc_metric: str = "output"
    position_score: str = "gram"
    damping: float = 1e-4

    @classmethod
    def from_cfg(cls, cfg: Any) -> QWHAInitSettings:
        s = settings_from_cfg(cls, cfg, "method.init")
        for key in ("enabled", "refine"):
            if not isinstance(getattr(s, key), bool):
                raise ConfigError(f"method.init.{key}={getattr(s, key)!r} must be true or false")
        cb = s.calib_batches
        if isinstance(cb, bool) or not isinstance(cb, int) or cb < 1:
            raise ConfigError(f"method.init.calib_batches={cb!r} must be an integer >= 1")
        for key in ("temperature", "damping"):
            v = getattr(s, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"method.init.{key}={v!r} must be a number > 0")
        for key, allowed in (
            ("solver", SOLVERS),
            ("alloc_metric", ALLOC_METRICS),
            ("position_score", POSITION_SCORES),
        ):
            if getattr(s, key) not in allowed:
                raise ConfigError(
                    f"method.init.{key}={getattr(s, key)!r} is not allowed; "
                    f"allowed: {list(allowed)}"
                )
        return s


class QWHA(Method):
    name = "qwha"
    # a sparse Walsh-Hadamard spectrum is not a LoRA: only the merged weights are portable
    export_formats = ("merged",)
    # bnb_nf4 has no dequantized weight W_q to initialise from; none = an fp base (init is a no-op)
    quant_modes = ("none", "nf4", "uniform", "budget", "file")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.init = QWHAInitSettings.from_cfg(cfg.get("init"))
        self.adapters: dict[str, WHTAdapterLinear] = {}
        self.report: dict[str, Any] = {}

    def check(self, quant: QuantSettings) -> None:
        super().check(quant)
        c = self.cfg
        if isinstance(c.scaling, bool) or not float(c.scaling) > 0:
            raise ConfigError(f"method.scaling={c.scaling!r} must be a number > 0")

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, ctx: MethodContext) -> None:
        self.names = list(ctx.names)
        grams = None
        if self.init.enabled and ctx.quant.mode != "none":
            if ctx.calibration is None:
                # e.g. a restore without data: positions/values come from the checkpoint
                log.info("qwha: no training data, initialisation skipped (restored from the run)")
            else:
                grams = self._collect_grams(model, ctx)
        self.build_base(model, ctx)
        self.inject_adapters(model, ctx)
        if grams is not None:
            self._initialize(grams)
        self.freeze(model, ctx)
        self.release_original(model, ctx)

    @torch.no_grad()
    def _collect_grams(self, model: nn.Module, ctx: MethodContext) -> dict[str, Tensor]:
        """``Σ xᵀx`` per target over non-padding tokens of fixed training batches (fp model)."""
        t0 = time.perf_counter()
        batches = ctx.calibration_batches(self.init.calib_batches, seed=ctx.seed)
        was_training = model.training
        model.eval()
        try:
            with GramCollector(model, self.names) as collector:
                for batch in batches:
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    collector.mask = inputs.get("attention_mask")
                    model(**inputs)
        finally:
            model.train(was_training)
        self.report["calib_tokens"] = int(collector.counts[self.names[0]])
        self.report["gram_seconds"] = round(time.perf_counter() - t0, 2)
        return collector.grams

    def inject_adapters(self, model: nn.Module, ctx) -> None:
        c = self.cfg
        cls = FusedWHTAdapterLinear if bool(c.get("fused", True)) else WHTAdapterLinear
        self.adapters = inject(
            model,
            self.names,
            lambda _, m: cls(
                m, rank=int(c.rank), scaling=float(c.scaling), seed=int(c.get("seed", 777))
            ),
        )

    def _initialize(self, grams: dict[str, Tensor]) -> None:
        t0 = time.perf_counter()
        layers: dict[str, dict[str, float]] = {}
        s = self.init
        for name, adapter in self.adapters.items():
            base = adapter.base_layer
            if not isinstance(base, QuantLinear):
                raise ConfigError(
                    f"qwha init needs a quantized base; {name!r} is {type(base).__name__}"
                )
            res = qwha_initialize(
                base.weight_fp, base.weight, grams[name], adapter.n_coeffs,
                temperature=float(s.temperature), damping=float(s.damping),
                alloc_metric=s.alloc_metric, position_score=s.position_score,
                refine=s.refine, solver=s.solver,
            )  # fmt: skip
            adapter.set_coefficients(res.indices, res.values)
            after = res.report["err_refined"] if s.refine else res.report["err_plain"]
            layers[name] = {"err_zero": res.report["err_zero"], "err_init": after}
        self.report["init_seconds"] = round(time.perf_counter() - t0, 2)
        zero = sum(v["err_zero"] ** 2 for v in layers.values()) ** 0.5
        init = sum(v["err_init"] ** 2 for v in layers.values()) ** 0.5
        self.report["err_zero_total"] = zero
        self.report["err_init_total"] = init
        self.report["err_ratio_mean"] = sum(
            v["err_init"] / v["err_zero"] for v in layers.values() if v["err_zero"] > 0
        ) / max(1, sum(v["err_zero"] > 0 for v in layers.values()))
        self.report["layers"] = layers
        log.info(
            "qwha init: output error %.4g -> %.4g (%.1fs)", zero, init, self.report["init_seconds"]
        )

    # ------------------------------------------------------------------ training
    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        for n, m in model.named_modules():
            if isinstance(m, WHTAdapterLinear):
                for pn, p in m.adapter_parameters().items():
                    yield f"{n}.{pn}", p

    def extra_state(self) -> dict[str, Any]:
        return {"qwha_indices": {n: a.indices.detach().cpu() for n, a in self.adapters.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        indices = state.get("qwha_indices") or {}
        for name, idx in indices.items():
            if name in self.adapters:
                self.adapters[name].indices.copy_(idx.to(self.adapters[name].indices.device))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["qwha"] = dict(self.report)
        return out
