"""Budget allocation: one QuantConfig per layer minimising total error under an average-bit budget.

LQ-LoRA's integer program (arXiv 2311.12023): a multiple-choice knapsack (MCKP) with
costs[i, c] = ‖D ⊙ (W_i − Ŵ_i(c))‖²_F (D = √Fisher, or 1) and item weights bits(c)·numel_i.
Solved exactly with ``scipy.optimize.milp`` (HiGHS, sparse constraints) after dominance pruning, or
by a Lagrangian / convex-hull greedy (gap ≤ one hull step of one layer). Error tables
(and their disk cache) live in ``error_table.py``.

The answer depends on the inputs only: the MILP has no wall-clock limit (a loaded machine would
stop it earlier with a worse incumbent) but a branch-and-bound node limit, and the solver's status
and optimality gap are returned with the configuration (:class:`SolveInfo`). Cached allocations are
checksummed and written under a file lock (``coalora.cachefile``), so concurrent runs on an empty
cache compute each allocation once and all read the same one (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
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

log = logging.getLogger(__name__)

SOLVERS = ("milp", "lagrangian")
# Bumped when the solver's settings change what it returns: cached allocations of an older
# version are not reused (version 1 had a 2 s wall-clock limit).
ALLOCATION_VERSION = 2
MILP_NODE_LIMIT = 200_000
MILP_REL_GAP = 1e-9


@dataclass(frozen=True)
class SolveInfo:
    """How an allocation was obtained: ``status`` is ``optimal`` (proven within ``gap``),
    ``node_limit`` (best incumbent when the node limit stopped the search), ``presolved``
    (dominance and reduced-cost fixing left one option per layer), or ``greedy`` (the Lagrangian
    solution: chosen solver, or the MILP's fallback). ``gap`` is (cost − lower bound) / cost."""

    solver: str
    status: str
    gap: float
    cost: float
    bound: float
    nodes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SolveInfo:
        return cls(**{k: d[k] for k in ("solver", "status", "gap", "cost", "bound", "nodes")})


def prune_dominated(costs: np.ndarray, weights: np.ndarray) -> list[np.ndarray]:
    """Per layer, the options no other option beats on both weight and cost, sorted by
    weight ascending (so cost strictly decreasing). Ties keep the lowest index."""
    kept = []
    for c, w in zip(costs, weights):
        order = np.lexsort((np.arange(len(c)), c, w))  # by weight, then cost, then index
        cs = c[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], cs[:-1]]))
        kept.append(order[cs < best_before])
    return kept


def _as_arrays(costs, weights) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs.cpu() if isinstance(costs, Tensor) else costs, dtype=np.float64)
    w = np.asarray(weights.cpu() if isinstance(weights, Tensor) else weights, dtype=np.float64)
    if c.shape != w.shape or c.ndim != 2:
        raise ValueError(f"costs {c.shape} and weights {w.shape} must be the same (N, K)")
    return c, w


def _check_capacity(w: np.ndarray, capacity: float) -> None:
    lo = w.min(axis=1).sum()
    if capacity < lo * (1 - 1e-12):
        raise ValueError(f"capacity {capacity} is below the minimum achievable {lo}")


