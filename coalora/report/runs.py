"""Run discovery and results reading for cross-run comparisons (``scripts/compare.py``,
:mod:`coalora.stages.compare`, notebooks/analysis.ipynb): which run directories, their rows, the
series each row belongs to.

A run directory is a training run (``results.json`` of ``train.py``: the trained configuration's
metric, or ``metric@budget`` for multi-configuration methods) or an evaluation (``results.json``
of ``evaluate.py``: one row per configuration; model, task and seed come from the trained run it
points at when the evaluation does not record them).

Series: one per (model, task, method, variant, seed). ``variant`` names the method settings (and
the step count) that differ between runs of one method, so two settings or two seeds of a method
are two lines; the runs of a per-budget sweep (one configuration per run) join into one line.

Every metric's direction comes from ``coalora.data.metrics.METRIC_HIGHER_IS_BETTER`` (acc, mcc,
f1, pearson, spearman higher; ppl, nll, loss, mse lower). Decoder (causal-LM) runs are compared on
perplexity ``ppl``.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from coalora.data.metrics import METRIC_HIGHER_IS_BETTER
from coalora.errors import ConfigError

METRICS = tuple(METRIC_HIGHER_IS_BETTER)
# the task metric, when the metric= override names none: GLUE's first, then perplexity (LM runs
# report ppl and nll and no classification metric)
PRIMARY_ORDER = ("acc", "mcc", "pearson", "f1", "spearman", "ppl")
SERIES_KEYS = ["model", "task", "method", "variant", "seed"]
GROUP_KEYS = ["model", "task", "method", "variant"]


# ---------------------------------------------------------------------- run discovery
def expand_runs(specs: list[str] | str) -> list[Path]:
    """Run directories from paths, globs and sweep folders (``outputs/multirun/<date>``).

    A folder without ``results.json`` whose subfolders have one is a sweep: its jobs are used in
    numeric order. Files (Hydra's ``multirun.yaml``) are skipped, so ``<sweep>/*`` works too.
    """
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    runs: list[Path] = []
    for spec in specs:
        spec = str(spec).strip()
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise ConfigError(f"runs: {spec!r} matches no path")
        for m in matches:
            path = Path(m)
            if path.is_file():
                continue  # multirun.yaml and other files next to the job folders
            if (path / "results.json").is_file():
                runs.append(path)
                continue
            jobs = (
                [p for p in path.iterdir() if (p / "results.json").is_file()]
                if path.is_dir()
                else []
            )
            if not jobs:
                raise ConfigError(
                    f"runs: {path} has no results.json (give run dirs of train.py/evaluate.py "
                    "or a sweep folder holding them)"
                )
            runs += sorted(
                jobs,
                key=lambda p: (
                    not p.name.isdigit(),
                    int(p.name) if p.name.isdigit() else 0,
                    p.name,
                ),
            )
    if not runs:
        raise ConfigError("runs: no run directories given (runs=[<dir>,<dir>,...])")
    return list(dict.fromkeys(runs))


# ---------------------------------------------------------------------- rows
def _metric_name(key: str) -> str:
    return key.split("/")[-1]


def trained_run_dir(res: dict[str, Any]) -> Path | None:
    """Directory of the training run an evaluation's results point at (``ckpt``: the run, or a
    checkpoint file inside it): the first of ckpt, its parent and grandparent holding the
    training run's ``results.json`` or ``config.yaml``; None when none is on this machine."""
    ckpt = res.get("ckpt")
    if not ckpt:
        return None
    path = Path(ckpt)
    for cand in (path, path.parent, path.parent.parent):
        if cand.is_dir() and any((cand / f).is_file() for f in ("results.json", "config.yaml")):
            return cand
    return None


def _trained_run(res: dict[str, Any]) -> dict[str, Any]:
    """results.json of the training run an evaluation points at (``ckpt``), or {}."""
    run = trained_run_dir(res)
    f = None if run is None else run / "results.json"
    if f is None or not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}


