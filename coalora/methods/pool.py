"""Configuration pools shared by the multi-configuration methods and the search stage.

* the data-free error table of the base weights (cached on disk by the quant engine),
* budget allocations on a grid (the initial pool, DESIGN §5 step 1; cached as a configset),
* the evaluation configuration per target budget (DESIGN §6: the allocation at that budget).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import Tensor

from coalora.errors import ConfigError
from coalora.quant import ModelQuantConfig, QuantSpace, allocate
from coalora.quant.allocation import cached_error_table

log = logging.getLogger(__name__)


def budget_grid(start: float, stop: float, step: float, space: QuantSpace) -> list[float]:
    """``start, start+step, ... <= stop`` clipped to what ``space`` can reach."""
    if step <= 0:
        raise ConfigError(f"method.pool.step={step} must be > 0")
    grid = np.round(np.arange(start, stop + 1e-9, step), 6)
    lo, hi = space.min_bits(), space.max_bits()
    kept = [float(b) for b in grid if lo <= b <= hi]
    if not kept:
        raise ConfigError(
            f"method.pool=[{start}, {stop}] lies outside the space's achievable average bits "
            f"[{lo:.4f}, {hi:.4f}]"
        )
    return kept


def allocations(
    weights: dict[str, Tensor],
    budgets: list[float],
    space: QuantSpace,
    cache_dir: Path | None,
    model_name: str,
    solver: str = "milp",
) -> dict[float, ModelQuantConfig]:
    """Allocation per budget. Cached on disk next to the error table (keyed by the table's
    fingerprint, budget and solver) so that every method and run on this machine is scored on
    exactly the same configuration, whatever a time-limited solver would return under load."""
    table = cached_error_table(weights, space, cache_dir, model_name)
    out: dict[float, ModelQuantConfig] = {}
    for b in budgets:
        path = None
        if cache_dir is not None:
            tag = f"{model_name}-{space.digest()}-{str(table.fingerprint)[:12]}-{solver}-{b:g}"
            path = Path(cache_dir) / "allocations" / f"alloc-{tag}.json"
            if path.is_file():
                try:
                    cfg = ModelQuantConfig.from_json(path)
                    cfg.validate_names(list(weights))
                    out[b] = cfg
                    continue
                except Exception as e:  # unreadable or stale: recompute
                    log.warning("ignoring cached allocation %s: %s", path, e)
        try:
            out[b] = allocate(weights, b, space, table=table, solver=solver)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if path is not None:
            out[b].to_json(path)
    return out


def dedupe(configs: list[ModelQuantConfig]) -> list[ModelQuantConfig]:
    seen, out = set(), []
    for c in configs:
        key = tuple(c.configs.items())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def initial_pool(
    weights: dict[str, Tensor],
    space: QuantSpace,
    start: float,
    stop: float,
    step: float,
    cache_dir: Path | None,
    model_name: str,
    solver: str = "milp",
) -> list[ModelQuantConfig]:
    """Budget allocations on the grid ``start:stop:step`` (deduplicated), built once per
    (model, space, grid) and cached as a configset file under ``cache_dir``."""
    from coalora.search.configset import ConfigSet

    names = list(weights)
    path = None
    if cache_dir is not None:
        path = (
            Path(cache_dir) / f"pool-{model_name}-{space.digest()}-{start:g}-{stop:g}-{step:g}.json"
        )
        if path.is_file():
            try:
                cs = ConfigSet.load(path, expected_names=names, space=space)
                return cs.to_model_configs()
            except Exception as e:  # stale cache (other weights or schema): rebuild
                log.warning("ignoring cached pool %s: %s", path, e)
    grid = budget_grid(start, stop, step, space)
    allocs = allocations(weights, grid, space, cache_dir, model_name, solver)
    configs = dedupe(list(allocs.values()))
    if path is not None:
        by_bits = {id(c): f"allocation@{b:g}" for b, c in allocs.items()}
        ConfigSet.from_model_configs(
            configs,
            space=space,
            sources=[by_bits.get(id(c), "allocation") for c in configs],
            pareto=[True] * len(configs),
            provenance={"model": model_name, "kind": "initial pool", "grid": [start, stop, step]},
        ).save(path)
    return configs
