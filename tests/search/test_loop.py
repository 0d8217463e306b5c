"""The search loop on a synthetic objective: loss = sum_l w_l 2^-bits_l + noise."""

from __future__ import annotations

import itertools

import pytest
import torch

from coalora.errors import ConfigError
from coalora.search.configset import ConfigSet
from coalora.search.encoding import encode
from coalora.search.loop import run_search
from coalora.search.pareto import non_dominated_mask


def _objective(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(len(layout.names), generator=g) + 0.5
    calls = []

    def score(config):
        calls.append(config)
        loss = sum(w[i].item() * 2.0 ** -config[n].bits for i, n in enumerate(layout.names))
        loss += 0.01 * 2.0 ** -min(qc.bits0 for qc in config.values())
        return loss + 1e-3 * torch.randn(1, generator=g).item()

    return score, calls


def test_run_search_synthetic(layout, space, tmp_path):
    score, calls = _objective(layout)
    initial = layout.random_configs(space, 8)
    seen_records = []
    res = run_search(
        score, initial, space, layout.names, layout.numels, iterations=2, candidates_per_iter=3,
        seed=0, progress=False, on_iteration=lambda rec, r: seen_records.append(rec.iteration),
        max_steps=4, mc_samples=16, segments=4,
    )  # fmt: skip
    assert seen_records == [1, 2]
    assert len(res.hypervolume) == 3
    assert all(b >= a for a, b in itertools.pairwise(res.hypervolume))  # fixed reference
    new = [o for o in res.observations if o.iteration > 0]
    assert 1 <= len(new) <= 6 and len(calls) == len(res.observations)
    for o in new:
        assert list(o.config.keys()) == layout.names
        for qc in o.config.values():
            space.validate(qc)  # a valid option in every layer
        assert o.bits == pytest.approx(o.config.average_bits())
        assert o.source == f"search/iter{o.iteration}"
        assert o.generator in ("finite_difference", "discrete")
    keys = [tuple(encode(o.config, space).tolist()) for o in res.observations]
    assert len(set(keys)) == len(keys)  # no duplicates among all observations
    for rec in res.iterations:
        assert rec.fit_seconds >= 0 and rec.propose_seconds >= 0 and rec.total_seconds > 0
    assert all(o.score_seconds >= 0 for o in res.observations)
    # selected = union of per-segment fronts: every selected point is non-dominated globally or
    # in its own bits segment, and the global front's lowest-bits point is always kept
    Y = torch.stack([res.bits, res.losses], 1)
    assert res.selected and int(Y[:, 0].argmin()) in res.selected
    assert set(non_dominated_mask(Y).nonzero().flatten().tolist()) <= set(res.selected)
    # hand-over file round-trip
    path = res.to_configset(space).save(tmp_path / "configset.json")
    cs = ConfigSet.load(path, expected_names=layout.names, space=space)
    assert cs.to_model_configs() == res.configs
    assert [e.pareto for e in cs.entries] == [
        i in res.selected for i in range(len(res.observations))
    ]


def test_run_search_is_seeded(layout, space):
    kw = dict(iterations=1, candidates_per_iter=2, progress=False, max_steps=2, mc_samples=8)
    runs = []
    for _ in range(2):
        score, _ = _objective(layout)
        res = run_search(
            score, layout.random_configs(space, 6), space, layout.names, layout.numels, **kw
        )
        runs.append([tuple(encode(o.config, space).tolist()) for o in res.observations])
    assert runs[0] == runs[1]


def test_run_search_errors(layout, space):
    score, calls = _objective(layout)
    args = (space, layout.names, layout.numels)
    with pytest.raises(ConfigError, match="non-empty initial pool"):
        run_search(score, [], *args, iterations=1, candidates_per_iter=1, progress=False)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="segments"):
            run_search(
                score, layout.random_configs(space, 2), *args, 1, 1, progress=False, segments=bad
            )
    assert not calls  # validation happens before any scoring
