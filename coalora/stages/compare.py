"""``python scripts/compare.py``: one table (markdown + CSV) and plots across runs
(conf/compare.yaml; docs/decoder_lms.md for decoder runs).

Finds the run directories and reads their rows (:mod:`coalora.report.runs`), keeps the rows that
score the metric, aggregates seeds when asked, ranks and tabulates them
(:mod:`coalora.report.compare`) and writes, into ``out``: ``comparison.md`` /
``comparison.csv``, ``<metric>_vs_bits.png``, ``time_vs_configs.png`` (measured fit times: a
per-configuration method needs one fit per configuration, CoA-LoRA one for all; arXiv
2509.25214, Figure 1) and, with ``curves=true``, ``train_loss.png``; with ``wandb=true`` also one
W&B run holding the table and the plots.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.io import atomic_write_text
from coalora.report import compare as C
from coalora.report.curves import plot_loss_overlay, read_metrics_csv
from coalora.report.plots import plot_metric_vs_bits, plot_time_vs_configs
from coalora.report.runs import expand_runs, load_frame, primary_metric
from coalora.stages.common import wandb_mode

log = logging.getLogger("compare")


def run_specs(runs_cfg: Any) -> list[str] | str:
    """``runs=[a,b]`` (a list) or ``runs=a,b`` / a glob (one string)."""
    return [str(r) for r in runs_cfg] if OmegaConf.is_list(runs_cfg) else str(runs_cfg)


def time_lines(times: pd.DataFrame, n_max: int) -> list[str]:
    """The markdown block of training time to serve 1, 4 and ``n_max`` configurations."""
    if times.empty:
        return []
    shown = sorted({1, min(4, n_max), n_max})
    tt = times.assign(
        **{f"N={n}": [C.time_for_configs(r, n) for _, r in times.iterrows()] for n in shown}
    )
    return [
        "",
        "Training time to serve N configurations (measured fit seconds; per-configuration "
        "methods fit once per configuration, shared ones once):",
        "",
        tt.drop(columns=["method"]).to_markdown(index=False, floatfmt=".1f") + "\n",
    ]


def write_plots(
    cfg: DictConfig, frame: pd.DataFrame, table: pd.DataFrame, times: pd.DataFrame, metric: str,
    out: Path, n_max: int,
) -> list[Path]:  # fmt: skip
    """``<metric>_vs_bits.png``, ``time_vs_configs.png`` and (``curves=true``)
    ``train_loss.png``, each when there is something to plot."""
    written = []
    quantized = table[table["avg_bits"] < 16]
    series = {name: grp.to_dict("records") for name, grp in quantized.groupby("series", sort=False)}
    full = table[table["avg_bits"] >= 16]
    refs = {str(r["series"]): float(r[metric]) for _, r in full.iterrows()}
    if series:
        written.append(
            plot_metric_vs_bits(series, out / f"{metric}_vs_bits.png", metric, references=refs)
        )
    if not times.empty:
        ns = list(range(1, n_max + 1))
        curves = {
            r["series"]: (ns, [C.time_for_configs(r, n) for n in ns], bool(r["shared"]))
            for _, r in times.iterrows()
        }
        written.append(plot_time_vs_configs(curves, out / "time_vs_configs.png"))
    if bool(cfg.curves):
        logs = {}
        for run_dir, name in (
            frame[["run", "series"]].drop_duplicates("run").itertuples(index=False)
        ):
            f = Path(run_dir) / "csv" / "metrics.csv"
            if f.is_file():
                logs[name] = read_metrics_csv(f)
        path = plot_loss_overlay(logs, out / "train_loss.png")
        if path is None:
            log.warning("curves=true: no run logged train/loss at two steps or more; no plot")
        else:
            written.append(path)
    return written


def run(cfg: DictConfig) -> dict:
    runs = expand_runs(run_specs(cfg.runs))
    frame = load_frame(runs, labels=str(cfg.labels))
    metric = primary_metric(frame, cfg.metric)
    frame = frame[frame[metric].notna()]
    frame = frame.sort_values(["series", "avg_bits"], kind="stable")
    aggregated = bool(cfg.aggregate)
    table = C.aggregate_seeds(frame, metric) if aggregated else frame
    table = table.assign(rank=C.rank_in_cells(table, metric))
    cols = C.table_columns(table, metric, aggregated)
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    n_max = int(cfg.time_max_configs)
    if n_max < 1:
        raise ConfigError(f"time_max_configs={n_max} must be >= 1")

    times = C.fit_time_table(frame)
    md = [
        C.markdown_table(table, cols, metric),
        C.best_lines(table, metric),
        C.hypervolume_lines(table, metric),
        *time_lines(times, n_max),
    ]
    text = "\n".join(md)
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.csv", table[cols].to_csv(index=False))
    written = [out / "comparison.md", out / "comparison.csv"]
    written += write_plots(cfg, frame, table, times, metric, out, n_max)
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    if bool(cfg.wandb):
        log_wandb(cfg, out, table[cols], written)
    return {"metric": metric, "table": table[cols], "written": written}


def log_wandb(cfg: DictConfig, out: Path, table: pd.DataFrame, written: list[Path]) -> None:
    """One W&B run in ``<out>/wandb`` (not the current directory) holding the resolved config,
    the table and the plots."""
    import wandb

    run = wandb.init(
        project=str(cfg.wandb_project),
        job_type="compare",
        dir=str(out),
        mode=wandb_mode(),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        data = table.astype(object).where(table.notna(), None)
        payload = {"comparison": wandb.Table(dataframe=data)}
        for p in written:
            if p.suffix == ".png":
                payload[f"plots/{p.stem}"] = wandb.Image(str(p))
        run.log(payload)
    finally:
        run.finish()
