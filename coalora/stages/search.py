"""``python search.py``: Pareto search over per-layer quantization configurations (docs/search.md).

Validate everything that can be wrong with the input (search settings, the space's bits range,
the checkpoint's model/task/space) before anything is built or written; build the loss objective
(:mod:`coalora.search.objectives`); score the initial pool (budget allocations on a grid, the same
allocations CoA-LoRA trains on without a configset; with ``ckpt=`` the run's own, through
``MethodContext.allocations``: recorded, else with the run's solver and sensitivity); run the GP + qLogNEHVI rounds
(:func:`coalora.search.session.run_session`); write ``configset.json`` (Pareto flag = segmented
selection), ``observations.csv``, ``hypervolume.csv``, ``pareto.png``, ``hypervolume.png`` and
``results.json`` into the run directory (all atomically), plus W&B when ``logger=wandb``.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.io import atomic_write_json
from coalora.methods import registry
from coalora.models import build_tokenizer
from coalora.quant import QuantSpace
from coalora.search.objectives import CalibrationObjective, calibration_batches, require_switching
from coalora.search.pool import label_pool
from coalora.search.session import run_session
from coalora.search.settings import SearchSettings
from coalora.stages.build import build_datamodule, prepare, run_dir_of
from coalora.stages.common import finish_wandb, set_env_defaults, write_run_info
from coalora.stages.restore import load_run_config, resolve_checkpoint, restore

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- validation
def check_method(name: Any, where: str) -> None:
    """The search needs a method whose adapter serves any configuration (declared capability)."""
    cls = registry().get(name)
    if cls is None:
        raise ConfigError(f"{where}: method.name={name!r} is not a coalora method")
    if not cls.switches_configs:
        raise ConfigError(
            f"{where}: {name} trains one fixed configuration; the search needs a method that "
            "switches configurations (method=coalora or method=shared_lora)"
        )


def check_checkpoint(cfg: DictConfig, space: QuantSpace) -> Path:
    """The run at ``ckpt`` must match the search's model and task and contain its space."""
    run_dir, _ = resolve_checkpoint(cfg.ckpt)
    run_cfg = load_run_config(run_dir)
    for key in ("model", "task"):
        theirs, ours = run_cfg[key].name, cfg[key].name
        if theirs != ours:
            raise ConfigError(
                f"ckpt={cfg.ckpt} was trained with {key}={theirs}, but the search has "
                f"{key}={ours}; pass {key}={theirs}"
            )
    check_method(run_cfg.method.get("name"), f"ckpt={cfg.ckpt}")
    trained = QuantSpace.from_cfg(run_cfg.quant.space)
    if trained.kind != space.kind:
        raise ConfigError(
            f"quant.space.kind={space.kind} but ckpt={cfg.ckpt} was trained with "
            f"quant.space.kind={trained.kind}; pass quant.space.kind={trained.kind}"
        )
    for f in space.fields:
        values = getattr(space, f)
        outside = [v for v in values if v not in getattr(trained, f)]
        if outside:
            raise ConfigError(
                f"quant.space.{f} has {outside} outside the space ckpt={cfg.ckpt} was trained on "
                f"({list(getattr(trained, f))})"
            )
    return run_dir


def explicit_groups() -> set[str] | None:
    """Config groups the user chose on the command line (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def inherit_from_checkpoint(cfg: DictConfig) -> None:
    """``search.py ckpt=<run>`` searches the run's model and task unless model= / task= are
    given (then they must match, checked by :func:`check_checkpoint`)."""
    chosen = explicit_groups()
    if not cfg.get("ckpt") or chosen is None:
        return
    run_cfg = load_run_config(resolve_checkpoint(cfg.ckpt)[0])
    for key in ("model", "task"):
        if key not in chosen and run_cfg[key].get("name") != cfg[key].get("name"):
            log.info("search: %s=%s from ckpt=%s", key, run_cfg[key].name, cfg.ckpt)
            cfg[key] = run_cfg[key]


def check_config(cfg: DictConfig) -> tuple[QuantSpace, SearchSettings]:
    inherit_from_checkpoint(cfg)
    space = QuantSpace.from_cfg(cfg.quant.space)
    settings = SearchSettings.from_cfg(cfg.search, space)
    if cfg.get("ckpt"):
        check_checkpoint(cfg, space)
    else:
        check_method(cfg.method.get("name"), f"method={cfg.method.get('name')}")
    return space, settings


# ---------------------------------------------------------------- building blocks
def build_objective(cfg: DictConfig) -> tuple[CalibrationObjective, Any, Any]:
    """(objective, datamodule, method context): the trained adapter (+ mapper) and head of the
    run at ``ckpt`` (its context: its recorded configurations and settings), else the quantized
    base with fresh adapters (B = 0) and a seeded fresh head."""
    if cfg.get("ckpt"):
        torch.manual_seed(int(cfg.seed))
        _, lit = restore(cfg.ckpt, cache_dir=cfg.paths.cache_dir, with_data=False)
        require_switching(lit.method, f"ckpt={cfg.ckpt}")
        dm = build_datamodule(cfg, build_tokenizer(cfg.model))
        model, method, ctx = lit.model, lit.method, lit.ctx
    else:
        dm, model, method, ctx = prepare(cfg)
        require_switching(method, f"method={cfg.method.name}")
        method.setup(model, ctx)
    batches = calibration_batches(dm, cfg.search, int(cfg.seed))
    return CalibrationObjective(model, method, batches), dm, ctx


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
    space, settings = check_config(cfg)  # before the heavy imports: bad input fails in seconds
    # matplotlib (here) and botorch / gpytorch (run_session) load after validation
    from coalora.search.report import SearchWandb

    set_env_defaults()
    run_dir = run_dir_of(cfg)
    objective, _, ctx = build_objective(cfg)
    ckpt = str(Path(cfg.ckpt).resolve()) if cfg.get("ckpt") else None
    init = objective.method.init.mode  # what the scored adapter started from (method.init)
    fresh = "fresh head (B = 0)" if init == "zero" else f"fresh head (method.init={init})"
    kind = f"checkpoint {ckpt}" if ckpt else fresh
    in_features = objective.in_features
    if space.kind == "gguf" and in_features:  # the row rule narrows what this model reaches
        space = space.for_layers(in_features, objective.numels)
    budgets = settings.pool.budgets(space, "search.pool")
    allocs = ctx.allocations(objective.model, budgets, space=space)
    pool, sources = label_pool({b: a.config for b, a in allocs.items()})
    write_run_info(
        cfg,
        run_dir,
        "search",
        {
            "ckpt": ckpt,
            "objective": kind,
            "target_layers": len(objective.names),
            "initial_pool": len(pool),
        },
    )
    wb = SearchWandb.start(cfg, run_dir) if "wandb" in (cfg.get("logger") or {}) else None
    try:
        session = run_session(
            objective, pool, sources, space, settings, seed=int(cfg.seed),
            provenance=dict(
                model=cfg.model.name, task=cfg.task.name,
                command=" ".join(["search.py", *sys.argv[1:]]), ckpt=ckpt, objective=kind,
                init=init,
                search=OmegaConf.to_container(cfg.search, resolve=True),
                bits_range=list(settings.bits_range),
            ),
            run_dir=run_dir, outputs=True, title=f"{cfg.model.name} / {cfg.task.name}",
            progress=True, on_iteration=wb.log_iteration if wb else None,
        )  # fmt: skip
        result, paths = session.result, session.paths
        summary = summarize(result, kind)
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
