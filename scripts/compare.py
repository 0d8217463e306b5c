"""Compare runs across methods: one table (markdown + CSV) and metric-vs-bits plots.

    python scripts/compare.py runs=<dir>[,<dir>...] [out=<dir>] [wandb=true]
    python scripts/compare.py outputs/multirun/2026-11-22_21-00-00/*  [--out DIR]
    python scripts/compare.py runs=... aggregate=true curves=true

``aggregate=true`` pools runs that differ only in seed: one row per (method, kind, budget) with the
mean, the sample standard deviation and the number of seeds (the plot gets error bars).
``curves=true`` also overlays the runs' smoothed training loss (``train_loss.png``).
``labels=run`` names series by run directory (two runs of one method, e.g. pool vs searched set).

A run directory is a training run (``results.json`` from ``train.py``: the trained
configuration's metric, or ``metric@budget`` for multi-configuration methods) or an evaluation
(``results.json`` from ``evaluate.py``: one row per configuration). Rows are (method, avg bits,
metric, kind, training seconds, run).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coalora.io import atomic_write, atomic_write_text  # noqa: E402
from coalora.report.curves import read_metrics_csv  # noqa: E402
from coalora.report.plots import plot_metric_vs_bits  # noqa: E402


def rows_of(run: Path) -> list[dict]:
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(
            f"error: {run} has no results.json (runs=<run dirs of train.py/evaluate.py>)"
        )
    res = json.loads(path.read_text())
    seed = res.get("seed")
    if "rows" in res:  # evaluate.py
        return [
            {"method": res["method"], "run": str(run), "fit_seconds": None, "seed": seed, **r}
            for r in res["rows"]
        ]
    method, metrics = res["method"], res["metrics"]
    out = []
    budgets = res.get("eval_avg_bits") or {}
    for key, value in metrics.items():
        name, _, label = key.partition("@")
        if label and label in budgets:
            out.append(
                {
                    "method": method,
                    "run": str(run),
                    "kind": "allocation",
                    "budget": float(label),
                    "avg_bits": budgets[label],
                    name.split("/")[-1]: value,
                    "fit_seconds": res.get("fit_seconds"),
                    "seed": seed,
                }
            )
        elif not label and "avg_bits" in res:
            out.append(
                {
                    "method": method,
                    "run": str(run),
                    "kind": "allocation",
                    "budget": None,
                    "avg_bits": res["avg_bits"],
                    name.split("/")[-1]: value,
                    "fit_seconds": res.get("fit_seconds"),
                    "seed": seed,
                }
            )
        elif not label:
            out.append(
                {
                    "method": method,
                    "run": str(run),
                    "kind": "full precision",
                    "budget": None,
                    "avg_bits": 32.0,
                    name.split("/")[-1]: value,
                    "fit_seconds": res.get("fit_seconds"),
                    "seed": seed,
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    runs, rest = [], []
    for a in argv:
        if a.startswith("runs="):
            runs += [p for p in a[5:].split(",") if p]
        elif a.startswith(("out=", "wandb=", "aggregate=", "curves=", "labels=")):
            rest += ["--" + a.split("=", 1)[0], a.split("=", 1)[1]]
        else:
            rest.append(a)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--out", default="outputs/compare")
    ap.add_argument("--wandb", default="false")
    ap.add_argument("--aggregate", default="false", help="pool seeds: mean, std, n per cell")
    ap.add_argument("--curves", default="false", help="also plot the runs' training loss")
    ap.add_argument(
        "--labels", default="method", choices=["method", "run"],
        help="series names: the method, or the run directory's name (same method, other data)",
    )  # fmt: skip
    args = ap.parse_args(rest)
    runs += args.runs
    if not runs:
        raise SystemExit("error: no runs given (runs=<dir>[,<dir>...])")
    rows = [r for run in runs for r in rows_of(Path(run))]
    if args.labels == "run":
        for r in rows:
            r["method"] = f"{r['method']} ({Path(r['run']).name})"
    metric = next((k for k in ("acc", "mcc", "f1", "pearson") if any(k in r for r in rows)), None)
    if metric is None:
        raise SystemExit("error: no task metric found in the runs' results")
    rows = [r for r in rows if metric in r]
    rows.sort(key=lambda r: (r["method"], r["avg_bits"]))
    out = Path(args.out)
    cols = ["method", "kind", "budget", "avg_bits", metric, "fit_seconds", "seed", "run"]
    if _truthy(args.aggregate):
        rows = aggregate_seeds(rows, metric)
        cols = ["method", "kind", "budget", "avg_bits", metric, f"{metric}_std", "n", "seeds"]
        cols += ["fit_seconds"]
    md = [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    table = "\n".join(md) + "\n" + hypervolume_lines(rows, metric)
    atomic_write_text(out / "comparison.md", table)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / "comparison.csv", write_csv)
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["avg_bits"] < 16:
            series.setdefault(r["method"], []).append(r)
    plot_metric_vs_bits(series, out / f"{metric}_vs_bits.png", metric=metric)
    print(table)
    print(f"wrote {out}/comparison.md, comparison.csv, {metric}_vs_bits.png")
    if _truthy(args.curves):
        path = plot_loss_overlay(
            [Path(r) for r in runs], out / "train_loss.png", by_run=args.labels == "run"
        )
        print(f"wrote {path}")
    if _truthy(args.wandb):
        import wandb

        run = wandb.init(project="coalora", job_type="compare")
        run.log(
            {"comparison": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}
        )
        run.finish()


LOWER_IS_BETTER = {"loss", "mse"}


def hypervolume_lines(rows: list[dict], metric: str) -> str:
    """Per method, the area its (average bits, error) points dominate -- error = 1 − metric --
    up to a common reference (largest quantized average bits + 0.25, error 1). One number that
    rewards accuracy at every budget and accuracy at fewer bits; larger is better."""
    if metric in LOWER_IS_BETTER:
        return ""
    pts = [r for r in rows if r["avg_bits"] < 16]
    if not pts:
        return ""
    from coalora.search.pareto import hypervolume_2d

    ref = (max(r["avg_bits"] for r in pts) + 0.25, 1.0)
    lines = [
        "",
        f"Hypervolume of (average bits, 1 − {metric}), reference {ref[0]:.2f} bits / 1.0:",
        "",
    ]
    for method in sorted({r["method"] for r in pts}):
        mine = [(r["avg_bits"], 1.0 - r[metric]) for r in pts if r["method"] == method]
        lines.append(f"* {method}: {hypervolume_2d(mine, ref):.4f} ({len(mine)} points)")
    return "\n".join(lines) + "\n"


def _truthy(value: str) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def aggregate_seeds(rows: list[dict], metric: str) -> list[dict]:
    """One row per (method, kind, budget) -- per avg_bits when there is no budget -- holding the
    mean metric over the rows (seeds), its sample standard deviation, n and the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        cell = r["budget"] if r.get("budget") is not None else round(float(r["avg_bits"]), 2)
        groups.setdefault((r["method"], r["kind"], cell), []).append(r)
    out = []
    for (method, kind, _), grp in groups.items():
        values = np.array([g[metric] for g in grp], dtype=float)
        fits = [g["fit_seconds"] for g in grp if g.get("fit_seconds") is not None]
        out.append(
            {
                "method": method,
                "kind": kind,
                "budget": grp[0].get("budget"),
                "avg_bits": float(np.mean([g["avg_bits"] for g in grp])),
                metric: float(values.mean()),
                f"{metric}_std": float(values.std(ddof=1)) if len(values) > 1 else None,
                "n": len(values),
                "seeds": " ".join(str(g.get("seed")) for g in grp),
                "fit_seconds": float(np.mean(fits)) if fits else None,
            }
        )
    out.sort(key=lambda r: (r["method"], r["avg_bits"]))
    return out


