"""Compare runs across methods: one table (markdown + CSV) and metric-vs-bits plots.

    python scripts/compare.py runs=<dir>[,<dir>...] [out=<dir>] [wandb=true]
    python scripts/compare.py outputs/multirun/2026-11-22_21-00-00/*  [--out DIR]

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

from coalora.io import atomic_write, atomic_write_text  # noqa: E402
from coalora.report.plots import plot_metric_vs_bits  # noqa: E402


def rows_of(run: Path) -> list[dict]:
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(
            f"error: {run} has no results.json (runs=<run dirs of train.py/evaluate.py>)"
        )
    res = json.loads(path.read_text())
    if "rows" in res:  # evaluate.py
        return [
            {"method": res["method"], "run": str(run), "fit_seconds": None, **r}
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
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    runs, rest = [], []
    for a in argv:
        if a.startswith("runs="):
            runs += [p for p in a[5:].split(",") if p]
        elif a.startswith(("out=", "wandb=")):
            rest += ["--" + a.split("=", 1)[0], a.split("=", 1)[1]]
        else:
            rest.append(a)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--out", default="outputs/compare")
    ap.add_argument("--wandb", default="false")
    args = ap.parse_args(rest)
    runs += args.runs
    if not runs:
        raise SystemExit("error: no runs given (runs=<dir>[,<dir>...])")
    rows = [r for run in runs for r in rows_of(Path(run))]
    metric = next((k for k in ("acc", "mcc", "f1", "pearson") if any(k in r for r in rows)), None)
    if metric is None:
        raise SystemExit("error: no task metric found in the runs' results")
    rows = [r for r in rows if metric in r]
    rows.sort(key=lambda r: (r["method"], r["avg_bits"]))
    out = Path(args.out)
    cols = ["method", "kind", "budget", "avg_bits", metric, "fit_seconds", "run"]
    md = [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    table = "\n".join(md) + "\n"
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
    if args.wandb.lower() in ("1", "true", "yes"):
        import wandb

        run = wandb.init(project="coalora", job_type="compare")
        run.log(
            {"comparison": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}
        )
        run.finish()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


if __name__ == "__main__":
    main()
