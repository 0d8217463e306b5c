"""Budget allocation: one QuantConfig per layer minimising total error under an average-bit budget.

LQ-LoRA's integer program (arXiv 2311.12023 §3.2): a multiple-choice knapsack (MCKP) with
costs[i, c] = ‖D ⊙ (W_i − Ŵ_i(c))‖²_F (D = √Fisher, or 1) and item weights bits(c)·numel_i.
The solvers live in ``mckp.py``: ``exact`` (default; dominance, LP bound, reduced-cost fixing and a
bounded dynamic program over exact integer bit counts, proven optimal), ``milp`` (HiGHS, kept as a
cross-check) and ``lagrangian`` (fast, within one hull step). Error tables (and their disk cache)
live in ``error_table.py``.

The answer depends on the inputs only: no solver has a wall-clock limit, and the solver's status
and optimality gap are returned with the configuration (:class:`SolveInfo`). Cached allocations are
checksummed and written under a file lock (``coalora.cachefile``), so concurrent runs on an empty
cache compute each allocation once and all read the same one (docs/reliability.md).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import Tensor

from coalora.cachefile import get_or_compute, json_bytes, json_value
from coalora.quant.config import ModelQuantConfig, QuantSpace
from coalora.quant.error_table import (  # re-exported: allocation is where callers look
    ErrorTable,
    build_error_table,
    cached_error_table,
    cached_table,
    table_path,
    weights_fingerprint,
)
from coalora.quant.mckp import SolveInfo, prune_dominated, solve_mckp_lagrangian  # re-exported
from coalora.quant.mckp_exact import integer_weights, solve_mckp_exact
from coalora.quant.mckp_milp import solve_mckp_milp

log = logging.getLogger(__name__)

SOLVERS = ("exact", "milp", "lagrangian")
# Bumped when the solvers' settings change what they return: cached allocations of an older
# version are not reused (version 1 had a 2 s wall-clock limit, version 2 a node-limited MILP).
ALLOCATION_VERSION = 3


def allocate(
    weights: Mapping[str, Tensor] | None,
    budget: float,
    space: QuantSpace | None = None,
    table: ErrorTable | None = None,
    solver: str = "exact",
    fisher: Mapping[str, Tensor] | None = None,
    return_info: bool = False,
):
    """The configuration minimising total error with average bits ≤ ``budget``.

    ``table`` (e.g. from the disk cache) skips computing errors; it is restricted to ``space``.
    Budgets outside [min, max] achievable average bits raise ``ValueError`` naming both numbers.
    With ``return_info`` returns ``(config, SolveInfo)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"quant.solver={solver!r} is not allowed; allowed: {list(SOLVERS)}")
    space = space or QuantSpace()
    if table is None:
        if weights is None:
            raise ValueError("allocate needs weights or an error table")
        table = build_error_table(weights, space, fisher)
    table = table.restrict(space)
    if weights is not None and list(weights) != table.names:
        raise ValueError(
            f"error table layers do not match the weights: unknown {sorted(set(table.names) - set(weights))}; "
            f"missing {sorted(set(weights) - set(table.names))}"
        )
    lo, hi = table.min_average_bits(), table.max_average_bits()
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise ValueError(
            f"budget={budget} average bits is not achievable with this space: "
            f"min achievable {lo:.4f}, max achievable {hi:.4f}"
        )
    costs = table.costs.numpy()
    allowed = table.allowed().numpy()
    if solver == "exact":
        # exact integers: storage bits are dyadic rationals, numels integers (mckp.integer_weights)
        item, cap = integer_weights(
            np.array(table.numels, dtype=np.float64)[:, None] * table.storage_bits()[None, :],
            max(float(budget), lo) * float(sum(table.numels)),
        )
        costs, item = _mask_disallowed(costs, item, allowed)
        choice, info = solve_mckp_exact(costs, item, cap, return_info=True)
    else:
        numels = np.array(table.numels, dtype=np.float64)
        item = numels[:, None] * table.storage_bits()[None, :] / numels.sum()  # (N, K) bit share
        costs, item = _mask_disallowed(costs, item, allowed)
        solve = solve_mckp_milp if solver == "milp" else solve_mckp_lagrangian
        choice, info = solve(costs, item, max(float(budget), lo), return_info=True)
    if not allowed[np.arange(len(choice)), choice].all():
        raise RuntimeError("allocation picked an option a layer cannot take")
    config = ModelQuantConfig(
        {n: table.options[k] for n, k in zip(table.names, choice)},
        dict(zip(table.names, table.numels)),
    )
    if config.average_bits() > budget + 1e-9:
        raise RuntimeError(f"allocation exceeds the budget: {config.average_bits()} > {budget}")
    return (config, info) if return_info else config


