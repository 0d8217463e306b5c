"""Cross-run comparison tables behind ``scripts/compare.py`` (:mod:`coalora.stages.compare`):
seed aggregation, ranks, the best series per budget, hypervolumes and the time to serve N
configurations. The rows and series come from :mod:`coalora.report.runs`.

``aggregate`` pools the seeds of a series: mean, sample standard deviation and count per cell.
Every metric's direction comes from ``coalora.data.metrics.METRIC_HIGHER_IS_BETTER``; ranks, the
best per budget and the hypervolume all read it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from coalora.data.metrics import LOG_SCALE_METRICS, metric_higher_is_better
from coalora.report.runs import GROUP_KEYS, budget_cell
from coalora.search.pareto import hypervolume_2d


def direction_text(metric: str) -> str:
    return f"{'higher' if metric_higher_is_better(metric) else 'lower'} is better"


# ---------------------------------------------------------------------- aggregation
def aggregate_seeds(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (model, task, method, variant, kind, budget cell) over seeds: mean, sample
    standard deviation (NaN for one seed), n and the seeds; the series label drops the seed."""
    f = frame.copy()
    f["cell"] = budget_cell(f)
    f["series"] = f["series"].str.replace(r" seed \S+$", "", regex=True)
    keys = [*GROUP_KEYS, "series", "kind", "cell"]
    g = f.groupby(keys, dropna=False, sort=False)
    out = g.agg(
        budget=("budget", "first"),
        avg_bits=("avg_bits", "mean"),
        **{metric: (metric, "mean"), f"{metric}_std": (metric, "std")},
        n=(metric, "count"),
        seeds=("seed", lambda s: " ".join(str(v) for v in s if v is not None)),
        fit_seconds=("fit_seconds", "mean"),
        steps=("steps", "first"),
        shared=("shared", "first"),
        adapt_ms=("adapt_ms", "mean") if "adapt_ms" in f else ("avg_bits", lambda s: math.nan),
    ).reset_index()
    return out.drop(columns=["cell"]).sort_values(["series", "avg_bits"], kind="stable")


# ---------------------------------------------------------------------- ranking
CELL_KEYS = ["model", "task", "kind"]