def trained_budget(run: Path, res: dict[str, Any]) -> float | None:
    """The bit budget a single-configuration run was trained at (``quant.budget`` of a
    ``quant.mode=budget`` run, from its results or its resolved ``config.yaml``); None for a
    fixed configuration (``quant=nf4``...) or when the run folder has no config."""
    if res.get("budget") is not None:
        return float(res["budget"])
    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        quant = yaml.safe_load(path.read_text()).get("quant") or {}
    except (yaml.YAMLError, AttributeError):
        return None
    if quant.get("mode") != "budget" or quant.get("budget") is None:
        return None
    try:
        return float(quant["budget"])
    except (TypeError, ValueError):
        return None


def rows_of(run: Path) -> list[dict[str, Any]]:
    """One row per scored configuration of ``run`` (see the module docstring)."""
    path = Path(run) / "results.json"
    if not path.is_file():
        raise ConfigError(f"runs: {run} has no results.json (run dirs of train.py/evaluate.py)")
    res = json.loads(path.read_text())
    trained = _trained_run(res) if "rows" in res else res
    base = {
        "model": res.get("model") or trained.get("model"),
        "task": res.get("task") or trained.get("task"),
        "method": res.get("method") or trained.get("method"),
        "seed": res.get("seed", trained.get("seed")),
        "steps": trained.get("global_step"),
        "fit_seconds": trained.get("fit_seconds"),
        "shared": bool(trained.get("train_configs") or trained.get("eval_avg_bits")),
        "config": trained.get("config") or {},
        "source": "evaluate" if "rows" in res else "train",
        "run": str(run),
    }
    out = []
    if "rows" in res:  # evaluate.py
        for r in res["rows"]:
            row = {**base, "kind": r.get("kind", "allocation"), "budget": r.get("budget")}
            row["avg_bits"] = float(r["avg_bits"])
            row["adapt_ms"] = r.get("adapt_ms")
            # the task's metrics are bare keys; "<task>/<metric>" are lm-eval zero-shot scores
            row.update({k: float(v) for k, v in r.items() if k in METRICS})
            out.append(row)
        return out
    budgets = {float(k): v for k, v in (res.get("eval_avg_bits") or {}).items()}
    for key, value in (res.get("metrics") or {}).items():
        name, _, label = key.partition("@")
        metric = _metric_name(name)
        if metric not in METRICS or label == "mean":
            continue
        if label:
            try:
                budget = float(label)  # "3" and "3.0" are one budget
            except ValueError:
                continue
            if budget not in budgets:
                continue
            row = {**base, "kind": "allocation", "budget": budget, "avg_bits": budgets[budget]}
        elif "avg_bits" in res:
            budget = trained_budget(Path(run), res)
            row = {**base, "kind": "allocation", "budget": budget, "avg_bits": res["avg_bits"]}
        else:
            row = {**base, "kind": "full precision", "budget": None, "avg_bits": 32.0}
        row[metric] = float(value)
        out.append(row)
    return _merge_metrics(out)


