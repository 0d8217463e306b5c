"""``python search.py``: Pareto search over per-layer quantization configurations (DESIGN §5).

Validate everything that can be wrong with the input (search settings, the space's bits range,
the checkpoint's model/task/space) before anything is built or written; build the loss objective
(:mod:`coalora.search.objectives`); score the initial pool (budget allocations on a grid, the same
cached pool CoA-LoRA trains on without a configset); run the GP + qLogNEHVI rounds
(:func:`coalora.search.loop.run_search`); write ``configset.json`` (Pareto flag = segmented
selection), ``observations.csv``, ``hypervolume.csv``, ``pareto.png``, ``hypervolume.png`` and
``results.json`` into the run directory (all atomically), plus W&B when ``logger=wandb``.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.io import atomic_write_json
from coalora.quant import ModelQuantConfig, QuantSpace
from coalora.search.encoding import active_fields

log = logging.getLogger(__name__)

GENERATORS = ("finite_difference", "discrete", "both")


# ---------------------------------------------------------------- validation
def _positive_int(s: DictConfig, key: str, minimum: int = 1) -> int:
    v = s.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"search.{key}={v!r} must be an integer >= {minimum}")
    return v


def pool_grid(pool: DictConfig, space: QuantSpace, key: str = "search.pool") -> list[float]:
    """The budgets ``start:stop:step`` the space can reach; one-line errors naming ``key``."""
    start, stop, step = float(pool.start), float(pool.stop), float(pool.step)
    if step <= 0:
        raise ConfigError(f"{key}.step={step:g} must be > 0")
    if start > stop:
        raise ConfigError(f"{key} is empty: start={start:g} > stop={stop:g}")
    lo, hi = space.min_bits(), space.max_bits()
    grid = [float(b) for b in np.round(np.arange(start, stop + 1e-9, step), 6) if lo <= b <= hi]
    if not grid:
        raise ConfigError(
            f"{key}=[{start:g}, {stop:g}] is empty within the achievable average bits "
            f"[{lo:.4f}, {hi:.4f}] of quant.space"
        )
    return grid


def bits_range(s: DictConfig, space: QuantSpace) -> tuple[float, float]:
    """[bits_min, bits_max] clipped to what ``space`` reaches (e.g. quant.space.bits=[2,3,4])."""
    b0, b1 = float(s.bits_min), float(s.bits_max)
    if not b0 < b1:
        raise ConfigError(f"search.bits_min={b0:g} must be < search.bits_max={b1:g}")
    lo, hi = space.min_bits(), space.max_bits()
    r = (max(b0, lo), min(b1, hi))
    if not r[0] < r[1]:
        raise ConfigError(
            f"search.bits_min/bits_max=[{b0:g}, {b1:g}] lies outside the achievable average bits "
            f"[{lo:.4f}, {hi:.4f}] of quant.space"
        )
    if r != (b0, b1):
        log.info("segments cover [%.4f, %.4f] (search bits range clipped to quant.space)", *r)
    return r


def check_search(s: DictConfig, space: QuantSpace, check_pool: bool = True) -> tuple[float, float]:
    """Validate the ``search`` group against ``space``; returns the segments' bits range."""
    _positive_int(s, "iterations", 0)
    _positive_int(s, "candidates_per_iter")
    _positive_int(s, "calib_batches")
    _positive_int(s, "calib_batch_size")
    _positive_int(s, "max_steps")
    _positive_int(s, "segments")
    if s.generator not in GENERATORS:
        raise ConfigError(
            f"search.generator={s.generator!r} not allowed; allowed: {list(GENERATORS)}"
        )
    fields = None if s.fields is None else list(s.fields)
    try:
        active = active_fields(space, fields)
    except ConfigError as e:
        raise ConfigError(f"search.fields: {e}") from None
    if not active:
        raise ConfigError(
            f"search.fields={fields or 'all'}: every field has a single option in quant.space; "
            "nothing to search"
        )
    if check_pool:
        pool_grid(s.pool, space)
    return bits_range(s, space)