def run_label(run: Path, by_run: bool = False) -> str:
    """``method@bits seed`` from a training run's results.json (or the run's directory name)."""
    if by_run:
        return run.name
    res = json.loads((run / "results.json").read_text())
    bits = res.get("avg_bits")
    where = f"@{bits:.2f}" if isinstance(bits, (int, float)) else ""
    return f"{res.get('method', run.name)}{where} s{res.get('seed')}"


def plot_loss_overlay(
    runs: list[Path], path: Path, smooth: float = 0.9, by_run: bool = False
) -> Path:
    """Training loss (EMA-smoothed) of every run that has ``csv/metrics.csv``, on one axis; next
    to it the primary validation metric against the step when the runs logged it more than once."""
    logs = {run: read_metrics_csv(run / "csv" / "metrics.csv") for run in runs
            if (run / "csv" / "metrics.csv").is_file()}  # fmt: skip
    val_key = next(
        (k for series in logs.values() for k in series
         if k.startswith("val/") and "@" not in k and len(series[k]) > 1),
        None,
    )  # fmt: skip
    fig, axes = plt.subplots(1, 2 if val_key else 1, figsize=(12 if val_key else 7, 4))
    ax = axes[0] if val_key else axes
    for run, series in logs.items():
        points = series.get("train/loss", [])
        if not points:
            continue
        ema, ys = None, []
        for _, v in points:
            ema = v if ema is None else smooth * ema + (1 - smooth) * v
            ys.append(ema)
        (line,) = ax.plot([s for s, _ in points], ys, label=run_label(run, by_run), linewidth=1)
        if val_key and series.get(val_key):
            steps, vals = zip(*series[val_key], strict=True)
            axes[1].plot(steps, vals, marker="o", markersize=3, color=line.get_color(), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (EMA {smooth})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if val_key:
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(val_key)
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


if __name__ == "__main__":
    main()
