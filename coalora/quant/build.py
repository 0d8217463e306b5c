"""The one owner of the ``quant`` config group (conf/quant/*.yaml): validated settings, the base
configuration they ask for, the only cached allocation path and the only ``DequantCache``
constructor.

Modes (docs/quantization.md): ``none`` (full precision), ``uniform`` / ``nf4`` (one QuantConfig
for every target layer; nf4 = (4, 8, fp32, 64, 256) = 4.127 bits), ``budget`` (the error-minimising
allocation at ``quant.budget`` average bits, LQ-LoRA's integer program, arXiv 2311.12023 §3.2),
``file`` (a ModelQuantConfig JSON) and ``bnb_nf4`` (bitsandbytes Linear4bit; no ModelQuantConfig).
Only mapping access to the config: a DictConfig or a plain dict both work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from coalora.errors import CoaloraError, ConfigError
from coalora.quant.allocation import (
    SOLVERS,
    allocate,
    build_error_table,
    cached_allocations,
    cached_error_table,
)
from coalora.quant.config import FIELDS, ModelQuantConfig, QuantConfig, QuantSpace
from coalora.quant.error_table import ErrorTable
from coalora.quant.linear import DequantCache
from coalora.quant.packed import STORAGES

log = logging.getLogger(__name__)

MODES = ("none", "uniform", "nf4", "budget", "file", "bnb_nf4")
KEYS = (
    "mode",
    "space",
    "config",
    "budget",
    "file",
    "solver",
    "fisher",
    "fisher_examples",
    "cache_limit_mb",
    "table_cache",
    "storage",
)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if cfg is not None else default


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantSettings:
    """``cfg.quant`` validated once: every field is checked before any model or data is built."""

    mode: str = "none"
    space: QuantSpace = QuantSpace()
    config: QuantConfig | None = None  # uniform / nf4
    budget: float | None = None  # budget
    file: str | None = None  # file
    solver: str = "milp"
    fisher: bool = False
    fisher_examples: int = 64
    cache_limit_mb: float = 4096.0
    table_cache: bool = True
    storage: str = "dequantized"  # how cached weights are held (docs/packed.md)

    @classmethod
    def from_cfg(cls, q: Any) -> QuantSettings:
        unknown = sorted(set(q or {}) - set(KEYS))
        if unknown:
            raise ConfigError(f"quant has unknown keys {unknown}; allowed: {list(KEYS)}")
        mode = _get(q, "mode", "none")
        if mode not in MODES:
            raise ConfigError(f"quant.mode={mode!r} is not allowed; allowed: {list(MODES)}")
        space = QuantSpace.from_cfg(_get(q, "space"), prefix="quant.space")
        solver = _get(q, "solver", "milp")
        if solver not in SOLVERS:
            raise ConfigError(f"quant.solver={solver!r} is not allowed; allowed: {list(SOLVERS)}")
        for key in ("fisher", "table_cache"):
            if not isinstance(_get(q, key, False), bool):
                raise ConfigError(f"quant.{key}={_get(q, key)!r} must be true or false")
        limit = _get(q, "cache_limit_mb", 4096)
        if not _is_number(limit) or limit < 0:
            raise ConfigError(f"quant.cache_limit_mb={limit!r} must be a number ≥ 0")
        storage = _get(q, "storage", "dequantized")
        if storage not in STORAGES:
            raise ConfigError(
                f"quant.storage={storage!r} is not allowed; allowed: {list(STORAGES)}"
            )
        n_fisher = _get(q, "fisher_examples", 64)
        if isinstance(n_fisher, bool) or not isinstance(n_fisher, int) or n_fisher < 1:
            raise ConfigError(f"quant.fisher_examples={n_fisher!r} must be an integer >= 1")
        config = budget = file = None
        if mode in ("uniform", "nf4"):
            config = _uniform_config(_get(q, "config"), space, mode)
        elif mode == "budget":
            budget = _get(q, "budget")
            if not _is_number(budget):
                raise ConfigError(
                    f"quant.budget={budget!r} must be a number (average bits) for quant.mode=budget"
                )
            lo, hi = space.min_bits(), space.max_bits()
            if not lo - 1e-9 <= budget <= hi + 1e-9:
                raise ConfigError(
                    f"quant.budget={budget} is not achievable with quant.space: min achievable "
                    f"{lo:.4f}, max achievable {hi:.4f} average bits"
                )
            budget = float(budget)
        elif mode == "file":
            file = _get(q, "file")
            if not file:
                raise ConfigError(
                    "quant.file must be set for quant.mode=file (a quant_config.json path)"
                )
            if not Path(file).is_file():
                raise ConfigError(f"quant.file={file!r}: no such configuration file")
            file = str(file)
        return cls(
            mode=mode,
            space=space,
            config=config,
            budget=budget,
            file=file,
            solver=solver,
            fisher=bool(_get(q, "fisher", False)),
            fisher_examples=int(n_fisher),
            cache_limit_mb=float(limit),
            table_cache=bool(_get(q, "table_cache", True)),
            storage=str(storage),
        )

    @property
    def quantized(self) -> bool:
        """A ModelQuantConfig describes the base (every mode but none / bnb_nf4)."""
        return self.mode not in ("none", "bnb_nf4")

    @property
    def needs_fisher(self) -> bool:
        return self.mode == "budget" and self.fisher

    def build_cache(self) -> DequantCache:
        """The dequantized-weight cache every quantized base switches through."""
        return DequantCache(self.cache_limit_mb, storage=self.storage)

    def base_config(
        self,
        weights: Mapping[str, Tensor] | None,
        numels: Mapping[str, int] | None = None,
        cache_dir: str | Path | None = None,
        model_name: str = "model",
        fisher: Mapping[str, Tensor] | None = None,
        table: ErrorTable | None = None,
    ) -> ModelQuantConfig | None:
        """The ModelQuantConfig these settings ask for, or None for ``none`` / ``bnb_nf4``.

        ``weights`` (target name -> fp weight) are needed for ``budget``; ``numels`` default to
        the weights' sizes. ``cache_dir`` + ``model_name`` key the on-disk error table and
        allocation (``quant.table_cache``). ``fisher`` is required when ``quant.fisher`` is true.
        ``table`` replaces the error table (LQ-LoRA's decomposition-aware costs).
        """
        if not self.quantized:
            return None
        if numels is None:
            if weights is None:
                raise ValueError("base_config needs weights or numels")
            numels = {n: int(w.numel()) for n, w in weights.items()}
        if self.mode in ("uniform", "nf4"):
            return ModelQuantConfig.uniform(numels, self.config)
        if self.mode == "file":
            return self._from_file(numels)
        if weights is None:
            raise ValueError("quant.mode=budget needs the target weights to compute errors")
        if self.fisher and fisher is None:
            raise ConfigError(
                "quant.fisher=true needs a Fisher diagonal (coalora.quant.fisher_diagonal); "
                "none was given"
            )
        use_cache = self.table_cache and cache_dir is not None
        try:
            if table is None and not self.fisher and use_cache:
                return allocations(
                    weights, [self.budget], self.space, cache_dir, model_name, self.solver
                )[self.budget]
            if table is None:
                f = fisher if self.fisher else None
                table = (
                    cached_error_table(weights, self.space, str(cache_dir), model_name, f)
                    if use_cache
                    else build_error_table(weights, self.space, f)
                )
            config = allocate(weights, self.budget, self.space, table=table, solver=self.solver)
        except CoaloraError:
            raise
        except ValueError as e:  # an unreachable budget names both achievable ends
            raise ConfigError(f"quant: {e}") from None
        return ModelQuantConfig(dict(config.configs), dict(numels))

    def _from_file(self, numels: Mapping[str, int]) -> ModelQuantConfig:
        config = ModelQuantConfig.from_json(self.file)
        try:
            config.validate_names(list(numels))
        except ValueError as e:
            raise ConfigError(f"quant.file={self.file}: {e}") from None
        bad = {n: (config.numels[n], numels[n]) for n in numels if config.numels[n] != numels[n]}
        if bad:
            raise ConfigError(
                f"quant.file={self.file}: layer sizes differ from the model's (file, model): {bad}"
            )
        outside = {n: qc.key for n, qc in config.items() if qc not in self.space}
        if outside:
            first = dict(list(outside.items())[:3])
            raise ConfigError(
                f"quant.file={self.file}: {len(outside)} layer options lie outside quant.space "
                f"(e.g. {first}); allowed: {self.space.to_dict()}"
            )
        return ModelQuantConfig({n: config[n] for n in numels}, dict(numels))  # model's order


def _uniform_config(cfg: Any, space: QuantSpace, mode: str) -> QuantConfig:
    """``quant.config`` validated field by field against ``quant.space``."""
    if cfg is None:
        raise ConfigError(f"quant.config must be set for quant.mode={mode}")
    for name in FIELDS:
        if name not in cfg:
            raise ConfigError(f"quant.config.{name} is missing; expected fields {list(FIELDS)}")
        allowed = getattr(space, name)
        if cfg[name] not in allowed or isinstance(cfg[name], bool):
            raise ConfigError(
                f"quant.config.{name}={cfg[name]!r} is not allowed; allowed: {list(allowed)}"
            )
    return QuantConfig.from_dict(cfg, prefix="quant.config")


def allocations(
    weights: Mapping[str, Tensor],
    budgets: list[float],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    solver: str = "milp",
) -> dict[float, ModelQuantConfig]:
    """The data-free allocation per budget: the configuration every method is scored on.

    Cached on disk next to the error table (keyed by the table's fingerprint, space, budget and
    solver; checksummed and written under a file lock, docs/reliability.md), so training,
    evaluation, export and search all read the same configuration."""
    table = cached_error_table(weights, space, str(cache_dir) if cache_dir else None, model_name)
    try:
        return cached_allocations(
            table, [float(b) for b in budgets], space, cache_dir, model_name, solver
        )
    except ValueError as e:  # an unreachable budget names both achievable ends
        raise ConfigError(str(e)) from None


# ---------------------------------------------------------------- function forms of the settings
def quant_mode(quant_cfg: Any) -> str:
    mode = _get(quant_cfg, "mode", "none")
    if mode not in MODES:
        raise ConfigError(f"quant.mode={mode!r} is not allowed; allowed: {list(MODES)}")
    return mode


def quant_space(quant_cfg: Any) -> QuantSpace:
    return QuantSpace.from_cfg(_get(quant_cfg, "space"), prefix="quant.space")


def build_cache(quant_cfg: Any) -> DequantCache:
    return QuantSettings.from_cfg(quant_cfg).build_cache()


def build_model_config(
    quant_cfg: Any,
    weights: Mapping[str, Tensor] | None,
    numels: Mapping[str, int] | None = None,
    cache_dir: str | None = None,
    model_name: str = "model",
    fisher: Mapping[str, Tensor] | None = None,
) -> ModelQuantConfig | None:
    """``QuantSettings.from_cfg(quant_cfg).base_config(...)``."""
    return QuantSettings.from_cfg(quant_cfg).base_config(
        weights, numels, cache_dir, model_name, fisher
    )


__all__ = [
    "MODES",
    "QuantSettings",
    "allocations",
    "build_cache",
    "build_model_config",
    "quant_mode",
    "quant_space",
]