def check_method(target: str, where: str) -> None:
    from coalora.methods.multiconfig import MultiConfigMethod

    try:
        cls = get_class(target)
    except Exception as e:
        raise ConfigError(f"{where}: cannot import method class {target!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, MultiConfigMethod)):
        raise ConfigError(
            f"{where}: {target} trains one fixed configuration; the search needs a method that "
            "switches configurations (method=coalora or method=shared_lora)"
        )


def check_checkpoint(cfg: DictConfig, space: QuantSpace) -> Path:
    """The run at ``ckpt`` must match the search's model and task and contain its space."""
    from coalora.stages.restore import resolve_checkpoint

    run_dir, _ = resolve_checkpoint(cfg.ckpt)
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    for key in ("model", "task"):
        theirs, ours = run_cfg[key].name, cfg[key].name
        if theirs != ours:
            raise ConfigError(
                f"ckpt={cfg.ckpt} was trained with {key}={theirs}, but the search has "
                f"{key}={ours}; pass {key}={theirs}"
            )
    check_method(run_cfg.method._target_, f"ckpt={cfg.ckpt} (method={run_cfg.method.name})")
    trained = QuantSpace.from_cfg(run_cfg.quant.space)
    for f, values in space.to_dict().items():
        outside = [v for v in values if v not in getattr(trained, f)]
        if outside:
            raise ConfigError(
                f"quant.space.{f} has {outside} outside the space ckpt={cfg.ckpt} was trained on "
                f"({list(getattr(trained, f))})"
            )
    return run_dir


def check_config(cfg: DictConfig) -> tuple[QuantSpace, tuple[float, float]]:
    space = QuantSpace.from_cfg(cfg.quant.space)
    rng = check_search(cfg.search, space)
    if cfg.get("ckpt"):
        check_checkpoint(cfg, space)
    else:
        check_method(cfg.method._target_, f"method={cfg.method.name}")
    return space, rng


# ---------------------------------------------------------------- building blocks
def build_objective(cfg: DictConfig):
    """(objective, datamodule): the trained run's weights with ``ckpt``, else a fresh head."""
    from coalora.search.objectives import CalibrationObjective

    if cfg.get("ckpt"):
        torch.manual_seed(int(cfg.seed))
        return CalibrationObjective.from_checkpoint(cfg, cfg.ckpt)
    return CalibrationObjective.fresh(cfg)


def labelled_pool(
    weights: dict[str, torch.Tensor],
    space: QuantSpace,
    pool: DictConfig,
    cache_dir: Path,
    model_name: str,
    solver: str,
) -> tuple[list[ModelQuantConfig], list[str]]:
    """The cached initial pool and each configuration's source (``allocation@<budget>``)."""
    from coalora.methods.pool import allocations, initial_pool

    grid = pool_grid(pool, space)
    configs = initial_pool(
        weights,
        space,
        float(pool.start),
        float(pool.stop),
        float(pool.step),
        cache_dir,
        model_name,
        solver,
    )
    by_config: dict[tuple, str] = {}
    for b, c in allocations(weights, grid, space, cache_dir, model_name, solver).items():
        by_config.setdefault(tuple(c.configs.items()), f"allocation@{b:g}")
    return configs, [by_config.get(tuple(c.configs.items()), "allocation") for c in configs]


def search_kwargs(s: DictConfig, rng: tuple[float, float]) -> dict[str, Any]:
    """``run_search`` keyword arguments from the ``search`` group."""
    return {
        "iterations": int(s.iterations),
        "candidates_per_iter": int(s.candidates_per_iter),
        "fields": None if s.fields is None else list(s.fields),
        "method": str(s.generator),
        "max_steps": int(s.max_steps),
        "segments": int(s.segments),
        "bits_range": rng,
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(result, objective_kind: str) -> dict[str, Any]:
    n0 = sum(1 for o in result.observations if o.iteration == 0)
    score_s = [o.score_seconds for o in result.observations]
    its = result.iterations
    return {
        "objective": objective_kind,
        "observations": len(result.observations),
        "initial": n0,
        "searched": len(result.observations) - n0,
        "selected": len(result.selected),
        "front": int(result.pareto_mask().sum()),
        "reference": result.reference,
        "hypervolume_start": result.hypervolume[0],
        "hypervolume_end": result.hypervolume[-1],
        "seconds_per_iteration": _median([r.total_seconds for r in its]),
        "fit_seconds": _median([r.fit_seconds for r in its]),
        "propose_seconds": _median([r.propose_seconds for r in its]),
        "score_seconds_per_iteration": _median([r.score_seconds for r in its]),
        "seconds_per_score": _median(score_s),
        "initial_scoring_seconds": sum(
            o.score_seconds for o in result.observations if o.iteration == 0
        ),
    }


def print_summary(summary: dict[str, Any], header: str, configset: Path) -> None:
    s = summary
    hv0, hv1 = s["hypervolume_start"], s["hypervolume_end"]
    gain = f" ({100 * (hv1 - hv0) / hv0:+.1f}%)" if hv0 > 0 else ""
    lines = [
        header,
        f"  observations {s['observations']} ({s['initial']} initial + {s['searched']} "
        f"searched); selected {s['selected']} (global front {s['front']})",
        f"  hypervolume {hv0:.5g} -> {hv1:.5g}{gain}",
    ]
    if s["seconds_per_iteration"] is not None:
        lines.append(
            f"  per iteration {s['seconds_per_iteration']:.2f}s (fit "
            f"{s['fit_seconds']:.2f}s, propose {s['propose_seconds']:.2f}s, score "
            f"{s['score_seconds_per_iteration']:.2f}s)"
        )
    lines += [f"  per score {s['seconds_per_score']:.3f}s (median)", f"  configset: {configset}"]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- the stage
def run(cfg: DictConfig) -> dict[str, Any]:
    space, rng = check_config(cfg)  # before the heavy imports: bad input fails in seconds
    from coalora.quant.model import model_weights
    from coalora.search.configset import make_provenance
    from coalora.search.loop import run_search
    from coalora.search.report import SearchWandb, write_search_outputs
    from coalora.stages.common import finish_wandb, set_env_defaults, write_run_info
    from coalora.stages.train import run_dir_of

    set_env_defaults()
    run_dir = run_dir_of(cfg)
    objective, _ = build_objective(cfg)
    ckpt = str(Path(cfg.ckpt).resolve()) if cfg.get("ckpt") else None
    kind = f"checkpoint {ckpt}" if ckpt else "fresh head (B = 0)"
    names, numels = objective.names, objective.numels
    weights = model_weights(objective.model, names)
    solver = cfg.quant.get("solver", "milp")
    pool, sources = labelled_pool(
        weights, space, cfg.search.pool, Path(cfg.paths.cache_dir), cfg.model.name, solver
    )
    write_run_info(
        cfg,
        run_dir,
        "search",
        {
            "ckpt": ckpt,
            "objective": kind,
            "target_layers": len(names),
            "initial_pool": len(pool),
        },
    )
    wb = SearchWandb.start(cfg, run_dir) if "wandb" in (cfg.get("logger") or {}) else None
    try:
        result = run_search(
            objective, pool, space, names, numels, seed=int(cfg.seed), progress=True,
            on_iteration=wb.log_iteration if wb else None, initial_sources=sources,
            **search_kwargs(cfg.search, rng),
        )  # fmt: skip
        objective.release()
        summary = summarize(result, kind)
        provenance = make_provenance(
            seed=int(cfg.seed), model=cfg.model.name, task=cfg.task.name,
            command=" ".join(["search.py", *sys.argv[1:]]), ckpt=ckpt,
            objective=kind, search=OmegaConf.to_container(cfg.search, resolve=True),
            bits_range=list(rng), reference=result.reference,
        )  # fmt: skip
        paths = write_search_outputs(
            result,
            space,
            provenance,
            run_dir,
            title=f"{cfg.model.name} / {cfg.task.name}",
            bits_range=rng,
        )
        results = {
            "model": cfg.model.name,
            "task": cfg.task.name,
            "seed": int(cfg.seed),
            "ckpt": ckpt,
            **summary,
            "hypervolume": result.hypervolume,
            "files": {k: str(v) for k, v in paths.items()},
        }
        atomic_write_json(run_dir / "results.json", results)
        if wb:
            wb.log_result(result, paths["configset"], summary)
    finally:
        finish_wandb()
    print_summary(
        summary,
        f"search on {cfg.model.name}/{cfg.task.name}, objective: {kind}",
        paths["configset"],
    )
    return results
