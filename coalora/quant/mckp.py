"""Multiple-choice knapsack (MCKP) basics shared by the allocation solvers: choose one option per
row minimising Σ cost subject to Σ weight ≤ capacity (LQ-LoRA's integer program, arXiv 2311.12023
§3.2). Here: :class:`SolveInfo`, dominance pruning, lower convex hulls and the Lagrangian
solver (fast, within one hull step of one row). The exact solver is ``mckp_exact.py`` (the
default), HiGHS is ``mckp_milp.py`` (the cross-check); docs/quantization.md, "The exact solver".
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor


@dataclass(frozen=True)
class SolveInfo:
    """How an allocation was obtained: ``status`` is ``optimal`` (proven within ``gap``),
    ``node_limit`` (best incumbent when the MILP's node limit stopped the search), ``presolved``
    (dominance and reduced-cost fixing left one option per row), or ``greedy`` (the Lagrangian
    solution: chosen solver, or a fallback). ``gap`` is (cost − lower bound) / cost; ``nodes`` is
    the MILP's branch-and-bound nodes or the exact solver's DP states."""

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


def _info(solver: str, status: str, cost: float, bound: float, nodes: int = 0) -> SolveInfo:
    gap = max(0.0, (cost - bound) / cost) if cost > 0 else 0.0
    return SolveInfo(solver, status, gap, float(cost), float(bound), int(nodes))


def _as_arrays(costs, weights) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs.cpu() if isinstance(costs, Tensor) else costs, dtype=np.float64)
    w = np.asarray(weights.cpu() if isinstance(weights, Tensor) else weights, dtype=np.float64)
    if c.shape != w.shape or c.ndim != 2:
        raise ValueError(f"costs {c.shape} and weights {w.shape} must be the same (N, K)")
    if not np.isfinite(c).all() or not np.isfinite(w).all():
        raise ValueError("costs and weights must be finite")
    return c, w


def _check_capacity(w: np.ndarray, capacity: float) -> None:
    lo = w.min(axis=1).sum()
    if capacity < lo * (1 - 1e-12):
        raise ValueError(f"capacity {capacity} is below the minimum achievable {lo}")


def prune_dominated(costs: np.ndarray, weights: np.ndarray) -> list[np.ndarray]:
    """Per row, the options no other option beats on both weight and cost, sorted by
    weight ascending (so cost strictly decreasing). Ties keep the lowest index."""
    kept = []
    for c, w in zip(costs, weights):
        order = np.lexsort((np.arange(len(c)), c, w))  # by weight, then cost, then index
        cs = c[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], cs[:-1]]))
        kept.append(order[cs < best_before])
    return kept


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


__all__ = ["SolveInfo", "prune_dominated", "solve_mckp_lagrangian"]
