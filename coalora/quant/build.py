"""The one owner of the ``quant`` config group (conf/quant/*.yaml): validated settings, the base
configuration they ask for, the only cached allocation path and the only ``DequantCache``
constructor.

Modes (docs/quantization.md): ``none`` (full precision), ``uniform`` / ``nf4`` (one QuantConfig
for every target layer; nf4 = (4, 8, fp32, 64, 256) = 4.127 bits), ``budget`` (the error-minimising
allocation at ``quant.budget`` average bits, LQ-LoRA's integer program, arXiv 2311.12023 §3.2),
``file`` (a ModelQuantConfig JSON) and ``bnb_nf4`` (bitsandbytes Linear4bit; no ModelQuantConfig).
``quant.sensitivity`` (``none`` | ``fisher``) weights every allocation's errors by a cached,
loss-aware sensitivity (``sensitivity.py``; docs/quantization.md, "Sensitivity").
Only mapping access to the config: a DictConfig or a plain dict both work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from coalora.errors import CoaloraError, ConfigError
from coalora.quant.allocation import (
    SOLVERS,
    SolveInfo,
    allocate,
    cached_allocation,
    cached_error_table,
)
from coalora.quant.config import FIELDS, ModelQuantConfig, QuantConfig, QuantSpace
from coalora.quant.error_table import ErrorTable
from coalora.quant.linear import DequantCache
from coalora.quant.packing import STORAGES
from coalora.quant.sensitivity import Sensitivity, check_sensitivity

log = logging.getLogger(__name__)

MODES = ("none", "uniform", "nf4", "budget", "file", "bnb_nf4")
KEYS = (
    "mode",
    "space",
    "config",
    "budget",
    "file",
    "solver",
    "sensitivity",
    "sensitivity_examples",
    "sensitivity_seed",
    "fisher",  # deprecated alias of sensitivity (true: fisher, false: none)
    "fisher_examples",  # deprecated alias of sensitivity_examples
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
    solver: str = "exact"
    sensitivity: str = "none"  # none | fisher: what weights the allocation errors
    sensitivity_examples: int = 64
    sensitivity_seed: int | None = None  # None: the run's seed draws the Fisher examples
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
        solver = _get(q, "solver", "exact")
        if solver not in SOLVERS:
            raise ConfigError(f"quant.solver={solver!r} is not allowed; allowed: {list(SOLVERS)}")
        if not isinstance(_get(q, "table_cache", True), bool):
            raise ConfigError(f"quant.table_cache={_get(q, 'table_cache')!r} must be true or false")
        sensitivity, n_examples = _sensitivity(q)
        sens_seed = _get(q, "sensitivity_seed")
        if sens_seed is not None and (
            isinstance(sens_seed, bool) or not isinstance(sens_seed, int)
        ):
            raise ConfigError(
                f"quant.sensitivity_seed={sens_seed!r} must be an integer or null (the run's seed)"
            )
        limit = _get(q, "cache_limit_mb", 4096)
        if not _is_number(limit) or limit < 0:
            raise ConfigError(f"quant.cache_limit_mb={limit!r} must be a number ≥ 0")
        storage = _get(q, "storage", "dequantized")
        if storage not in STORAGES:
            raise ConfigError(
                f"quant.storage={storage!r} is not allowed; allowed: {list(STORAGES)}"
            )
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
            sensitivity=sensitivity,
            sensitivity_examples=n_examples,
            sensitivity_seed=sens_seed,
            cache_limit_mb=float(limit),
            table_cache=bool(_get(q, "table_cache", True)),
            storage=str(storage),
        )

    @property
    def quantized(self) -> bool:
        """A ModelQuantConfig describes the base (every mode but none / bnb_nf4)."""
        return self.mode not in ("none", "bnb_nf4")

    @property
    def fisher(self) -> bool:
        return self.sensitivity == "fisher"

    def fisher_seed(self, run_seed: int) -> int:
        """The seed that draws the sensitivity's examples: ``quant.sensitivity_seed``, else the
        run's. Fixing it keeps the allocations (and the base) of runs with other seeds identical,
        so a second seed measures training variance only."""
        return int(run_seed if self.sensitivity_seed is None else self.sensitivity_seed)

    @property
    def needs_sensitivity(self) -> bool:
        """A single-configuration base that allocates (``budget``) with a loss-aware weighting."""
        return self.mode == "budget" and self.sensitivity != "none"

    def build_cache(self) -> DequantCache:
        """The dequantized-weight cache every quantized base switches through."""
        return DequantCache(self.cache_limit_mb, storage=self.storage)

    def base_config(
        self,
        weights: Mapping[str, Tensor] | None,
        numels: Mapping[str, int] | None = None,
        cache_dir: str | Path | None = None,
        model_name: str = "model",
        sensitivity: Sensitivity | None = None,
        table: ErrorTable | None = None,
    ) -> ModelQuantConfig | None:
        """The ModelQuantConfig these settings ask for, or None for ``none`` / ``bnb_nf4``.

        ``weights`` (target name -> fp weight) are needed for ``budget``; ``numels`` default to
        the weights' sizes. ``cache_dir`` + ``model_name`` key the on-disk error table and
        allocation (``quant.table_cache``). ``sensitivity`` (``sensitivity.py``) is required
        when ``quant.sensitivity`` is not ``none``. ``table`` replaces the error table (LQ-LoRA's
        decomposition-aware costs).
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
        self.check_sensitivity(sensitivity)
        use_cache = self.table_cache and cache_dir is not None
        try:
            if table is None:
                return allocations(
                    weights,
                    [self.budget],
                    self.space,
                    cache_dir if use_cache else None,
                    model_name,
                    self.solver,
                    sensitivity,
                )[self.budget]
            config = allocate(weights, self.budget, self.space, table=table, solver=self.solver)
        except CoaloraError:
            raise
        except ValueError as e:  # an unreachable budget names both achievable ends
            raise ConfigError(f"quant: {e}") from None
        return ModelQuantConfig(dict(config.configs), dict(numels))

    def check_sensitivity(self, sensitivity: Sensitivity | None) -> None:
        """The sensitivity given for an allocation is the kind these settings ask for."""
        kind = "none" if sensitivity is None else sensitivity.kind
        if kind != self.sensitivity:
            raise ConfigError(
                f"quant.sensitivity={self.sensitivity} needs a {self.sensitivity} sensitivity "
                f"(coalora.quant.sensitivity); {kind} was given"
            )

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


