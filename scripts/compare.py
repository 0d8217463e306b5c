"""Compare runs across methods: one table (markdown + CSV) and plots.

    python scripts/compare.py runs=[<dir>,<dir>,...]
    python scripts/compare.py runs=outputs/multirun/2026-11-22_21-00-00     # every job of a sweep
    python scripts/compare.py 'runs=outputs/multirun/2026-11-22_21-00-00/*' aggregate=true
    python scripts/compare.py runs=[...] curves=true wandb=true

Series are keyed by (model, task, method, the settings that differ, seed): two seeds of one
method are two lines; ``aggregate=true`` pools the seeds into mean ± std (a band). The metric is
the task's (``ppl`` for decoder runs, lower is better; its plot has a log axis); ``rank`` orders
the series at each budget in its direction, and the hypervolume is of (average bits, 1 − metric)
or, for lower-is-better metrics, of (average bits, metric) (log ppl for perplexity). Outputs, in
``out`` (default ``outputs/compare/<date>``): ``comparison.md`` / ``comparison.csv``,
``<metric>_vs_bits.png``, ``time_vs_configs.png`` (measured fit times: a per-configuration method
needs one fit per configuration, CoA-LoRA one for all; arXiv 2509.25214, Figure 1) and, with
``curves=true``, ``train_loss.png``. Configuration: ``conf/compare.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from coalora.stages.entry import guarded

log = logging.getLogger("compare")


def run(cfg: DictConfig) -> dict:
    from coalora.errors import ConfigError
    from coalora.io import atomic_write_text
    from coalora.report import compare as C
    from coalora.report.curves import plot_loss_overlay, read_metrics_csv
    from coalora.report.plots import plot_metric_vs_bits, plot_time_vs_configs

    runs_cfg = cfg.runs
    specs = [str(r) for r in runs_cfg] if OmegaConf.is_list(runs_cfg) else str(runs_cfg)
    runs = C.expand_runs(specs)
    frame = C.load_frame(runs, labels=str(cfg.labels))
    metric = C.primary_metric(frame, cfg.metric)
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
        C.markdown_table(table, cols),
        C.best_lines(table, metric),
        C.hypervolume_lines(table, metric),
    ]
    if not times.empty:
        shown = sorted({1, min(4, n_max), n_max})
        md += [
            "",
            "Training time to serve N configurations (measured fit seconds; per-configuration "
            "methods fit once per configuration, shared ones once):",
            "",
        ]
        tt = times.assign(
            **{f"N={n}": [C.time_for_configs(r, n) for _, r in times.iterrows()] for n in shown}
        )
        md.append(tt.drop(columns=["method"]).to_markdown(index=False, floatfmt=".1f") + "\n")
    text = "\n".join(md)
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.csv", table[cols].to_csv(index=False))
    written = [out / "comparison.md", out / "comparison.csv"]

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
    print(text)
    print("wrote " + ", ".join(str(p) for p in written))
    if bool(cfg.wandb):
        log_wandb(cfg, out, table[cols], written)
    return {"metric": metric, "table": table[cols], "written": written}


def log_wandb(cfg: DictConfig, out: Path, table, written: list[Path]) -> None:
    """One W&B run in ``<out>/wandb`` (not the current directory) holding the resolved config,
    the table and the plots."""
    import wandb

    from coalora.stages.common import wandb_mode

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


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    guarded(run, cfg)


if __name__ == "__main__":
    main()
