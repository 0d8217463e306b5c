"""Bayesian optimisation for the Pareto configuration search (CoA-LoRA, arXiv 2509.25214 §4.3; docs/search.md).

* `fit_models`: one BoTorch ``SingleTaskGP`` per objective, each with its OWN kernel (the reference
  code shared one kernel object between both GPs, so fitting the second overwrote the first),
  inputs normalised by the fixed option bounds, ``Standardize(m=1)`` outcomes, float64.
* `build_acquisition`: qLogNEHVI (fallback qLogEHVI) with a reference point inferred from the data
  (never [0, 0], which would make every loss "dominated").
* `finite_difference_search`: the paper's finite-difference guided coordinate search, batched (all
  ±1 neighbours in one acquisition call per step) and stopping when no single move improves the
  acquisition (the reference kept moving regardless).
* `discrete_neighbour_search`: mutate observed Pareto points and pick with ``optimize_acqf_discrete``.

coalora MINIMISES every objective (average bits, loss); BoTorch maximises. The only conversion is
`maximisation_objective` (weights -1), applied to MC samples, observed Y and the reference point.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from botorch.acquisition.multi_objective import logei
from botorch.acquisition.multi_objective.logei import (
    qLogExpectedHypervolumeImprovement,
    qLogNoisyExpectedHypervolumeImprovement,
)
from botorch.acquisition.multi_objective.objective import WeightedMCMultiOutputObjective
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.transforms.outcome import Standardize
from botorch.optim.optimize import optimize_acqf_discrete
from botorch.sampling.normal import SobolQMCNormalSampler
from botorch.utils.multi_objective.box_decompositions.non_dominated import (
    FastNondominatedPartitioning,
)
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import Tensor

from coalora.search.encoding import normalize, unnormalize
from coalora.search.pareto import infer_reference, non_dominated_mask

log = logging.getLogger(__name__)
DTYPE = torch.float64


def _configure_fused_kernel() -> None:
    """``COALORA_LOGEI_FUSED=0`` skips botorch's JIT-compiled qLogEHVI kernel (a ~1 min C++ build
    on first use, cached afterwards) and uses its pure-torch path; tests set it."""
    if os.environ.get("COALORA_LOGEI_FUSED", "1") == "0" and hasattr(logei, "_load_attempted"):
        logei._load_attempted = True


def maximisation_objective(m: int) -> WeightedMCMultiOutputObjective:
    """The single minimise -> maximise conversion: multiply every objective by -1."""
    return WeightedMCMultiOutputObjective(weights=-torch.ones(m, dtype=DTYPE))


def fit_models(X_norm: Tensor, Y: Tensor, max_iter: int = 200) -> ModelListGP:
    """Fit one GP per column of ``Y`` (n, m) on ``X_norm`` (n, d) in [0, 1] (fixed option bounds).

    GPs model the objectives as given (minimised values). A failed fit is logged and the GP keeps
    its prior hyperparameters.
    """
    X = X_norm.to(DTYPE)
    Y = Y.to(DTYPE)
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"fit_models needs X (n, d) and Y (n, m), got {tuple(X.shape)}, {tuple(Y.shape)}"
        )
    if X.numel() and (X.min() < 0 or X.max() > 1):
        raise ValueError("fit_models expects inputs normalised to [0, 1] by the option bounds")
    gps = []
    for j in range(Y.shape[1]):
        # default covar_module is constructed per model: every GP owns its kernel
        gp = SingleTaskGP(X, Y[:, j : j + 1], outcome_transform=Standardize(m=1))
        prior_state = copy.deepcopy(gp.state_dict())
        mll = ExactMarginalLogLikelihood(gp.likelihood, gp)
        try:
            fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": max_iter}})
        except Exception as e:  # any fit failure falls back to the prior
            log.warning("GP fit for objective %d failed (%s); keeping prior hyperparameters", j, e)
            gp.load_state_dict(prior_state)
        gp.eval()
        gps.append(gp)
    return ModelListGP(*gps)


def build_acquisition(
    model: ModelListGP,
    X_baseline: Tensor,
    Y: Tensor,
    ref: Tensor | None = None,
    mc_samples: int = 64,
    seed: int = 0,
):
    """qLogNEHVI over ``X_baseline`` (n, d, normalised) with ``ref`` (minimisation space, default
    inferred from ``Y`` (n, m)). Falls back to qLogEHVI on the observed front if NEHVI fails."""
    _configure_fused_kernel()
    Y = Y.to(DTYPE)
    ref_min = infer_reference(Y) if ref is None else torch.as_tensor(ref, dtype=DTYPE)
    if not bool((Y < ref_min).all(-1).any()):
        raise ValueError(f"reference point {ref_min.tolist()} is not dominated by any observation")
    objective = maximisation_objective(Y.shape[-1])
    ref_max = objective(ref_min)  # (m,)
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([mc_samples]), seed=seed)
    try:
        return qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref_max,
            X_baseline=X_baseline.to(DTYPE),
            sampler=sampler,
            objective=objective,
            prune_baseline=True,
            cache_root=True,
        )
    except Exception as e:
        log.warning("qLogNEHVI construction failed (%s); falling back to qLogEHVI", e)
        Y_max = objective(Y)
        partitioning = FastNondominatedPartitioning(ref_point=ref_max, Y=Y_max)
        return qLogExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref_max,
            partitioning=partitioning,
            sampler=sampler,
            objective=objective,
        )


# t-batches per acquisition call. gpytorch expands the training inputs to every t-batch
# ((B, n_train, d) copies), so one huge call is memory-bound: at d=180, n=100, chunks of 128 ran
# ~2x faster than one (360, 1, d) call (values are identical: the MC base samples are fixed).
ACQ_CHUNK = 128


@torch.no_grad()
def _acq_values(acq, X_int: Tensor, bounds: Tensor) -> Tensor:
    """Acquisition of integer points (B, d) as q=1 t-batches (B, 1, d) -> (B,)."""
    X = normalize(X_int, bounds).unsqueeze(1)  # (B, 1, d)
    return torch.cat([acq(part) for part in X.split(ACQ_CHUNK)])


def finite_difference_search(
    acq, x0: Tensor, bounds: Tensor, max_steps: int
) -> tuple[Tensor, float, int]:
    """Finite-difference guided coordinate ascent on the acquisition from integer ``x0`` (d,).

    Each step evaluates all the current point's ±1 neighbours together (up to 2d q=1 t-batches,
    in chunks of `ACQ_CHUNK`) and computes g_i = (a(x+e_i) - a(x-e_i)) / 2 (one-sided at a
    bound). It moves along argmax |g_i| in the direction sign(g_i) if that improves the
    acquisition, else to the best improving neighbour, and stops when no single move improves it.
    Returns (x, a(x), steps).
    """
    lo, hi = bounds[0], bounds[1]
    d = x0.numel()
    x = x0.clone().long()
    eye = torch.eye(d, dtype=torch.long)
    a0 = _acq_values(acq, x.unsqueeze(0), bounds)[0]
    steps = 0
    for _ in range(max_steps):
        up_ok, down_ok = x < hi, x > lo  # (d,)
        up, down = (x + eye)[up_ok], (x - eye)[down_ok]  # (n_up, d), (n_down, d)
        vals = _acq_values(acq, torch.cat([up, down]), bounds)  # (n_up + n_down,)
        a_up = torch.full((d,), -torch.inf, dtype=vals.dtype)
        a_down = torch.full((d,), -torch.inf, dtype=vals.dtype)
        a_up[up_ok] = vals[: up.shape[0]]
        a_down[down_ok] = vals[up.shape[0] :]
        best_up, best_down = a_up.max(), a_down.max()
        if not bool(torch.maximum(best_up, best_down) > a0):
            break  # local optimum: no single ±1 move improves the acquisition
        g = torch.where(
            up_ok & down_ok,
            (a_up - a_down) / 2,
            torch.where(up_ok, a_up - a0, a0 - a_down),
        )  # (d,)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        i = int(g.abs().argmax())
        step = 1 if g[i] > 0 else -1
        a_new = a_up[i] if step > 0 else a_down[i]
        if not bool(a_new > a0):  # the steepest coordinate's move does not help: best neighbour
            if best_up >= best_down:
                i, step, a_new = int(a_up.argmax()), 1, best_up
            else:
                i, step, a_new = int(a_down.argmax()), -1, best_down
        x[i] += step
        a0 = a_new
        steps += 1
    return x, float(a0), steps


def _row_keys(X: Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in X.long().tolist()}


def mutate(
    parents: Tensor, bounds: Tensor, n_samples: int, max_mutations: int, generator: torch.Generator
) -> Tensor:
    """``n_samples`` random k-coordinate mutations (1 <= k <= max_mutations) of ``parents`` (p, d)."""
    lo, hi = bounds[0], bounds[1]
    d = parents.shape[1]
    card = hi - lo + 1  # (d,)
    rows = parents[torch.randint(parents.shape[0], (n_samples,), generator=generator)].clone()
    k = torch.randint(1, min(max_mutations, d) + 1, (n_samples, 1), generator=generator)
    rank = torch.rand(n_samples, d, generator=generator).argsort(1).argsort(1)  # random permutation
    chosen = (rank < k) & (card > 1)  # (n, d) coordinates to change
    shift = (torch.rand(n_samples, d, generator=generator) * (card - 1)).long() + 1  # 1..card-1
    changed = (rows - lo + shift) % card + lo  # a different valid value
    return torch.where(chosen, changed, rows)


def discrete_neighbour_search(
    acq,
    X_obs: Tensor,
    bounds: Tensor,
    n_samples: int,
    n_pick: int = 1,
    max_mutations: int = 3,
    X_avoid: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample mutated neighbours of ``X_obs`` (p, d integer, e.g. the observed Pareto points), drop
    those in ``X_avoid``, and pick ``n_pick`` with ``optimize_acqf_discrete``. Returns integer
    candidates (k, d) and their acquisition values (k,); k < n_pick if too few remain."""
    generator = generator or torch.Generator().manual_seed(0)
    choices = torch.unique(mutate(X_obs.long(), bounds, n_samples, max_mutations, generator), dim=0)
    if X_avoid is not None and X_avoid.numel():
        avoid = _row_keys(X_avoid)
        keep = [tuple(r) not in avoid for r in choices.tolist()]
        choices = choices[torch.tensor(keep, dtype=torch.bool)]
    d = X_obs.shape[1]
    if choices.shape[0] == 0:
        return torch.zeros(0, d, dtype=torch.long), torch.zeros(0, dtype=DTYPE)
    q = min(n_pick, choices.shape[0])
    cand, vals = optimize_acqf_discrete(
        acq, q=q, choices=normalize(choices, bounds), max_batch_size=ACQ_CHUNK, unique=True
    )
    return unnormalize(cand, bounds), vals.reshape(-1)


