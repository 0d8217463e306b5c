"""The initial pool: budget allocations on a grid of average bits (CoA-LoRA, arXiv 2509.25214
§4.3, step 1 of the configuration search). Shared-LoRA and CoA-LoRA train on it when no searched
configuration set is given, and the search scores it before its first round.

The pool is built once per (model, space, sensitivity, grid, solver) and cached as a configset
file under the cache directory; each allocation in it is the one
:func:`coalora.quant.build.allocations` returns with the run's sensitivity (``quant.sensitivity``,
docs/quantization.md), so a pool entry at b bits is exactly the configuration every method is
evaluated on at b bits, and an MSE pool and a Fisher pool never share a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from coalora.cachefile import get_or_compute, json_bytes, json_value
from coalora.errors import ConfigError
from coalora.quant import ModelQuantConfig, QuantSpace
from coalora.quant.build import allocations
from coalora.quant.sensitivity import Sensitivity
from coalora.search.configset import ConfigSet


@dataclass(frozen=True)
class PoolGrid:
    """``start:stop:step`` in average bits (``method.pool`` / ``search.pool``)."""

    start: float
    stop: float
    step: float

    @classmethod
    def from_cfg(cls, pool, key: str = "method.pool") -> PoolGrid:
        try:
            start, stop, step = float(pool["start"]), float(pool["stop"]), float(pool["step"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{key} must have numeric start, stop and step (average bits), got {pool!r}"
            ) from None
        if step <= 0:
            raise ConfigError(f"{key}.step={step:g} must be > 0")
        if start > stop:
            raise ConfigError(f"{key} is empty: start={start:g} > stop={stop:g}")
        return cls(start, stop, step)

    def budgets(self, space: QuantSpace, key: str = "method.pool") -> list[float]:
        """The grid's budgets that ``space`` can reach; a one-line error naming ``key`` if none."""
        lo, hi = space.min_bits(), space.max_bits()
        grid = np.round(np.arange(self.start, self.stop + 1e-9, self.step), 6)
        kept = [float(b) for b in grid if lo <= b <= hi]
        if not kept:
            raise ConfigError(
                f"{key}=[{self.start:g}, {self.stop:g}] is empty within the achievable average "
                f"bits [{lo:.4f}, {hi:.4f}] of quant.space"
            )
        return kept


def dedupe(configs: list[ModelQuantConfig]) -> list[ModelQuantConfig]:
    """Configurations in order, each distinct per-layer assignment once."""
    seen, out = set(), []
    for c in configs:
        key = tuple(c.configs.items())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def label_pool(
    allocs: dict[float, ModelQuantConfig],
) -> tuple[list[ModelQuantConfig], list[str]]:
    """(configurations, sources): the distinct allocations in budget order, each labelled with
    the first budget that produced it (``allocation@<bits>``)."""
    configs = dedupe(list(allocs.values()))
    by_config: dict[tuple, str] = {}
    for b, c in allocs.items():
        by_config.setdefault(tuple(c.configs.items()), f"allocation@{b:g}")
    return configs, [by_config[tuple(c.configs.items())] for c in configs]


def initial_pool(
    weights: dict[str, Tensor],
    space: QuantSpace,
    grid: PoolGrid,
    cache_dir: Path | None,
    model_name: str,
    solver: str = "exact",
    key: str = "method.pool",
    sensitivity: Sensitivity | None = None,
) -> tuple[list[ModelQuantConfig], list[str]]:
    """(configurations, sources): the deduplicated allocations on ``grid`` (errors weighted by
    ``sensitivity`` when given), each labelled with the first budget that produced it
    (``allocation@<bits>``)."""
    names = list(weights)
    errors = "mse" if sensitivity is None else sensitivity.table_kind

    def compute() -> dict:
        budgets = grid.budgets(space, key)
        allocs = allocations(weights, budgets, space, cache_dir, model_name, solver, sensitivity)
        configs, sources = label_pool(allocs)
        return ConfigSet.from_model_configs(
            configs,
            space=space,
            sources=sources,
            pareto=[True] * len(configs),
            provenance={
                "model": model_name,
                "kind": "initial pool",
                "grid": [grid.start, grid.stop, grid.step],
                "solver": solver,
                "errors": errors,
            },
        ).to_dict()

    def decode(payload: bytes) -> tuple[list[ModelQuantConfig], list[str]]:
        d = json_value(payload)
        if (d.get("provenance") or {}).get("errors") != errors:
            raise ValueError(f"it was allocated with other errors than {errors}")
        cs = ConfigSet.from_dict(d, expected_names=names, space=space, where="cached pool")
        return cs.to_model_configs(), [e.source or "allocation" for e in cs.entries]

    if cache_dir is None:
        return decode(json_bytes(compute()))
    g = grid
    tag = f"{model_name}-{space.digest()}-{errors}-{solver}-{g.start:g}-{g.stop:g}-{g.step:g}"
    path = Path(cache_dir) / f"pool-v3-{tag}.json"
    return get_or_compute(path, compute, json_bytes, decode, what="initial pool")
