"""``python evaluate.py ckpt=<run dir> eval.budgets=[2.5,3.0,3.5,4.0]`` (docs/methods.md,
"Evaluation protocol").

For every budget: the run's configuration at that budget (the one it recorded in
``allocations.json`` when it validated on that budget, else the allocation recomputed with the
run's space, solver and sensitivity: ``MethodContext.allocations``) plus held-out random
configurations near it (CoA-LoRA's generalisation). The trained run is adapted to each configuration — for CoA-LoRA one mapper call
(+ the base switch through the cache) — and scored on the task's dev split. Writes
``results.json``, ``results.csv`` and ``metric_vs_bits.png``.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from coalora.data.metrics import build_metrics, update_metrics
from coalora.errors import ConfigError
from coalora.io import atomic_write, atomic_write_json
from coalora.models import build_tokenizer, task_kind
from coalora.quant import ModelQuantConfig, QuantSpace
from coalora.report.plots import plot_metric_vs_bits
from coalora.stages.common import run_dir_lock, set_env_defaults, write_run_info
from coalora.stages.restore import load_run
from coalora.zeroshot import ZeroShotTasks, resolve_tasks, run_lm_eval

log = logging.getLogger(__name__)


def random_near(
    base: ModelQuantConfig,
    space: QuantSpace,
    budget: float,
    tol: float,
    rng: random.Random,
    frac: float = 0.3,
    tries: int = 2000,
    choices: Mapping[str, list] | None = None,
) -> ModelQuantConfig | None:
    """A random per-layer perturbation of ``base`` whose average bits is within ``tol``.

    ``choices`` (layer → options) restricts a layer to what it can take (the GGUF row rule);
    default: every option of ``space``.
    """
    names, options = list(base), space.options()
    for _ in range(tries):
        layers = dict(base.configs)
        for n in rng.sample(names, max(1, int(frac * len(names)))):
            layers[n] = rng.choice(choices[n] if choices is not None else options)
        cand = ModelQuantConfig(layers, base.numels)
        if abs(cand.average_bits() - budget) <= tol and cand != base:
            return cand
    return None


@torch.no_grad()
def score(lit, loader, task, predictions: list | None = None) -> dict[str, float]:
    """Task metrics over ``loader``; appends one record per example to ``predictions`` when a
    list is given, in the loader's order ((label, prediction), or (tokens, NLL) per LM block)."""
    metrics = build_metrics(task, prefix="")
    for batch in loader:
        records = update_metrics(metrics, task, lit.model(**batch).logits, batch)
        if predictions is not None:
            predictions.extend(records)
    return {k: float(v) for k, v in metrics.compute().items()}


def zero_shot_scores(model, tokenizer, tasks: ZeroShotTasks, cfg: DictConfig) -> dict[str, float]:
    """lm-eval's metrics for the model as configured now, keyed ``<task>/<metric>``."""

    e = cfg.eval
    out = run_lm_eval(
        model, tokenizer, tasks,
        batch_size=int(e.lm_eval_batch_size), limit=e.get("lm_eval_limit"), seed=int(e.seed),
    )  # fmt: skip
    return {
        f"{task}/{k}": float(v)
        for task, metrics in out.items()
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def write_predictions(path: Path, order: list[int], columns: dict[str, list]) -> None:
    """``predictions.csv``: dev example index, label, then one prediction column per scored
    configuration: ``<budget>`` for the allocation, ``<budget>-random<i>`` for held-out ones."""
    names = list(columns)
    labels = [lab for lab, _ in columns[names[0]]]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["example", "label", *names])
            for i, idx in enumerate(order):
                w.writerow([idx, labels[i], *(columns[n][i][1] for n in names)])

    atomic_write(path, write)


def run(cfg: DictConfig) -> dict[str, Any]:
    set_env_defaults()
    n_eval = cfg.eval.get("max_eval_samples")
    if n_eval is not None and (
        isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1
    ):
        raise ConfigError(f"eval.max_eval_samples={n_eval!r} must be a positive integer or null")
    run = load_run(cfg.ckpt, cache_dir=cfg.paths.cache_dir, with_data=True, max_eval_samples=n_eval)
    with run_dir_lock(Path(cfg.paths.output_dir), "evaluate"):
        return _evaluate(cfg, run)


