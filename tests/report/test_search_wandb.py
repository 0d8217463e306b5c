"""The search W&B run: a scalar hypervolume series from iteration 0, plots under other keys."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from coalora.search.loop import IterationRecord, Observation, SearchResult
from coalora.search.report import SearchWandb


class FakeRun:
    def __init__(self):
        self.logged: list[tuple[dict, int | None]] = []
        self.summary: dict = {}
        self.artifacts: list = []

    def log(self, payload, step=None):
        self.logged.append((payload, step))

    def log_artifact(self, art):
        self.artifacts.append(art)


def result(iterations: int) -> SearchResult:
    obs = [Observation(None, 2.5 + i, 1.0 - 0.1 * i, "initial", 0, 0.01) for i in range(3)]
    records = []
    for it in range(1, iterations + 1):
        obs.append(Observation(None, 2.6, 0.5 - 0.1 * it, f"search/iter{it}", it, 0.01, "discrete"))
        records.append(IterationRecord(it, 1, 1.0 + it, 0.1, 0.1, 0.1, 0.3))
    return SearchResult(
        observations=obs,
        hypervolume=[1.0 + k for k in range(iterations + 1)],
        reference=[5.0, 1.5],
        selected=[0],
        iterations=records,
    )


def test_iteration_zero_is_logged_once_before_the_first_iteration():
    run = FakeRun()
    wb = SearchWandb(run, OmegaConf.create({}))
    res = result(2)
    for record in res.iterations:
        wb.log_iteration(record, res)
    steps = [(step, payload["search/hypervolume"]) for payload, step in run.logged]
    assert steps == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert run.logged[0][0]["search/observations"] == 3


def test_plots_do_not_overwrite_the_scalar_series(tmp_path):
    pytest.importorskip("wandb")
    from coalora.search.report import plot_hypervolume, plot_pareto

    res = result(0)  # no search iteration: step 0 still reaches W&B
    plot_pareto(res, tmp_path / "pareto.png")
    plot_hypervolume(res, tmp_path / "hypervolume.png")
    (tmp_path / "configset.json").write_text("{}")
    run = FakeRun()
    wb = SearchWandb(run, OmegaConf.create({"model": {"name": "m"}, "task": {"name": "t"}}))
    wb.log_result(res, tmp_path / "configset.json", {"selected": 1})
    assert run.logged[0] == (
        {"search/hypervolume": 1.0, "search/observations": 3, "search/candidates": 3},
        0,
    )
    final = run.logged[-1][0]
    assert {"search/plots/pareto", "search/plots/hypervolume"} <= set(final)
    assert "search/hypervolume" not in final  # an image there would replace the scalar chart
    assert run.artifacts and run.summary == {"search/selected": 1}
