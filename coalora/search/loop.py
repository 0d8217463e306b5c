"""The Pareto configuration search loop (CoA-LoRA, arXiv 2509.25214 §4.3; docs/search.md).

Score the initial pool, then per iteration: encode all observed configurations, fit one GP per
objective (average bits, loss), build qLogNEHVI, propose new configurations (finite-difference
guided search and/or discrete neighbour search), score them, add them. Finally keep every bits
segment's non-dominated set. The objective is any callable ``score_fn(config) -> loss`` (it may
also return ``(bits, loss)``; bits are always recomputed from the configuration), so this module
holds no model code.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from coalora.errors import ConfigError
from coalora.quant.config import ModelQuantConfig, QuantSpace
from coalora.search.bo import build_acquisition, fit_models, propose_candidates
from coalora.search.configset import ConfigSet
from coalora.search.encoding import Encoder, make_model_config
from coalora.search.pareto import (
    hypervolume_2d,
    infer_reference,
    non_dominated_mask,
    segment_edges,
    segmented_selection,
)

log = logging.getLogger(__name__)


@dataclass
class Observation:
    config: ModelQuantConfig
    bits: float
    loss: float
    source: str  # "initial", "allocation@3.0", "search/iter3", ...
    iteration: int  # 0 = initial pool
    score_seconds: float
    generator: str = ""  # "finite_difference" | "discrete" for search candidates


@dataclass
class IterationRecord:
    iteration: int
    n_candidates: int
    hypervolume: float
    fit_seconds: float
    propose_seconds: float
    score_seconds: float
    total_seconds: float


@dataclass
class SearchResult:
    observations: list[Observation]
    hypervolume: list[float]  # [initial pool, after iteration 1, ...], w.r.t. `reference`
    reference: list[float]  # fixed (bits, loss) reference inferred from the initial pool
    selected: list[int] = field(default_factory=list)  # segmented Pareto selection
    iterations: list[IterationRecord] = field(default_factory=list)

    @property
    def bits(self) -> Tensor:
        return torch.tensor([o.bits for o in self.observations], dtype=torch.float64)

    @property
    def losses(self) -> Tensor:
        return torch.tensor([o.loss for o in self.observations], dtype=torch.float64)

    @property
    def configs(self) -> list[ModelQuantConfig]:
        return [o.config for o in self.observations]

    def pareto_mask(self) -> Tensor:
        """Global non-dominated mask over (bits, loss)."""
        return non_dominated_mask(torch.stack([self.bits, self.losses], 1))

    def to_configset(
        self, space: QuantSpace, provenance: dict | None = None, selected_only: bool = False
    ) -> ConfigSet:
        keep = set(self.selected)
        idx = sorted(keep) if selected_only else range(len(self.observations))
        obs = [self.observations[i] for i in idx]
        return ConfigSet.from_model_configs(
            [o.config for o in obs],
            space=space,
            objectives=[{"bits": o.bits, "loss": o.loss} for o in obs],
            pareto=[i in keep for i in idx],
            sources=[o.source for o in obs],
            ids=[f"o{i:04d}" for i in idx],
            provenance=provenance,
        )


def _average_bits(config: ModelQuantConfig, names: Sequence[str], numels: dict[str, int]) -> float:
    total = sum(numels[n] for n in names)
    return sum(config[n].storage_bits() * numels[n] for n in names) / total


def _loss_of(value: float | tuple[float, float], label: str) -> float:
    loss = value[-1] if isinstance(value, (tuple, list)) else value
    loss = float(loss)
    if not math.isfinite(loss):
        raise ConfigError(f"score_fn returned a non-finite loss ({loss}) for {label}")
    return loss


def run_search(
    score_fn: Callable[[ModelQuantConfig], float | tuple[float, float]],
    initial_configs: Sequence[ModelQuantConfig],
    space: QuantSpace,
    names: Sequence[str],
    numels: dict[str, int],
    iterations: int,
    candidates_per_iter: int,
    fields: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    on_iteration: Callable[[IterationRecord, SearchResult], None] | None = None,
    *,
    initial_sources: Sequence[str] | None = None,
    method: str = "finite_difference",
    max_steps: int = 10,
    n_samples: int = 512,
    mc_samples: int = 64,
    segments: int = 40,
    edges: Sequence[float] | None = None,
    bits_range: tuple[float, float] | None = None,
    in_features: dict[str, int] | None = None,
) -> SearchResult:
    """Run ``iterations`` rounds of GP + qLogNEHVI search from ``initial_configs``.

    Segmented selection uses ``edges`` if given, else ``segments`` equal bins over ``bits_range``
    (default: the observed bits range).
    """
    if not initial_configs:
        raise ConfigError(
            "search needs a non-empty initial pool of configurations (initial_configs)"
        )
    if iterations < 0 or candidates_per_iter < 1:
        raise ConfigError(
            f"search.iterations must be >= 0 and search.candidates_per_iter >= 1, "
            f"got {iterations} and {candidates_per_iter}"
        )
    if edges is None:
        segment_edges(0.0, 1.0, segments)  # validates `segments` before any scoring
    if initial_sources is not None and len(initial_sources) != len(initial_configs):
        raise ConfigError(
            f"{len(initial_sources)} initial_sources for {len(initial_configs)} configs"
        )
    names = list(names)
    for i, c in enumerate(initial_configs):
        if set(c.keys()) != set(names):
            unknown = [n for n in c.keys() if n not in set(names)]
            missing = [n for n in names if n not in c]
            raise ConfigError(
                f"initial config {i}: unknown layers {unknown[:5]}, missing {missing[:5]}"
            )
    random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    template = make_model_config({n: initial_configs[0][n] for n in names}, dict(numels))
    enc = Encoder.create(names, numels, space, fields, template, in_features)
    bounds = enc.bounds()
    if enc.dim == 0:
        raise ConfigError(
            f"nothing to search: every field in {fields or 'all'} has a single option"
        )

    observations: list[Observation] = []
    X_rows: list[Tensor] = []
    seen: set[tuple[int, ...]] = set()

    def add(config: ModelQuantConfig, x: Tensor, source: str, it: int, generator: str = "") -> None:
        t0 = time.perf_counter()
        loss = _loss_of(score_fn(config), f"configuration from {source}")
        dt = time.perf_counter() - t0
        bits = _average_bits(config, names, numels)
        observations.append(Observation(config, bits, loss, source, it, dt, generator))
        X_rows.append(x)
        seen.add(tuple(x.tolist()))

    for i, c in enumerate(initial_configs):
        c = make_model_config({n: c[n] for n in names}, dict(numels))
        x = enc.encode(c)
        if tuple(x.tolist()) in seen:
            log.info(
                "initial config %d duplicates an earlier one (in the encoded fields); skipped", i
            )
            continue
        add(c, x, initial_sources[i] if initial_sources else "initial", 0)

    def objectives() -> Tensor:  # (n, 2): bits, loss -- both minimised
        return torch.tensor([[o.bits, o.loss] for o in observations], dtype=torch.float64)

    ref = infer_reference(objectives())
    result = SearchResult(observations, [hypervolume_2d(objectives(), ref)], ref.tolist())

    bar = _progress(progress, iterations)
    for it in range(1, iterations + 1):
        t_start = time.perf_counter()
        X = torch.stack(X_rows)  # (n, d) long
        Y = objectives()  # (n, 2)
        X_norm = enc.normalize(X)
        t0 = time.perf_counter()
        model = fit_models(X_norm, Y)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        acq = build_acquisition(model, X_norm, Y, mc_samples=mc_samples, seed=seed + it)
        cand, labels = propose_candidates(
            acq, X, Y, bounds, candidates_per_iter, method, max_steps, n_samples, generator=gen
        )
        propose_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_added = 0
        for x, label in zip(cand, labels):
            if tuple(x.tolist()) in seen:  # propose_candidates already dedups; belt and braces
                continue
            config = enc.decode(x)
            x = enc.encode(config)  # a GGUF type a layer cannot take was replaced on decode
            if tuple(x.tolist()) in seen:
                continue
            try:
                add(config, x, f"search/iter{it}", it, label)
                n_added += 1
            except ConfigError as e:
                log.warning("candidate skipped: %s", e)
        score_s = time.perf_counter() - t0
        result.hypervolume.append(hypervolume_2d(objectives(), ref))
        record = IterationRecord(
            it,
            n_added,
            result.hypervolume[-1],
            fit_s,
            propose_s,
            score_s,
            time.perf_counter() - t_start,
        )
        result.iterations.append(record)
        log.info(
            "search iter %d: +%d configs, hypervolume %.5g (fit %.1fs, propose %.1fs, score %.1fs)",
            it,
            n_added,
            record.hypervolume,
            fit_s,
            propose_s,
            score_s,
        )
        if on_iteration is not None:
            on_iteration(record, result)
        bar.advance(record)
    bar.close()

    Yf = objectives()
    kw = {"edges": edges} if edges is not None else {"segments": segments, "bits_range": bits_range}
    result.selected = segmented_selection(Yf[:, 0], Yf[:, 1], **kw).tolist()
    return result


class _progress:
    """A rich progress bar over iterations (no output when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled and total > 0:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("search"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task("search", total=total, info="")
            self.bar.start()

    def advance(self, record: IterationRecord) -> None:
        if self.bar is not None:
            info = (
                f"hv={record.hypervolume:.4g} +{record.n_candidates} ({record.total_seconds:.1f}s)"
            )
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