def _mask_disallowed(
    costs: np.ndarray, item: np.ndarray, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Make every disallowed (layer, option) strictly dominated, so no solver picks it: it weighs
    as much as the layer's heaviest allowed option and costs more than any allowed one. (The
    solvers take finite arrays; the table stores +inf there.)"""
    if allowed.all():
        return costs, item
    costs, item = costs.copy(), item.copy()
    heavy = np.where(allowed, item, item.min()).max(axis=1, keepdims=True)  # (N, 1)
    worst = np.where(allowed, costs, -np.inf).max(axis=1, keepdims=True)  # (N, 1)
    costs = np.where(allowed, costs, worst + np.abs(worst) + 1.0)
    item = np.where(allowed, item, heavy).astype(item.dtype)
    return costs, item


def allocation_path(
    cache_dir: str | Path,
    model_name: str,
    space: QuantSpace,
    table: ErrorTable,
    solver: str,
    budget,
) -> Path:
    """Cache file of one allocation: keyed by model, space, table content, solver and budget."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_") or "model"
    tag = (
        f"{slug}-{space.digest()}-{table.kind}-{table.fingerprint[:12]}-{solver}-{float(budget):g}"
    )
    return Path(cache_dir) / "allocations" / f"alloc-v{ALLOCATION_VERSION}-{tag}.json"


def cached_allocation(
    table: ErrorTable,
    budget: float,
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    solver: str = "exact",
) -> tuple[ModelQuantConfig, SolveInfo]:
    """``allocate(None, budget, space, table, solver)`` through a checksummed, locked disk cache.

    Two runs missing the same entry at once solve it once (the second reads the first's file);
    a corrupt or stale file is reported (warning naming it) and rewritten; an unwritable cache
    warns and returns the fresh allocation. Raises ``ValueError`` for unreachable budgets.
    """

    table = table.restrict(space)

    def compute() -> dict:
        config, info = allocate(None, budget, space, table=table, solver=solver, return_info=True)
        return {
            "version": ALLOCATION_VERSION,
            "budget": float(budget),
            "solver": solver,
            "table_fingerprint": table.fingerprint,
            "solve": info.to_dict(),
            "config": config.to_dict(),
        }

    def decode(payload: bytes) -> tuple[ModelQuantConfig, SolveInfo]:
        d = json_value(payload)
        if d.get("version") != ALLOCATION_VERSION or d.get("budget") != float(budget):
            raise ValueError("it is for another version or budget")
        if d.get("table_fingerprint") != table.fingerprint or d.get("solver") != solver:
            raise ValueError("it was computed from another error table or solver")
        config = ModelQuantConfig.from_dict(d["config"], "cached allocation")
        config.validate_names(table.names)
        if config.average_bits() > float(budget) + 1e-9:
            raise ValueError(f"its average bits {config.average_bits():.4f} exceed the budget")
        return config, SolveInfo.from_dict(d["solve"])

    if cache_dir is None:
        return decode(json_bytes(compute()))
    path = allocation_path(cache_dir, model_name, space, table, solver, budget)
    return get_or_compute(path, compute, json_bytes, decode, what="allocation")


def cached_allocations(
    table: ErrorTable,
    budgets: list[float],
    space: QuantSpace,
    cache_dir: str | Path | None,
    model_name: str,
    solver: str = "exact",
) -> dict[float, ModelQuantConfig]:
    """:func:`cached_allocation` for each budget (budget -> configuration, in order)."""
    out: dict[float, ModelQuantConfig] = {}
    t0 = time.perf_counter()
    for i, b in enumerate(budgets):
        out[float(b)] = cached_allocation(table, b, space, cache_dir, model_name, solver)[0]
        if len(budgets) > 4 and (i + 1) % 10 == 0:  # pools: a line per 10 allocations
            log.info("allocations: %d/%d (%.0fs)", i + 1, len(budgets), time.perf_counter() - t0)
    return out


__all__ = [
    "ALLOCATION_VERSION",
    "ErrorTable",
    "SolveInfo",
    "allocate",
    "allocation_path",
    "cached_allocation",
    "cached_allocations",
    "build_error_table",
    "cached_error_table",
    "cached_table",
    "integer_weights",
    "prune_dominated",
    "solve_mckp_exact",
    "solve_mckp_lagrangian",
    "solve_mckp_milp",
    "table_path",
    "weights_fingerprint",
]
