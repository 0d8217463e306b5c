"""The exact multiple-choice knapsack solver for budget allocation (LQ-LoRA's integer program,
arXiv 2311.12023 §3.2): choose one option per row minimising Σ cost subject to Σ weight ≤ capacity.

``solve_mckp_exact`` is the default: an exact algorithm whose answer is proven optimal by
construction and does not depend on the machine's speed or thread count (docs/quantization.md,
"The exact solver"):

1. *Dominance*: per row, options that are heavier and not cheaper than another option go.
2. *LP relaxation*: the lower convex hull of every row; its increments taken best efficiency first
   give the LP optimum (at most one fractional row), a Lagrange multiplier λ, a lower bound LB,
   and, completed greedily, a feasible upper bound UB.
3. *Reduced-cost fixing*: an option whose reduced cost (c + λw) − min_k (c + λw) exceeds UB − LB
   cannot be in a solution better than UB; most rows keep a single option.
4. *Bounded dynamic programming* over the rows left free, with exact integer weights: the states
   are the Pareto-optimal (weight, cost) pairs of the rows so far; a state is dropped when it
   cannot fit the lightest completion or when its cost plus the LP bound of the remaining rows at
   the remaining capacity cannot beat UB. What survives the last row contains an optimum.

Everything is exact integer arithmetic on the weights; costs are float64, and a state is pruned only
when its bound is at least UB − 1e-12·|UB|, so ties closer than that may resolve either way (the
returned cost is optimal to that tolerance).
"""

from __future__ import annotations

import heapq
from fractions import Fraction
from math import lcm

import numpy as np
from torch import Tensor

from coalora.quant.mckp import (
    SolveInfo,
    _as_arrays,
    _check_capacity,
    _info,
    _lower_hull,
    prune_dominated,
)
from coalora.quant.mckp_milp import solve_mckp_milp

# Pruning tolerance of the exact solver, relative to the incumbent cost.
EXACT_REL_TOL = 1e-12
# Safety valve: more live states than this at one row means the instance is far harder than any
# allocation seen here; the exact solver then hands over to HiGHS (and says so in SolveInfo).
EXACT_MAX_STATES = 4_000_000


