"""GP fitting, acquisition construction and the two candidate generators."""

from __future__ import annotations

import torch

from coalora.search.bo import (
    build_acquisition,
    discrete_neighbour_search,
    finite_difference_search,
    fit_models,
    propose_candidates,
)
from coalora.search.pareto import infer_reference


class QuadraticAcq:
    """Stand-in acquisition: -||x - target||^2 on normalised inputs; records call shapes."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target.double()
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, X: torch.Tensor) -> torch.Tensor:  # (B, 1, d) -> (B,)
        self.shapes.append(tuple(X.shape))
        return -((X.squeeze(1) - self.target) ** 2).sum(-1)


def _data(n=12, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 4, (n, d), generator=g)
    Xn = X.double() / 3
    Y = torch.stack([Xn.sum(1) + 2, (1 - Xn[:, :3]).pow(2).sum(1)], 1)  # bits-like, loss-like
    return X, Xn, Y


def test_fit_models_one_kernel_per_objective():
    _, Xn, Y = _data()
    model = fit_models(Xn, Y)
    gp_bits, gp_loss = model.models
    assert gp_bits.covar_module is not gp_loss.covar_module
    assert not torch.equal(gp_bits.covar_module.lengthscale, gp_loss.covar_module.lengthscale)
    assert gp_bits.train_inputs[0].dtype == torch.float64
    assert type(gp_bits.outcome_transform).__name__ == "Standardize"
    # the GPs model the minimised objectives as given (no negation inside the models)
    mean = model.posterior(Xn[:3]).mean
    assert torch.allclose(mean, Y[:3], atol=0.5)


def test_acquisition_reference_from_data():
    _, Xn, Y = _data()
    acq = build_acquisition(fit_models(Xn, Y), Xn, Y, mc_samples=16)
    # the reference point in BoTorch's maximisation space is -infer_reference(Y), never [0, 0]
    assert torch.allclose(acq.ref_point, -infer_reference(Y))
    assert not torch.equal(acq.ref_point, torch.zeros(2, dtype=acq.ref_point.dtype))
    vals = acq(Xn[:4].unsqueeze(1))
    assert vals.shape == (4,) and torch.isfinite(vals).all()


def test_finite_difference_search_climbs_and_stops():
    d = 6
    bounds = torch.stack([torch.zeros(d, dtype=torch.long), torch.tensor([3, 3, 2, 2, 2, 3])])
    target_int = torch.tensor([3, 0, 1, 2, 0, 2])
    acq = QuadraticAcq(target_int.double() / bounds[1])
    x0 = torch.tensor([0, 3, 2, 0, 2, 2])
    x, value, steps = finite_difference_search(acq, x0, bounds, max_steps=50)
    assert x.tolist() == target_int.tolist()  # reaches the optimum ...
    assert steps == int((target_int - x0).abs().sum())  # ... one improving move per step ...
    assert value == 0.0
    # ... and stops there: the last call saw no improving neighbour. One call per step, all
    # valid ±1 neighbours batched as q=1 t-batches.
    assert len(acq.shapes) == 1 + steps + 1
    assert all(s[1:] == (1, d) and s[0] <= 2 * d for s in acq.shapes[1:])


def test_finite_difference_search_stays_in_bounds():
    bounds = torch.stack([torch.zeros(3, dtype=torch.long), torch.full((3,), 2)])
    acq = QuadraticAcq(torch.tensor([5.0, -5.0, 5.0]))  # optimum outside the box
    x, _, _ = finite_difference_search(acq, torch.tensor([1, 1, 1]), bounds, max_steps=20)
    assert x.tolist() == [2, 0, 2]


def test_discrete_neighbour_search_avoids_observed():
    X, _, _ = _data(n=5)
    bounds = torch.stack([torch.zeros(6, dtype=torch.long), torch.full((6,), 3)])
    acq = QuadraticAcq(torch.ones(6, dtype=torch.float64))
    cand, vals = discrete_neighbour_search(acq, X, bounds, n_samples=200, n_pick=1, X_avoid=X)
    assert cand.shape == (1, 6) and vals.shape == (1,)
    assert tuple(cand[0].tolist()) not in {tuple(r) for r in X.tolist()}
    assert bool((cand >= 0).all() and (cand <= 3).all())
    diff = (cand[0] != X).sum(1).min()
    assert 1 <= diff <= 3  # a k-coordinate mutation of an observed point, k <= 3


def test_propose_candidates_are_new_and_unique():
    X, Xn, Y = _data()
    bounds = torch.stack([torch.zeros(6, dtype=torch.long), torch.full((6,), 3)])
    acq = build_acquisition(fit_models(Xn, Y), Xn, Y, mc_samples=16)
    for method in ("finite_difference", "discrete", "both"):
        cand, labels = propose_candidates(acq, X, Y, bounds, 3, method=method, max_steps=3)
        keys = [tuple(r) for r in cand.tolist()]
        assert len(keys) == len(set(keys)) == len(labels) >= 1
        assert not set(keys) & {tuple(r) for r in X.tolist()}


def test_fit_failure_keeps_prior(monkeypatch, caplog):
    import coalora.search.bo as bo

    def boom(*args, **kwargs):
        raise RuntimeError("cholesky failed")

    monkeypatch.setattr(bo, "fit_gpytorch_mll", boom)
    _, Xn, Y = _data()
    model = fit_models(Xn, Y)
    assert len(model.models) == 2 and "keeping prior hyperparameters" in caplog.text
    assert torch.isfinite(model.posterior(Xn[:2]).mean).all()