def propose_candidates(
    acq,
    X_obs: Tensor,
    Y: Tensor,
    bounds: Tensor,
    n: int,
    method: str = "finite_difference",
    max_steps: int = 10,
    n_samples: int = 512,
    max_mutations: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[str]]:
    """Up to ``n`` new integer configurations (k, d), none observed before, and their generator.

    ``method``: "finite_difference" (paper; starts = random observed points, duplicates are
    filled by the discrete search), "discrete" or "both" (half each).
    """
    if method not in ("finite_difference", "discrete", "both"):
        raise ValueError(
            f"search method {method!r} not allowed (finite_difference, discrete, both)"
        )
    generator = generator or torch.Generator().manual_seed(0)
    seen = _row_keys(X_obs)
    out: list[Tensor] = []
    labels: list[str] = []
    n_fd = {"finite_difference": n, "discrete": 0, "both": (n + 1) // 2}[method]
    starts = torch.randperm(X_obs.shape[0], generator=generator)[:n_fd]
    steps = []
    for s in starts.tolist():
        x, _, n_steps = finite_difference_search(acq, X_obs[s], bounds, max_steps)
        steps.append(n_steps)
        key = tuple(x.tolist())
        if key not in seen:
            seen.add(key)
            out.append(x)
            labels.append("finite_difference")
    if steps:
        log.info(
            "finite-difference search: %d starts, steps %s (max %d)", len(steps), steps, max_steps
        )
    remaining = n - len(out)
    if remaining > 0:
        pareto = X_obs[non_dominated_mask(Y)]
        avoid = torch.tensor(sorted(seen), dtype=torch.long)
        cand, _ = discrete_neighbour_search(
            acq, pareto, bounds, n_samples, remaining, max_mutations, avoid, generator
        )
        for x in cand:
            key = tuple(x.tolist())
            if key not in seen:
                seen.add(key)
                out.append(x)
                labels.append("discrete")
    if not out:
        return torch.zeros(0, X_obs.shape[1], dtype=torch.long), []
    return torch.stack(out), labels