def integer_weights(weights, capacity: float) -> tuple[np.ndarray, int]:
    """Exact integer form of (weights, capacity): every float is a dyadic rational, so one common
    power-of-two scale makes all weights integers; the capacity is floored on that scale.
    Raises ``ValueError`` when the scaled weights would not fit in int64."""
    w = np.asarray(weights.cpu() if isinstance(weights, Tensor) else weights, dtype=np.float64)
    den = 1
    for v in np.unique(w):  # floats are dyadic: every denominator is a power of two
        den = lcm(den, Fraction(float(v)).denominator)
    scaled = w * float(den)  # exact: scaling by a power of two
    if np.abs(scaled).max(initial=0.0) * max(w.shape[0], 1) >= 2.0**62:
        raise ValueError("weights are too fine-grained for exact integer arithmetic")
    wi = scaled.astype(np.int64)
    if not np.array_equal(wi.astype(np.float64), scaled):
        raise ValueError("weights could not be scaled to exact integers")
    cap = Fraction(float(capacity)) * den
    return wi, int(cap.numerator // cap.denominator)


class _SuffixBound:
    """LP relaxation value of rows ``j..`` (DP order) as a function of their capacity.

    For each suffix: the weight and cost of the lightest option of every row, then the hull
    increments of those rows sorted by efficiency (Δcost/Δweight, most negative first). Taking
    increments in that order, the last one fractionally, is the LP optimum (Sinha & Zoltners)."""

    def __init__(self, hulls_w: list[np.ndarray], hulls_c: list[np.ndarray]) -> None:
        n = len(hulls_w)
        self.w0 = np.zeros(n + 1, dtype=np.int64)
        self.c0 = np.zeros(n + 1)
        self.cum_w: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (n + 1)
        self.cum_c: list[np.ndarray] = [np.zeros(0)] * (n + 1)
        self.slope: list[np.ndarray] = [np.zeros(0)] * (n + 1)
        dw = np.zeros(0, dtype=np.int64)
        dc = np.zeros(0)
        for j in range(n - 1, -1, -1):
            hw, hc = hulls_w[j], hulls_c[j]
            self.w0[j] = self.w0[j + 1] + hw[0]
            self.c0[j] = self.c0[j + 1] + hc[0]
            dw = np.concatenate([dw, np.diff(hw)])
            dc = np.concatenate([dc, np.diff(hc)])
            order = np.argsort(dc / dw, kind="stable")  # most negative slope first
            dw, dc = dw[order], dc[order]
            self.cum_w[j] = self.w0[j] + np.cumsum(dw)
            self.cum_c[j] = self.c0[j] + np.cumsum(dc)
            self.slope[j] = dc / dw

    def __call__(self, j: int, remaining: np.ndarray) -> np.ndarray:
        """LP lower bound of rows ``j..`` for each remaining capacity (inf where infeasible)."""
        cw, cc, sl = self.cum_w[j], self.cum_c[j], self.slope[j]
        out = np.full(remaining.shape, np.inf)
        ok = remaining >= self.w0[j]
        r = remaining[ok]
        if len(cw) == 0:
            out[ok] = self.c0[j]
            return out
        k = np.searchsorted(cw, r, side="right")  # increments taken in full
        base_w = np.where(k > 0, cw[np.maximum(k - 1, 0)], self.w0[j])
        base_c = np.where(k > 0, cc[np.maximum(k - 1, 0)], self.c0[j])
        frac = np.where(k < len(cw), sl[np.minimum(k, len(cw) - 1)], 0.0)
        out[ok] = base_c + (r - base_w).astype(np.float64) * frac
        return out


def _lp_and_greedy(
    c: np.ndarray, w: np.ndarray, capacity: int, hulls: list[np.ndarray]
) -> tuple[np.ndarray, float, float]:
    """(greedy feasible choice, λ, LP lower bound) from the rows' hulls.

    The LP takes hull increments best efficiency first; λ = −slope of the first increment that does
    not fit (0 when all fit). The greedy integer solution continues with every later increment
    that still fits, row by row in hull order."""
    n = len(hulls)
    pos = np.zeros(n, dtype=np.int64)  # position on each row's hull
    used = int(sum(w[i, h[0]] for i, h in enumerate(hulls)))
    lp = float(sum(c[i, h[0]] for i, h in enumerate(hulls)))
    heap = []
    for i, h in enumerate(hulls):
        if len(h) > 1:
            heapq.heappush(heap, ((c[i, h[1]] - c[i, h[0]]) / (w[i, h[1]] - w[i, h[0]]), i))
    lam, lp_done = 0.0, False
    while heap:
        slope, i = heapq.heappop(heap)
        h, j = hulls[i], pos[i]
        dw = int(w[i, h[j + 1]] - w[i, h[j]])
        dc = float(c[i, h[j + 1]] - c[i, h[j]])
        if used + dw > capacity:
            if not lp_done:  # the LP's fractional increment fixes λ and the bound
                lp += dc * (capacity - used) / dw
                lam, lp_done = -slope, True
            continue  # this row cannot move further up its hull
        used += dw
        pos[i] = j + 1
        if not lp_done:
            lp += dc
        if j + 2 < len(h):
            nxt = (c[i, h[j + 2]] - c[i, h[j + 1]]) / (w[i, h[j + 2]] - w[i, h[j + 1]])
            heapq.heappush(heap, (nxt, i))
    choice = np.array([hulls[i][pos[i]] for i in range(n)], dtype=np.int64)
    return choice, lam, lp


def solve_mckp_exact(
    costs,
    weights,
    capacity: float,
    return_info: bool = False,
    max_states: int = EXACT_MAX_STATES,
):
    """Exact MCKP (module docstring): min Σ c x s.t. Σ w x ≤ capacity, one option per row.

    ``costs``/``weights`` are (N, K) arrays; weights are made exact integers by
    :func:`integer_weights` (pass integers to avoid any rescaling). Returns the chosen column per
    row, int64 (N,), and with ``return_info`` a :class:`SolveInfo` with status ``optimal`` (or
    ``presolved`` when fixing alone decided every row) and ``bound == cost``. The work is
    deterministic: the same inputs give the same answer on any machine and thread count."""
    c, wf = _as_arrays(costs, weights)
    _check_capacity(wf, capacity)
    w, cap = integer_weights(wf, capacity)
    if int(w.min(axis=1).sum()) > cap:  # only within the float tolerance of _check_capacity
        cap = int(w.min(axis=1).sum())
    n = len(c)
    rows_n = np.arange(n)
    kept = prune_dominated(c, w)
    hulls = [k[_lower_hull(w[i, k], c[i, k])] for i, k in enumerate(kept)]
    greedy, lam, lp = _lp_and_greedy(c, w, cap, hulls)
    upper = float(c[rows_n, greedy].sum())
    tol = EXACT_REL_TOL * max(abs(upper), 1e-300)

    def done(choice: np.ndarray, status: str, nodes: int):
        cost = float(c[rows_n, choice].sum())
        info = _info("exact", status, cost, min(cost, max(lp, cost - tol)), nodes)
        return (choice, info) if return_info else choice

    # Reduced-cost fixing: cost(x) ≥ LB + Σ_i rc_i(x_i) for every feasible x, LB the LP value.
    lagr = c + lam * w.astype(np.float64)  # (N, K)
    best = np.array([lagr[i, k].min() for i, k in enumerate(kept)])
    slack = upper - lp + tol + 1e-12 * np.abs(lagr).max()
    kept = [k[lagr[i, k] - best[i] <= slack] for i, k in enumerate(kept)]
    free = [i for i, k in enumerate(kept) if len(k) > 1]
    if not free:
        choice = np.array([k[0] for k in kept], dtype=np.int64)
        if w[rows_n, choice].sum() <= cap and c[rows_n, choice].sum() <= upper:
            return done(choice, "presolved", 0)
        return done(greedy, "presolved", 0)
    fixed = [i for i in range(n) if len(kept[i]) == 1]
    fixed_w = int(sum(w[i, kept[i][0]] for i in fixed))
    fixed_c = float(sum(c[i, kept[i][0]] for i in fixed))
    # Rows with the widest weight spread first: the state set grows where the bound is weakest
    # last, and the suffix bound is tight for the many nearly-fixed rows at the end.
    spread = [int(w[i, kept[i]].max() - w[i, kept[i]].min()) for i in free]
    free = [free[t] for t in sorted(range(len(free)), key=lambda t: (-spread[t], free[t]))]
    opts_w = [w[i, kept[i]] for i in free]
    opts_c = [c[i, kept[i]] for i in free]
    sub_hulls = [_lower_hull(ow, oc) for ow, oc in zip(opts_w, opts_c)]
    bound = _SuffixBound(
        [ow[h] for ow, h in zip(opts_w, sub_hulls)], [oc[h] for oc, h in zip(opts_c, sub_hulls)]
    )

    state_w = np.array([fixed_w], dtype=np.int64)
    state_c = np.array([fixed_c])
    parents: list[tuple[np.ndarray, np.ndarray]] = []
    nodes = 0
    for j in range(len(free)):
        ow, oc = opts_w[j], opts_c[j]
        cand_w = (state_w[:, None] + ow[None, :]).ravel()  # (S·K,)
        cand_c = (state_c[:, None] + oc[None, :]).ravel()
        remaining = cap - cand_w
        lb = cand_c + bound(j + 1, remaining)
        alive = np.flatnonzero(lb < upper - tol)
        if len(alive) == 0:
            return done(greedy, "optimal", nodes)  # nothing beats the incumbent: it is optimal
        cw, cc = cand_w[alive], cand_c[alive]
        order = np.lexsort((alive, cc, cw))  # weight, then cost, then candidate index
        cw, cc, alive = cw[order], cc[order], alive[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], cc[:-1]]))
        pareto = cc < best_before
        state_w, state_c, alive = cw[pareto], cc[pareto], alive[pareto]
        nodes += len(state_w)
        if len(state_w) > max_states:
            choice, info = solve_mckp_milp(c, wf, capacity, return_info=True)
            info = SolveInfo("exact>milp", info.status, info.gap, info.cost, info.bound, info.nodes)
            return (choice, info) if return_info else choice
        k = len(ow)
        parents.append((alive // k, alive % k))
    s = int(np.argmin(state_c))  # lowest cost; ties: the lightest (states sorted by weight)
    choice = np.array([k[0] for k in kept], dtype=np.int64)
    for j in range(len(free) - 1, -1, -1):
        parent, option = parents[j]
        choice[free[j]] = kept[free[j]][option[s]]
        s = int(parent[s])
    return done(choice, "optimal", nodes)


__all__ = ["integer_weights", "solve_mckp_exact"]
