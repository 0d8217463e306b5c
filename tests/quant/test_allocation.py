"""Budget allocation (LQ-LoRA's MCKP, arXiv 2311.12023): exact MILP, Lagrangian fallback, error tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import coalora.quant.error_table as error_table
from coalora.quant import (
    ErrorTable,
    QuantSpace,
    allocate,
    build_error_table,
    cached_error_table,
    fake_quantize,
    prune_dominated,
    solve_mckp_lagrangian,
    solve_mckp_milp,
)

SMALL = QuantSpace(bits=[2, 3, 4], bits0=[8], dtype1=["bf16", "fp32"], block0=[16, 64], block1=[16])


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"layer{i}.w": torch.randn(32 * (i + 1), 64, generator=g) * 0.05 * (i + 1) for i in range(3)
    }


@pytest.fixture(scope="module")
def table(weights) -> ErrorTable:
    return build_error_table(weights, SMALL)


def brute_force(table: ErrorTable, budget: float) -> float:
    bits = table.storage_bits()
    numels = np.array(table.numels, dtype=float)
    costs = table.costs.numpy()
    best = np.inf
    for combo in itertools.product(range(len(table.options)), repeat=len(table.names)):
        if (bits[list(combo)] * numels).sum() / numels.sum() <= budget:
            best = min(best, sum(costs[i, k] for i, k in enumerate(combo)))
    return best


def total_cost(table: ErrorTable, config) -> float:
    return sum(
        table.costs[i, table.options.index(config[n])].item() for i, n in enumerate(table.names)
    )


def test_table_costs_are_squared_frobenius(weights, table):
    assert table.costs.shape == (3, len(SMALL)) and table.kind == "mse"
    W = weights["layer1.w"]
    qc = SMALL.options()[4]
    assert table.costs[1, 4].item() == pytest.approx(
        (W - fake_quantize(W, qc)).square().sum().item(), rel=1e-5
    )


@pytest.mark.parametrize("budget", [2.2, 2.6, 3.0, 3.3, 3.9, 4.5])
def test_milp_equals_brute_force(weights, table, budget):
    config = allocate(weights, budget, SMALL, table=table, solver="milp")
    assert config.average_bits() <= budget
    assert total_cost(table, config) == pytest.approx(brute_force(table, budget), rel=1e-9)


@pytest.mark.parametrize("budget", [2.6, 3.3, 3.9])
def test_lagrangian_feasible_and_near_optimal(weights, table, budget):
    config = allocate(weights, budget, SMALL, table=table, solver="lagrangian")
    assert config.average_bits() <= budget
    assert total_cost(table, config) >= brute_force(table, budget) * (1 - 1e-12)


def test_lagrangian_within_tolerance_on_many_layers():
    rng = np.random.default_rng(0)
    space = QuantSpace(bits0=[2, 8], dtype1=["bf16", "fp32"])
    bits = np.array([qc.storage_bits() for qc in space.options()])
    n = 30
    numels = rng.integers(1, 5, size=n) * 4096.0
    sens = rng.lognormal(size=(n, 1))
    costs = (
        sens
        * numels[:, None]
        * 4.0 ** (-bits[None, :])
        * rng.uniform(0.8, 1.2, size=(n, len(bits)))
    )
    w = numels[:, None] * bits[None, :] / numels.sum()
    for budget in (2.5, 3.5):
        exact = solve_mckp_milp(costs, w, budget)
        approx = solve_mckp_lagrangian(costs, w, budget)
        rows = np.arange(n)
        assert w[rows, approx].sum() <= budget and w[rows, exact].sum() <= budget
        c_exact, c_approx = costs[rows, exact].sum(), costs[rows, approx].sum()
        assert c_exact <= c_approx * (1 + 1e-9)
        assert c_approx <= c_exact * 1.02


def test_prune_keeps_the_pareto_set():
    costs = np.array([[5.0, 4.0, 4.0, 1.0, 2.0]])
    w = np.array([[1.0, 2.0, 2.0, 3.0, 3.0]])
    assert prune_dominated(costs, w)[0].tolist() == [0, 1, 3]


@pytest.mark.parametrize("budget", [1.0, 9.0])
def test_infeasible_budget_names_both_numbers(weights, table, budget):
    lo, hi = table.min_average_bits(), table.max_average_bits()
    with pytest.raises(ValueError, match=rf"min achievable {lo:.4f}, max achievable {hi:.4f}"):
        allocate(weights, budget, SMALL, table=table)


def test_budget_at_the_bounds(weights, table):
    lo, hi = table.min_average_bits(), table.max_average_bits()
    assert allocate(weights, lo, SMALL, table=table).average_bits() == pytest.approx(lo)
    assert allocate(weights, hi, SMALL, table=table, solver="lagrangian").average_bits() <= hi


def test_bad_solver_and_mismatched_table(weights, table):
    with pytest.raises(ValueError, match=r"quant.solver='gurobi' is not allowed"):
        allocate(weights, 3.0, SMALL, table=table, solver="gurobi")
    with pytest.raises(ValueError, match="missing"):
        allocate({**weights, "extra": torch.ones(4, 4)}, 3.0, SMALL, table=table)


def test_table_restrict_to_smaller_space(weights, table):
    sub = QuantSpace(bits=[2, 4], bits0=[8], dtype1=["fp32"], block0=[64], block1=[16])
    small = table.restrict(sub)
    assert small.options == sub.options()
    assert torch.equal(small.costs[:, 1], table.costs[:, table.options.index(sub.options()[1])])
    with pytest.raises(ValueError, match="lacks"):
        table.restrict(QuantSpace(bits=[8], bits0=[8], dtype1=["fp32"], block0=[64], block1=[16]))


def test_fisher_weighted_table(weights):
    fisher = {n: torch.rand_like(w) for n, w in weights.items()}
    t = build_error_table(weights, SMALL, fisher=fisher)
    assert t.kind == "fisher"
    W, F = weights["layer0.w"], fisher["layer0.w"]
    qc = SMALL.options()[0]
    assert t.costs[0, 0].item() == pytest.approx(
        ((W - fake_quantize(W, qc)).square() * F).sum().item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="fisher has no entry"):
        build_error_table(weights, SMALL, fisher={})


def test_residual_fn_table(weights):
    t = build_error_table(weights, SMALL, residual_fn=lambda W, qc: torch.zeros_like(W))
    assert t.kind == "custom"
    assert t.costs[2, 3].item() == pytest.approx(
        weights["layer2.w"].square().sum().item(), rel=1e-6
    )


def test_save_load_and_disk_cache(tmp_path, weights, table, monkeypatch):
    path = table.save(tmp_path / "t.safetensors")
    back = ErrorTable.load(path)
    assert (
        back.names == table.names and back.options == table.options and back.numels == table.numels
    )
    assert torch.equal(back.costs, table.costs)

    first = cached_error_table(weights, SMALL, tmp_path, "tiny/model")
    files = list(tmp_path.glob("errors-tiny_model-mse-*.safetensors"))
    assert len(files) == 1 and SMALL.digest() in files[0].name

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(error_table, "build_error_table", boom)
    assert torch.equal(
        cached_error_table(weights, SMALL, tmp_path, "tiny/model").costs, first.costs
    )
    monkeypatch.undo()
    changed = {**weights, "layer0.w": weights["layer0.w"] * 2}
    rebuilt = cached_error_table(changed, SMALL, tmp_path, "tiny/model")  # other weights: rebuild
    assert rebuilt.costs[0, 0] > first.costs[0, 0]


# ------------------------------------------------------------------ solver status, determinism
def test_solvers_report_status_and_gap(weights, table):
    config, info = allocate(weights, 3.0, SMALL, table=table, return_info=True)
    assert info.solver == "exact" and info.status in ("optimal", "presolved")
    assert info.gap <= 1.01e-12 and info.bound <= info.cost  # proven within the pruning tolerance
    assert info.cost == pytest.approx(total_cost(table, config), rel=1e-12)
    config, info = allocate(weights, 3.0, SMALL, table=table, solver="milp", return_info=True)
    assert info.solver == "milp" and info.status in ("optimal", "presolved")
    assert 0.0 <= info.gap <= 1e-6 and info.bound <= info.cost * (1 + 1e-12)
    assert info.cost == pytest.approx(total_cost(table, config), rel=1e-12)
    _, lag = allocate(weights, 3.0, SMALL, table=table, solver="lagrangian", return_info=True)
    assert lag.solver == "lagrangian" and lag.status == "greedy" and lag.bound <= lag.cost


def test_milp_has_no_wall_clock_limit(monkeypatch):
    """The answer may not depend on machine speed: HiGHS gets a node limit, never a time limit."""
    import scipy.optimize

    seen = []
    real = scipy.optimize.milp

    def spy(*a, options=None, **k):
        seen.append(dict(options))
        return real(*a, options=options, **k)

    monkeypatch.setattr(scipy.optimize, "milp", spy)
    rng = np.random.default_rng(1)
    costs = rng.uniform(1, 2, size=(12, 6)) * np.array([32, 16, 8, 4, 2, 1.0])
    w = np.tile(np.array([1, 2, 3, 4, 5, 6.0]), (12, 1)) / 12
    solve_mckp_milp(costs, w, 3.3)
    assert seen and all("time_limit" not in o and o["node_limit"] > 0 for o in seen)


def test_error_table_does_not_depend_on_the_worker_count(monkeypatch):
    g = torch.Generator().manual_seed(1)
    weights = {f"l{i}": torch.randn(64 * (i + 1), 96, generator=g) for i in range(5)}
    tables = []
    for workers in ("1", "2", "3"):
        monkeypatch.setenv("COALORA_TABLE_WORKERS", workers)
        tables.append(build_error_table(weights, SMALL))
    assert all(torch.equal(tables[0].costs, t.costs) for t in tables[1:])
    monkeypatch.setenv("COALORA_TABLE_WORKERS", "zero")
    with pytest.raises(ValueError, match="COALORA_TABLE_WORKERS='zero' must be an integer >= 1"):
        build_error_table(weights, SMALL)


def test_error_table_does_not_depend_on_the_thread_count():
    # large enough for torch to split the sums across threads (small tensors stay serial)
    g = torch.Generator().manual_seed(0)
    weights = {f"l{i}": torch.randn(1536, 384, generator=g) * 0.05 for i in range(2)}
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = build_error_table(weights, SMALL)
        torch.set_num_threads(2)
        two = build_error_table(weights, SMALL)
    finally:
        torch.set_num_threads(torch_threads)
    assert torch.equal(one.costs, two.costs) and one.fingerprint == two.fingerprint