def rank_in_cells(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Rank of each row among the rows scoring the same configuration kind at the same budget
    (same model and task): 1 = best in ``metric``'s direction, ties share the better rank."""
    cell = budget_cell(frame)
    ranks = frame.groupby([*(frame[k] for k in CELL_KEYS), cell], dropna=False)[metric].rank(
        method="min", ascending=not metric_higher_is_better(metric)
    )
    return ranks.astype("Int64")


def best_lines(frame: pd.DataFrame, metric: str) -> str:
    """Per budget cell that two or more series score: the best series and how far the next one
    is behind (in ``metric``'s own units)."""
    f = frame[frame[metric].notna()].assign(_cell=budget_cell(frame))
    many_settings = f[["model", "task"]].drop_duplicates().shape[0] > 1
    lines = []
    for (model, task, kind, cell), grp in f.groupby([*CELL_KEYS, "_cell"], sort=True):
        if grp["series"].nunique() < 2:
            continue
        grp = grp.sort_values(metric, ascending=not metric_higher_is_better(metric), kind="stable")
        best, nxt = grp.iloc[0], grp.iloc[1]
        where = f"{model}/{task} " if many_settings else ""
        lines.append(
            f"* {where}{kind} @ {cell:g}: {best['series']} ({metric} {best[metric]:.4f}); "
            f"next {nxt['series']} ({metric} {nxt[metric]:.4f}, "
            f"{nxt[metric] - best[metric]:+.4f})"
        )
    if not lines:
        return ""
    return (
        "\n".join(["", f"Best per budget ({metric}, {direction_text(metric)}):", "", *lines]) + "\n"
    )


# ---------------------------------------------------------------------- tables
def table_columns(frame: pd.DataFrame, metric: str, aggregated: bool) -> list[str]:
    cols = ["series", "model", "task", "method", "variant", "kind", "budget", "avg_bits", metric]
    cols += [f"{metric}_std"] if aggregated else []
    cols += ["rank"] if "rank" in frame.columns else []
    cols += ["n", "seeds"] if aggregated else []
    cols += ["fit_seconds", "steps"]
    cols += [] if aggregated else ["seed", "run"]
    if not frame["variant"].astype(bool).any():
        cols.remove("variant")
    return cols


def rank_header(metric: str) -> str:
    """The markdown header of the ``rank`` column: what is ranked, among what, which way."""
    return f"rank by {metric} at the budget (1 = best)"


def markdown_table(frame: pd.DataFrame, cols: list[str], metric: str | None = None) -> str:
    shown = frame[cols].astype(object)
    if metric is not None and "rank" in cols:
        shown = shown.rename(columns={"rank": rank_header(metric)})
    return (
        shown.where(shown.notna(), None).to_markdown(index=False, floatfmt=".4f", missingval="")
        + "\n"
    )


def hypervolume_objective(values: pd.Series, metric: str) -> tuple[pd.Series, str]:
    """The minimised second objective of the hypervolume and its name: ``1 − metric`` for a
    higher-is-better metric; the metric itself for a lower-is-better one, on a log scale for
    perplexity (``LOG_SCALE_METRICS``: log ppl = mean token NLL, so one collapsed configuration
    at ppl 1e8 does not swamp the differences between the usable ones)."""
    if metric_higher_is_better(metric):
        return 1.0 - values, f"1 − {metric}"
    if metric in LOG_SCALE_METRICS:
        return np.log(values.astype(float)), f"log {metric}"
    return values.astype(float), metric


def hypervolume_lines(frame: pd.DataFrame, metric: str) -> str:
    """Per series, the area its (average bits, y) points dominate, both minimised, up to a
    common reference: y = 1 − metric with reference 1 for a higher-is-better metric (error); for
    a lower-is-better one y = the metric (log ppl for perplexity) with reference 1.1 × the
    largest y over every series' points. Bits reference: largest quantized average bits + 0.25.
    One number that rewards a good metric at every budget and at fewer bits; larger is better."""
    pts = frame[(frame["avg_bits"] < 16) & frame[metric].notna()]
    y, name_y = hypervolume_objective(pts[metric], metric)
    keep = np.isfinite(y)
    pts, y = pts[keep], y[keep]
    if pts.empty:
        return ""
    bits_ref = float(pts["avg_bits"].max()) + 0.25
    if metric_higher_is_better(metric):
        y_ref, how = 1.0, "1.0"
    else:
        top = float(y.max())
        rule = "1.1 × the largest" if top > 0 else "0.1 above the largest"
        y_ref = 1.1 * top if top > 0 else top + 0.1
        how = f"{y_ref:.4g} = {rule} {name_y}"
    why = (
        f" ({name_y} = mean token NLL, so a collapsed configuration's {metric} does not swamp "
        "the area)"
        if metric in LOG_SCALE_METRICS
        else ""
    )
    lines = [
        "",
        f"Hypervolume of (average bits, {name_y}), both minimised{why}, reference "
        f"{bits_ref:.2f} bits / {how}; larger is better:",
        "",
    ]
    for name, grp in pts.groupby("series", sort=True):
        mine = list(zip(grp["avg_bits"], y[grp.index], strict=True))
        lines.append(
            f"* {name}: {hypervolume_2d(mine, (bits_ref, y_ref)):.4f} ({len(mine)} points)"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- fit time
def fit_time_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured training time per series: ``fit_seconds`` (mean over its runs) and whether one
    fit serves every configuration (``shared``: CoA-LoRA, Shared-LoRA) or one configuration.

    Full-precision runs serve no quantized configuration and are left out. A per-configuration
    method's series is a budget sweep of runs: its time per configuration is the mean over them.
    """
    f = frame[
        (frame["source"] == "train")  # an evaluation repeats its trained run's fit time
        & (frame["kind"] != "full precision")
        & frame["fit_seconds"].notna()
    ]
    f = f.drop_duplicates("run")
    if f.empty:
        return pd.DataFrame(columns=["series", "shared", "fit_seconds", "runs", "adapt_ms"])
    f = f.assign(series=f["series"].str.replace(r" seed \S+$", "", regex=True))
    out = (
        f.groupby("series", sort=True)
        .agg(
            method=("method", "first"),
            shared=("shared", "first"),
            fit_seconds=("fit_seconds", "mean"),
            runs=("run", "count"),
        )
        .reset_index()
    )
    # adaptation time: measured by evaluate.py runs of the same method (median), if any
    adapt = frame.groupby("method")["adapt_ms"].median() if "adapt_ms" in frame else {}
    out["adapt_ms"] = out["method"].map(adapt).astype(float)
    return out


def time_for_configs(row: pd.Series, n: int) -> float:
    """Seconds to serve ``n`` configurations: ``n`` fits for a per-configuration method, one fit
    plus ``n`` adaptations (the measured ``adapt_ms`` when an evaluation recorded it) otherwise
    (arXiv 2509.25214, Figure 1)."""
    if row["shared"]:
        adapt = 0.0 if pd.isna(row["adapt_ms"]) else float(row["adapt_ms"]) / 1000.0
        return float(row["fit_seconds"]) + n * adapt
    return n * float(row["fit_seconds"])