def _sensitivity(q: Any) -> tuple[str, int]:
    """(``quant.sensitivity``, ``quant.sensitivity_examples``), honouring the deprecated aliases
    ``quant.fisher`` (true: fisher, false: none) and ``quant.fisher_examples`` with a warning."""
    kind = check_sensitivity(_get(q, "sensitivity", "none") or "none")
    fisher = _get(q, "fisher")
    if fisher is not None:
        if not isinstance(fisher, bool):
            raise ConfigError(f"quant.fisher={fisher!r} must be true or false (deprecated)")
        log.warning(
            "quant.fisher is deprecated: use quant.sensitivity=%s", "fisher" if fisher else "none"
        )
        kind = "fisher" if fisher else "none"
    n = _get(q, "sensitivity_examples", 64)
    if _get(q, "fisher_examples") is not None:
        log.warning("quant.fisher_examples is deprecated: use quant.sensitivity_examples")
        n = _get(q, "fisher_examples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"quant.sensitivity_examples={n!r} must be an integer >= 1")
    return kind, int(n)


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


@dataclass(frozen=True)
class Allocation:
    """One budget's configuration and how it was obtained: ``info`` is the solver's
    :class:`SolveInfo` (None when unknown), ``source`` ``computed`` (solved or read from the
    allocation cache) or ``recorded`` (read from a run's ``allocations.json``)."""

    budget: float
    config: ModelQuantConfig
    info: SolveInfo | None = None
    source: str = "computed"


def solve_allocations(
    weights: Mapping[str, Tensor],
    budgets: Iterable[float],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    solver: str = "exact",
    sensitivity: Sensitivity | None = None,
) -> dict[float, Allocation]:
    """The allocation per budget with its :class:`SolveInfo`: the configuration every method is
    trained or scored on at that budget.

    Errors are the weights' squared error, weighted by ``sensitivity`` when given (its
    ``table_kind`` keys the error table, so MSE and Fisher tables and allocations never share a
    file). Cached on disk next to the error table (keyed by the table's kind and fingerprint,
    space, budget and solver; checksummed and written under a file lock, docs/reliability.md),
    so training, evaluation, export and search all read the same configuration."""
    budgets = [float(b) for b in budgets]
    cache = str(cache_dir) if cache_dir else None
    fisher = None if sensitivity is None else sensitivity.fisher
    kind = None if sensitivity is None else sensitivity.table_kind
    table = cached_error_table(weights, space, cache, model_name, fisher, kind=kind)
    out: dict[float, Allocation] = {}
    t0 = time.perf_counter()
    try:
        for i, b in enumerate(budgets):
            config, info = cached_allocation(table, b, space, cache_dir, model_name, solver)
            out[b] = Allocation(b, config, info)
            if len(budgets) > 4 and (i + 1) % 10 == 0:  # pools: a line per 10 allocations
                log.info(
                    "allocations: %d/%d (%.0fs)", i + 1, len(budgets), time.perf_counter() - t0
                )
    except ValueError as e:  # an unreachable budget names both achievable ends
        raise ConfigError(str(e)) from None
    statuses = [a.info.status if a.info is not None else "unknown" for a in out.values()]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
    log.info(
        "allocations: %d budget%s (%s errors, solver %s): %s",
        len(out), "" if len(out) == 1 else "s", table.kind, solver, counts or "-",
    )  # fmt: skip
    return out


def allocations(
    weights: Mapping[str, Tensor],
    budgets: list[float],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    solver: str = "exact",
    sensitivity: Sensitivity | None = None,
) -> dict[float, ModelQuantConfig]:
    """:func:`solve_allocations` without the solver information (budget -> configuration)."""
    solved = solve_allocations(weights, budgets, space, cache_dir, model_name, solver, sensitivity)
    return {b: a.config for b, a in solved.items()}


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
    sensitivity: Sensitivity | None = None,
) -> ModelQuantConfig | None:
    """``QuantSettings.from_cfg(quant_cfg).base_config(...)``."""
    return QuantSettings.from_cfg(quant_cfg).base_config(
        weights, numels, cache_dir, model_name, sensitivity
    )


__all__ = [
    "MODES",
    "Allocation",
    "QuantSettings",
    "allocations",
    "build_cache",
    "build_model_config",
    "quant_mode",
    "quant_space",
    "solve_allocations",
]