def _evaluate(cfg: DictConfig, run) -> dict[str, Any]:
    run_cfg, lit, dm = run.cfg, run.lit, run.datamodule
    loader = dm.val_dataloader()
    method = lit.method
    out_dir = Path(cfg.paths.output_dir)
    write_run_info(cfg, out_dir, "evaluate", {"ckpt": str(cfg.ckpt)})
    quant = lit.ctx.quant
    space = quant.space
    fixed = not method.switches_configs  # QLoRA, LQ-LoRA, QWHA, LoRA: one configuration
    if fixed:
        trained = method.config
        bits = 32.0 if trained is None else round(trained.average_bits(), 4)
        log.info("method=%s serves only its trained configuration (%g bits)", method.name, bits)
        allocs = {bits: trained}
        sources = {f"{bits:g}": "trained"}
    else:  # the configuration training validated on at each budget (recorded, else recomputed)
        solved = lit.ctx.allocations(lit.model, cfg.eval.budgets)
        allocs = {b: a.config for b, a in solved.items()}
        sources = {f"{b:g}": a.source for b, a in solved.items()}
    zero_shot: list | ZeroShotTasks = list(cfg.eval.get("lm_eval_tasks") or [])
    tokenizer = None
    if zero_shot:
        if task_kind(run_cfg.task) != "causal_lm":
            raise ConfigError(
                f"eval.lm_eval_tasks needs a decoder run; ckpt={cfg.ckpt} is "
                f"task={run_cfg.task.name} on model={run_cfg.model.name}"
            )

        # one line when lm-eval is missing or a task name is unknown, before any scoring
        zero_shot = resolve_tasks(zero_shot, list(cfg.eval.get("lm_eval_include") or []))
        tokenizer = build_tokenizer(run_cfg.model)
    rng = random.Random(cfg.eval.seed)
    qlayers = getattr(method, "qlayers", None) or {}
    choices = {n: space.allowed_for(layer.in_features) for n, layer in qlayers.items()} or None
    rows = []
    keep = bool(cfg.eval.get("save_predictions", False))
    predictions: dict[str, list] = {}
    for budget, alloc in allocs.items():
        cands = [("allocation", alloc)]
        for i in range(0 if fixed else int(cfg.eval.random_per_budget)):
            r = random_near(
                alloc, space, budget, float(cfg.eval.random_tolerance), rng, choices=choices
            )
            if r is not None:
                cands.append((f"random{i}", r))
        for kind, config in cands:
            label = f"{budget:g}"
            switch_ms = 0.0
            if method.switches_configs:  # the base switch alone (a cache miss quantizes)
                t0 = time.perf_counter()
                method.switch_base(lit.model, config)
                switch_ms = 1000 * (time.perf_counter() - t0)
                # saved, so a held-out configuration can be re-scored or exported
                config.to_json(out_dir / "configs" / f"{label}-{kind}.json")
            t0 = time.perf_counter()
            with method.configured(lit.model, config):
                adapt_ms = 1000 * (time.perf_counter() - t0)  # switch (now cached) + mapper
                column = label if kind == "allocation" else f"{label}-{kind}"
                preds = predictions.setdefault(column, []) if keep else None
                m = score(lit, loader, run_cfg.task, preds)
                if zero_shot and kind == "allocation":
                    m.update(zero_shot_scores(lit.model, tokenizer, zero_shot, cfg))
            rows.append(
                {
                    "budget": budget,
                    "label": label,  # as in training's val/<metric>@<label>
                    "kind": kind,
                    "avg_bits": budget if config is None else config.average_bits(),
                    "switch_ms": round(switch_ms, 2),
                    "adapt_ms": round(adapt_ms, 2),
                    **m,
                }
            )
            log.info("budget %.2f %s (%.3f bits): %s", budget, kind, rows[-1]["avg_bits"], m)
    results = {
        "ckpt": str(cfg.ckpt),
        "checkpoint": str(run.checkpoint),
        "checkpoint_step": run.step,
        "method": run_cfg.method.name,
        "model": run_cfg.model.name,
        "task": run_cfg.task.name,
        "sensitivity": quant.sensitivity,
        "solver": quant.solver,
        "allocations": sources,  # per budget: recorded (allocations.json) / computed / trained
        "rows": rows,
    }
    atomic_write_json(out_dir / "results.json", results)
    keys = list(rows[0].keys()) if rows else []

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    atomic_write(out_dir / "results.csv", write_csv)
    if predictions:
        order = list(getattr(loader.sampler, "order", range(len(loader.dataset))))
        write_predictions(out_dir / "predictions.csv", order, predictions)
    plot_metric_vs_bits({run_cfg.method.name: rows}, out_dir / "metric_vs_bits.png")
    for r in rows:
        print(
            f"{r['budget']:>5g} {r['kind']:<10} {r['avg_bits']:.3f} bits  "
            + "  ".join(
                f"{k}={v:.4f}"
                for k, v in r.items()
                if k not in ("budget", "label", "kind", "avg_bits", "switch_ms", "adapt_ms")
            )
            + f"  switch {r['switch_ms']} ms, adapt {r['adapt_ms']} ms"
        )
    return results
