"""HiGHS (``scipy.optimize.milp``) on the multiple-choice knapsack: the cross-check of the exact
solver (``mckp_exact.py``) and ``quant.solver=milp``. Branch and bound stops on proven optimality
or a node limit, never on time (docs/quantization.md, "Allocation")."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from coalora.quant.mckp import (
    SolveInfo,
    _as_arrays,
    _check_capacity,
    _lagrangian,
    prune_dominated,
)

MILP_NODE_LIMIT = 200_000
MILP_REL_GAP = 1e-9


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


__all__ = ["MILP_NODE_LIMIT", "solve_mckp_milp"]
