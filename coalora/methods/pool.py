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
    table = cached_error_table(weights, space, cache_dir, model_name)
    return {b: allocate(weights, b, space, table=table, solver=solver) for b in budgets}


def dedupe(configs: list[ModelQuantConfig]) -> list[ModelQuantConfig]:
    seen, out = set(), []
    for c in configs:
        key = tuple(c.configs.items())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