def _merge_metrics(rows: list[dict]) -> list[dict]:
    """One row per (kind, budget, avg_bits) holding every metric of that configuration."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kind"], r["budget"], r["avg_bits"])
        merged.setdefault(key, {}).update(r)
    return list(merged.values())


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    return out


def _variants(rows: list[dict]) -> None:
    """Fill ``variant``: the method settings (and steps) that differ between runs of a method."""
    by_method: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        flat = _flatten(r.get("config") or {})
        flat["steps"] = r.get("steps")
        by_method.setdefault((r["model"], r["task"], r["method"]), {})[r["run"]] = flat
    labels: dict[str, str] = {}
    for runs in by_method.values():
        keys = sorted({k for flat in runs.values() for k in flat})
        differing = [k for k in keys if len({repr(f.get(k)) for f in runs.values()}) > 1]
        for run, flat in runs.items():
            labels[run] = " ".join(f"{k}={flat.get(k)}" for k in differing)
    for r in rows:
        r["variant"] = labels.get(r["run"], "")


def primary_metric(frame: pd.DataFrame, metric: str | None = None) -> str:
    if metric:
        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r} is not allowed; allowed: {list(METRICS)}")
        if metric not in frame.columns:
            have = [m for m in METRICS if m in frame.columns]
            raise ConfigError(f"metric={metric!r} is in none of the runs; they have {have}")
        return metric
    for m in PRIMARY_ORDER:
        if m in frame.columns and frame[m].notna().any():
            return m
    raise ConfigError(f"runs: no task metric ({', '.join(PRIMARY_ORDER)}) in the runs' results")


def load_frame(runs: list[Path], labels: str = "auto") -> pd.DataFrame:
    """All rows of ``runs`` as a DataFrame with a ``series`` label per row."""
    if labels not in ("auto", "run"):
        raise ConfigError(f"labels={labels!r} is not allowed; allowed: ['auto', 'run']")
    rows = [r for run in runs for r in rows_of(run)]
    if not rows:
        raise ConfigError("runs: the results hold no scored configuration")
    _variants(rows)
    frame = pd.DataFrame(rows).drop(columns=["config"])
    for col in ("model", "task", "variant"):
        frame[col] = frame[col].fillna("")
    frame["seed"] = pd.Series([_seed(v) for v in frame["seed"]], index=frame.index, dtype=object)
    frame["series"] = (
        frame["run"].map(short_names(runs)) if labels == "run" else _series_labels(frame)
    )
    return frame


def short_names(runs: list[Path]) -> dict[str, str]:
    """Run path -> its shortest trailing part that no other run shares (job ``0`` of two sweeps
    becomes ``<date A>/0`` and ``<date B>/0``)."""
    parts = {str(r): Path(r).parts for r in runs}
    out: dict[str, str] = {}
    for run, p in parts.items():
        for k in range(1, len(p) + 1):
            tail = p[-k:]
            if all(q[-k:] != tail for other, q in parts.items() if other != run):
                break
        out[run] = "/".join(tail)
    return out


def _seed(value: Any) -> int | str | None:
    """Seeds as ints (``1``, not the ``1.0`` a column holding None turns them into)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        return int(value) if float(value).is_integer() else str(value)
    except (TypeError, ValueError):
        return str(value)


def _series_labels(frame: pd.DataFrame) -> pd.Series:
    many_settings = frame[["model", "task"]].drop_duplicates().shape[0] > 1
    seeds = frame.groupby(GROUP_KEYS, dropna=False)["seed"].transform(lambda s: s.nunique())

    def label(i: int) -> str:
        r = frame.loc[i]
        parts = [str(r["method"])]
        if many_settings:
            parts.append(f"[{r['model']}/{r['task']}]")
        if r["variant"]:
            parts.append(str(r["variant"]))
        if seeds.loc[i] > 1:
            parts.append(f"seed {r['seed']}")
        return " ".join(parts)

    names = pd.Series([label(i) for i in frame.index], index=frame.index)
    # runs that share a label and score the same cell (same setting, same seed, same budget):
    # tell them apart by directory; a per-budget sweep (one cell per run) stays one line
    cell = budget_cell(frame)
    per_cell = frame.groupby([names, frame["kind"], cell])["run"].transform("nunique")
    clash = set(names[per_cell > 1])
    dup = names.isin(clash)
    short = short_names(list(frame.loc[dup, "run"].unique()))
    names[dup] = names[dup] + " (" + frame.loc[dup, "run"].map(short) + ")"
    return names


def budget_cell(frame: pd.DataFrame) -> pd.Series:
    """The budget a row scores: its ``budget``, else its average bits to two decimals (the runs
    of a per-budget sweep record no budget)."""
    return frame["budget"].where(frame["budget"].notna(), frame["avg_bits"].round(2))