@contextlib.contextmanager
def _quiet_native_stdout():
    """Send file descriptor 1 to /dev/null for the duration (C/C++ writes bypass ``sys.stdout``)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real fd 1 (embedded interpreters): leave output alone
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def solve_mckp_milp(
    costs,
    weights,
    capacity: float,
    node_limit: int = MILP_NODE_LIMIT,
    mip_rel_gap: float = MILP_REL_GAP,
    return_info: bool = False,
):
    """Exact MCKP via ``scipy.optimize.milp`` (HiGHS): min Σ c x s.t. Σ w x ≤ capacity, one option
    per row. ``costs``/``weights`` are (N, K); returns the chosen column per row, int64 (N,), and
    with ``return_info`` also a :class:`SolveInfo`. Dominance pruning and reduced-cost fixing from
    the Lagrangian bound shrink the problem first; both are exact. The search stops on proven
    optimality (relative gap ``mip_rel_gap``) or after ``node_limit`` branch-and-bound nodes,
    never on time, so the answer is the same on an idle and on a loaded machine."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    c, w = _as_arrays(costs, weights)
    _check_capacity(w, capacity)
    kept = prune_dominated(c, w)
    # Reduced-cost fixing (exact): for λ ≥ 0 and any feasible x, cost(x) ≥ LB + Σ_i excess_i(x_i)
    # with LB = Σ_i min_k (c + λw)_ik − λ·capacity and excess = (c + λw)_ik − min_k (c + λw)_ik.
    # An option whose excess exceeds UB − LB (UB: the greedy solution's cost) is never optimal.
    greedy, lam = _lagrangian(c, w, capacity, kept)
    n = len(kept)
    rows_n = np.arange(n)
    upper = c[rows_n, greedy].sum()
    lagr = c + lam * w  # (N, K)
    best = lagr.min(axis=1)
    lower = float(best.sum() - lam * capacity)
    slack = (upper - lower) * (1 + 1e-9) + 1e-12 * abs(upper)
    kept = [k[lagr[i, k] - best[i] <= slack] for i, k in enumerate(kept)]

    def done(choice: np.ndarray, status: str, bound: float, nodes: int = 0):
        cost = float(c[rows_n, choice].sum())
        gap = max(0.0, (cost - bound) / cost) if cost > 0 else 0.0
        info = SolveInfo("milp", status, gap, cost, float(bound), int(nodes))
        return (choice, info) if return_info else choice

    if all(len(k) == 1 for k in kept):
        return done(np.array([k[0] for k in kept]), "presolved", float(upper))
    rows = np.repeat(np.arange(len(kept)), [len(k) for k in kept])  # (V,) row of each variable
    cols = np.concatenate(kept)  # (V,) option of each variable
    cv, wv = c[rows, cols], w[rows, cols]
    scale = (np.linalg.norm(cv) or 1.0) / 1000.0  # LQ-LoRA normalises costs; only conditioning
    A_eq = csr_array(
        (np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(len(kept), len(rows))
    )
    A_w = csr_array(wv[None, :])
    cap = capacity
    tol = 1e-12 * max(1.0, abs(capacity))
    options = {"node_limit": int(node_limit), "mip_rel_gap": float(mip_rel_gap), "disp": False}
    for _ in range(3):
        with _quiet_native_stdout():  # HiGHS prints debug lines from C++ even with disp=False
            res = milp(
                cv / scale,
                integrality=np.ones(len(rows)),
                bounds=Bounds(0, 1),
                constraints=[
                    LinearConstraint(A_w, -np.inf, cap),
                    LinearConstraint(A_eq, 1, 1),
                ],
                options=options,
            )
        if res.x is None:
            raise RuntimeError(f"MILP found no solution: {res.message}")
        choice = np.array([cols[rows == i][np.argmax(res.x[rows == i])] for i in range(len(kept))])
        used = w[rows_n, choice].sum()
        if used <= capacity + tol:  # tol: rounding of the sum, far below any option's step
            nodes = int(getattr(res, "mip_node_count", 0) or 0)
            dual = getattr(res, "mip_dual_bound", None)
            bound = max(lower, float(dual) * scale) if dual is not None else lower
            if c[rows_n, choice].sum() > upper:
                return done(greedy, "greedy", bound, nodes)
            return done(choice, "optimal" if res.status == 0 else "node_limit", bound, nodes)
        cap -= max(1.5 * (used - capacity), tol)  # within HiGHS' tolerance: tighten, re-solve
    return done(greedy, "greedy", lower)


def _lower_hull(wk: np.ndarray, ck: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of points sorted by w ascending, c strictly decreasing."""
    hull: list[int] = []
    for j in range(len(wk)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> j
            if (ck[b] - ck[a]) * (wk[j] - wk[a]) >= (ck[j] - ck[a]) * (wk[b] - wk[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return np.array(hull)


def solve_mckp_lagrangian(
    costs, weights, capacity: float, iters: int = 100, return_info: bool = False
):
    """Lagrangian MCKP: bisection on λ for argmin_c c + λ·w per row until the capacity is
    just met, then greedy upgrades along each row's lower convex hull, best Δcost/Δweight first.
    Returns the chosen column per row, int64 (N,) (and a :class:`SolveInfo` with
    ``return_info``; its bound is the Lagrangian dual). The gap is at most one hull step."""
    c, w = _as_arrays(costs, weights)
    _check_capacity(w, capacity)
    choice, lam = _lagrangian(c, w, capacity, prune_dominated(c, w), iters)
    if not return_info:
        return choice
    cost = float(c[np.arange(len(c)), choice].sum())
    bound = float((c + lam * w).min(axis=1).sum() - lam * capacity)
    gap = max(0.0, (cost - bound) / cost) if cost > 0 else 0.0
    return choice, SolveInfo("lagrangian", "greedy", gap, cost, bound)


def _lagrangian(
    c: np.ndarray, w: np.ndarray, capacity: float, kept: list[np.ndarray], iters: int = 100
) -> tuple[np.ndarray, float]:
    """(greedy choice, multiplier λ of the bisection's feasible end)."""
    hulls = []
    for i, k in enumerate(kept):
        hulls.append(k[_lower_hull(w[i, k], c[i, k])])
    L = max(len(h) for h in hulls)
    HW = np.full((len(hulls), L), np.inf)  # (N, L) hull weights, inf-padded
    HC = np.full((len(hulls), L), np.inf)
    for i, h in enumerate(hulls):
        HW[i, : len(h)], HC[i, : len(h)] = w[i, h], c[i, h]
    rows = np.arange(len(hulls))

    HW0 = np.where(np.isfinite(HW), HW, 0.0)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(HC + lam * HW0, axis=1)  # padding stays inf; first (lightest) on ties

    def used(p: np.ndarray) -> float:
        return HW[rows, p].sum()

    lo, hi = 0.0, 1.0
    if used(pick(lo)) > capacity:
        while used(pick(hi)) > capacity:
            hi *= 2.0
            if hi > 1e300:
                raise ValueError(f"capacity {capacity} is below the minimum achievable")
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if used(pick(mid)) <= capacity else (mid, hi)
        p, lam = pick(hi), hi
    else:
        p, lam = pick(lo), lo
    total = used(p)
    heap = []
    for i in rows:
        if p[i] + 1 < len(hulls[i]):
            j = p[i]
            heapq.heappush(heap, (-(HC[i, j] - HC[i, j + 1]) / (HW[i, j + 1] - HW[i, j]), int(i)))
    while heap:
        _, i = heapq.heappop(heap)
        j = p[i]
        dw = HW[i, j + 1] - HW[i, j]
        if total + dw > capacity:
            continue  # this row cannot move further up its hull
        p[i], total = j + 1, total + dw
        if j + 2 < len(hulls[i]):
            heapq.heappush(
                heap, (-(HC[i, j + 1] - HC[i, j + 2]) / (HW[i, j + 2] - HW[i, j + 1]), int(i))
            )
    return np.array([hulls[i][p[i]] for i in rows]), lam


def allocate(
    weights: Mapping[str, Tensor] | None,
    budget: float,
    space: QuantSpace | None = None,
    table: ErrorTable | None = None,
    solver: str = "milp",
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
    numels = np.array(table.numels, dtype=np.float64)
    item = (
        numels[:, None] * table.storage_bits()[None, :] / numels.sum()
    )  # (N, K) average-bit share
    solve = solve_mckp_milp if solver == "milp" else solve_mckp_lagrangian
    choice, info = solve(table.costs.numpy(), item, max(float(budget), lo), return_info=True)
    config = ModelQuantConfig(
        {n: table.options[k] for n, k in zip(table.names, choice)},
        dict(zip(table.names, table.numels)),
    )
    if config.average_bits() > budget + 1e-9:
        raise RuntimeError(f"allocation exceeds the budget: {config.average_bits()} > {budget}")
    return (config, info) if return_info else config


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
    solver: str = "milp",
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
    solver: str = "milp",
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
    "prune_dominated",
    "solve_mckp_lagrangian",
    "solve_mckp_milp",
    "table_path",
    "weights_fingerprint",
]
