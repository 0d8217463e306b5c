"""Quantization-aware initialisation of the adapter shared by many configurations
(``method.init`` of Shared-LoRA and CoA-LoRA; docs/methods.md, "Quantization-aware
initialisation (method.init)").

* ``zero``: ``B = 0`` (LoRA, arXiv 2106.09685): ΔW = 0 and every configuration quantizes ``W``.
* ``lpq``: per target, ``L = SVD_r(W)`` (LQ-LoRA's first iteration from ``Q = 0``, arXiv
  2311.12023 §3; the configuration-set builder ``lora-lpq`` of the CoA-LoRA code, arXiv
  2509.25214). The LoRA starts at ``s·B·A = L`` (``A = L2/√s``, ``B = L1/√s``) and every
  configuration's base is ``quantize_c(W − L)``.
* ``lq``: ``L`` refitted to ``init_configs`` configurations spread over the training set by
  alternating ``L = SVD_r(W − mean_c deq(quantize_c(W − L)))`` (:func:`coalora.quant.lq.
  shared_lowrank`, up to ``init_iters`` iterates, the first being ``lpq``'s), weighted by the run's
  Fisher (LQ-LoRA §3.4) when ``quant.sensitivity=fisher``.

``L`` does not depend on the configuration, so one adapter is consistent with every base. The
targets become :class:`~coalora.quant.residual.ResidualQuantLinear`: ``W`` stays their original
(the allocations, sensitivities and error tables of the run read ``W``, as for ``zero``) and every
configuration quantizes ``W − L``. A restored run recomputes ``L`` from the same inputs (exact
float64 SVD on one thread) and its checkpoint's ``A``, ``B`` replace the initialisation; the
checkpoint carries ``init`` and a digest of the factors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from coalora.adapters import LoRALinear
from coalora.errors import ConfigError
from coalora.quant import ModelQuantConfig, fake_quantize
from coalora.quant.error_table import one_thread, weights_fingerprint
from coalora.quant.linear import DequantCache
from coalora.quant.lq import lora_init_from_lq, shared_lowrank
from coalora.quant.model import replace_module
from coalora.quant.residual import ResidualQuantLinear

log = logging.getLogger(__name__)

INITS = ("zero", "lpq", "lq")


@dataclass(frozen=True)
class InitSettings:
    """``method.init``, ``method.init_iters``, ``method.init_configs`` (validated, ConfigError)."""

    mode: str = "zero"
    iters: int = 5
    configs: int = 4

    @classmethod
    def from_cfg(cls, cfg: Any) -> InitSettings:
        mode = cfg.get("init", "zero")
        if mode not in INITS:
            raise ConfigError(f"method.init={mode!r} is not allowed; allowed: {list(INITS)}")
        values = {}
        for key in ("iters", "configs"):
            v = cfg.get(f"init_{key}", getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"method.init_{key}={v!r} must be an integer >= 1")
            values[key] = v
        return cls(mode, **values)

    @property
    def active(self) -> bool:
        """The adapter carries a low-rank part of the weights (the bases quantize ``W − L``)."""
        return self.mode != "zero"


def fitting_configs(train_set: list[ModelQuantConfig], k: int) -> list[ModelQuantConfig]:
    """``k`` configurations spread evenly over the training set's average bits (all of them
    when it has at most ``k``); stable, so a restored run picks the same ones."""
    ordered = sorted(train_set, key=lambda c: c.average_bits())
    if len(ordered) <= k:
        return ordered
    if k == 1:
        return [ordered[len(ordered) // 2]]
    picks = sorted({round(i * (len(ordered) - 1) / (k - 1)) for i in range(k)})
    return [ordered[i] for i in picks]


@dataclass
class SharedInit:
    """The fitted factors (name -> (L1, L2)) and what fitting them measured."""

    factors: dict[str, tuple[Tensor, Tensor]]
    report: dict[str, Any]

    def digest(self) -> str:
        """A content hash of the factors (a restored run checks it recomputed the same ones)."""
        parts = {f"{n}.{i}": f for n, pair in self.factors.items() for i, f in enumerate(pair)}
        return weights_fingerprint(parts)


def fit_shared_init(
    weights: dict[str, Tensor],
    settings: InitSettings,
    rank: int,
    configs: list[ModelQuantConfig],
    fisher: dict[str, Tensor] | None = None,
) -> SharedInit:
    """``lpq`` or ``lq`` factors for every target weight (module docstring)."""
    t0 = time.perf_counter()
    refit = settings.mode == "lq"
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    iterates: list[int] = []
    err_init = 0.0
    with one_thread():  # the SVD's sums in one fixed order: the same factors in every process
        for name, w in weights.items():
            fns = [lambda m, qc=c[name]: fake_quantize(m, qc) for c in configs] if refit else []
            res = shared_lowrank(
                w,
                rank,
                fns,
                iters=settings.iters if refit else 1,
                fisher=None if (fisher is None or not refit) else fisher[name],
            )
            factors[name] = (res.l1, res.l2)
            if res.errors:
                iterates.append(len(res.errors))
                err_init += min(res.errors)
    report: dict[str, Any] = {"mode": settings.mode, "rank": rank}
    if refit:
        report |= {
            "fitted_configs_avg_bits": [round(c.average_bits(), 4) for c in configs],
            "fisher": fisher is not None,
            "iterates_mean": round(sum(iterates) / max(1, len(iterates)), 2),
            "err_fitted": err_init,  # Σ_layers mean_c ‖(√F ⊙)(R − quantize_c(R))‖², R = W − L
        }
    report["seconds"] = round(time.perf_counter() - t0, 2)
    init = SharedInit(factors, report)
    report["digest"] = init.digest()
    log.info("method.init=%s: %d layers in %.1fs", settings.mode, len(factors), report["seconds"])
    return init


def install_residual_bases(
    model: nn.Module, names: list[str], cache: DequantCache, init: SharedInit
) -> None:
    """Replace each target ``nn.Linear`` by a ``ResidualQuantLinear`` serving ``W − L``."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"method.init={init.report['mode']}: target {name!r} is "
                f"{type(module).__name__}, expected the full-precision nn.Linear"
            )
        l1, l2 = init.factors[name]
        replace_module(model, name, ResidualQuantLinear(module, name, cache, l1, l2))


@torch.no_grad()
def init_loras(loras: dict[str, LoRALinear], init: SharedInit) -> None:
    """``s·B·A = L1 L2`` for every adapter (``lora_init_from_lq``)."""
    for name, lora in loras.items():
        a, b = lora_init_from_lq(*init.factors[name], lora.scaling)
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(b)


__all__ = [
    "INITS",
    "InitSettings",
    "SharedInit",
    "fit_shared_init",
    "fitting_configs",
    "init_loras",
    "install_residual_bases",
]
