"""One search session: score an initial pool, run the GP + qLogNEHVI rounds, stamp provenance,
build the configuration set and save it (CoA-LoRA, arXiv 2509.25214 §4.3; docs/search.md).

``search.py`` (:mod:`coalora.stages.search`) and paper mode's between-epoch refresh
(:mod:`coalora.lit.search_refresh`) both search through :func:`run_session`. They differ only in
what they hand it: where the pool comes from (budget allocations, or the method's pool plus its
current training set: :func:`pool_with_training_set`), what they record, and where they save.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coalora.quant import ModelQuantConfig, QuantSpace
from coalora.search.configset import ConfigSet, make_provenance
from coalora.search.pool import dedupe
from coalora.search.settings import SearchSettings


@dataclass
class SearchSession:
    """What one session produced: the search result (``coalora.search.loop.SearchResult``), its
    provenance, the configset of every observation (Pareto flag = segmented selection) and the
    files written (``configset``, plus the tables and plots when asked for)."""

    result: Any
    space: QuantSpace
    provenance: dict[str, Any]
    configset: ConfigSet
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def selected(self) -> list[ModelQuantConfig]:
        """The segmented Pareto selection: what training uses."""
        return [self.result.observations[i].config for i in self.result.selected]

    def selection(self) -> ConfigSet:
        """The configset of the selected configurations only."""
        return self.result.to_configset(self.space, self.provenance, selected_only=True)


def pool_with_training_set(
    pool: Sequence[ModelQuantConfig], train_set: Sequence[ModelQuantConfig]
) -> tuple[list[ModelQuantConfig], list[str]]:
    """(configurations, sources): the distinct pool entries (``pool``) followed by the training
    set's configurations the pool lacks (``train_set``)."""
    initial = dedupe([*pool, *train_set])
    n_pool = len(dedupe(list(pool)))
    return initial, ["pool" if i < n_pool else "train_set" for i in range(len(initial))]


def run_session(
    objective: Any,
    pool: Sequence[ModelQuantConfig],
    sources: Sequence[str],
    space: QuantSpace,
    settings: SearchSettings,
    *,
    seed: int,
    provenance: dict[str, Any],
    search_seed: int | None = None,
    record_reference: bool = True,
    run_dir: Path | None = None,
    configset_name: str = "configset.json",
    outputs: bool = False,
    title: str = "",
    progress: bool = False,
    on_iteration: Callable | None = None,
) -> SearchSession:
    """Search from ``pool`` (labelled by ``sources``) with ``settings``; return the session.

    ``objective`` is a :class:`coalora.search.objectives.CalibrationObjective` (any callable
    ``config -> loss`` with ``names`` and ``numels``). The rounds are seeded with ``search_seed``
    (default ``seed``); the provenance records ``seed``, the fields of ``provenance`` (model,
    task, ...) and, with ``record_reference``, the hypervolume's reference point. With ``run_dir``
    the configset is written there as ``configset_name``; with ``outputs`` also
    ``observations.csv``, ``hypervolume.csv``, ``pareto.png`` and ``hypervolume.png``.
    """
    from coalora.search.loop import run_search  # botorch / gpytorch load on the first search

    result = run_search(
        objective, pool, space, objective.names, objective.numels,
        seed=seed if search_seed is None else search_seed, progress=progress,
        on_iteration=on_iteration, initial_sources=list(sources), **settings.run_kwargs(),
        in_features=getattr(objective, "in_features", None),
    )  # fmt: skip
    facts = {"reference": result.reference} if record_reference else {}
    prov = make_provenance(seed=seed, **provenance, **facts)
    session = SearchSession(result, space, prov, result.to_configset(space, prov))
    if run_dir is not None:
        run_dir = Path(run_dir)
        session.paths["configset"] = session.configset.save(run_dir / configset_name)
        if outputs:  # matplotlib: only where plots are written
            from coalora.search.report import write_search_tables

            session.paths.update(write_search_tables(result, run_dir, title, settings.bits_range))
    return session
