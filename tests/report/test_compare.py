import csv
import json
import math
import os
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

from coalora.errors import ConfigError
from coalora.report import compare as C
from coalora.report import runs as R

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare.py"


def write(run: Path, obj: dict, loss_points: int = 0) -> Path:
    run.mkdir(parents=True)
    obj = {"model": "minilm_l6", "task": "sst2", **obj}
    (run / "results.json").write_text(json.dumps(obj))
    if loss_points:
        rows = "".join(f"0,{10 * i + 9},{1.0 / (i + 1)},\n" for i in range(loss_points))
        (run / "csv").mkdir()
        (run / "csv" / "metrics.csv").write_text(
            "epoch,step,train/loss,val/acc\n" + rows + f"0,{10 * loss_points - 1},,0.8\n"
        )
    return run


def compare(tmp_path: Path, monkeypatch, *args: str) -> Path:
    out = tmp_path / "cmp"
    argv = ["compare.py", f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}", *args]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return out


def runs_arg(runs) -> str:
    return "runs=[" + ",".join(map(str, runs)) + "]"


def coalora_run(path: Path, seed: int = 0, accs=(0.80, 0.85), fit: float = 10.0) -> Path:
    return write(
        path,
        {
            "method": "coalora",
            "seed": seed,
            "fit_seconds": fit,
            "train_configs": 16,
            "eval_avg_bits": {"2.5": 2.49, "3": 2.99},
            "metrics": {"val/acc@2.5": accs[0], "val/acc@3.0": accs[1], "val/acc@mean": 0.8},
        },
    )


def test_compare_builds_table_and_plots(tmp_path, monkeypatch):
    coa = coalora_run(tmp_path / "coa")
    ql = write(
        tmp_path / "ql",
        {"method": "qlora", "avg_bits": 2.99, "fit_seconds": 5.0, "metrics": {"val/acc": 0.86}},
    )
    out = compare(tmp_path, monkeypatch, runs_arg([coa, ql]))
    table = (out / "comparison.md").read_text()
    header = table.splitlines()[0]
    assert "model" in header and "task" in header and "minilm_l6" in table and "sst2" in table
    assert "coalora" in table and "qlora" in table and "0.8500" in table
    # "3" and "3.0" are one budget: the label written as 3.0 matches eval_avg_bits["3"]
    assert len(pd.read_csv(out / "comparison.csv").query("method == 'coalora'")) == 2
    # hypervolume of (bits, 1 - acc) with reference (3.24, 1.0): coalora's staircase area
    coa_hv = (3.24 - 2.49) * (1 - 0.20) + (3.24 - 2.99) * (0.20 - 0.15)
    assert f"* coalora: {coa_hv:.4f} (2 points)" in table
    assert (out / "acc_vs_bits.png").stat().st_size > 1000
    assert (out / "time_vs_configs.png").stat().st_size > 1000


def test_compare_rejects_a_dir_without_results(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        compare(tmp_path, monkeypatch, f"runs={tmp_path / 'empty'}")
    assert "has no results.json" in capsys.readouterr().err


def test_two_seeds_of_one_method_are_two_series(tmp_path):
    runs = [
        coalora_run(tmp_path / "a", seed=1, accs=(0.80, 0.85)),
        coalora_run(tmp_path / "b", seed=2, accs=(0.70, 0.90)),
    ]
    frame = R.load_frame(runs)
    assert sorted(frame["series"].unique()) == ["coalora seed 1", "coalora seed 2"]
    # each line is monotone in bits: no zigzag through both runs' points
    for _, grp in frame.groupby("series"):
        assert grp.sort_values("avg_bits")["acc"].is_monotonic_increasing
    agg = C.aggregate_seeds(frame, "acc")
    assert agg["series"].unique().tolist() == ["coalora"]
    row = agg[agg["budget"] == 2.5].iloc[0]
    assert row["acc"] == pytest.approx(0.75) and row["n"] == 2 and row["seeds"] == "1 2"


def test_settings_that_differ_name_the_series(tmp_path):
    a = coalora_run(tmp_path / "pool")
    b = coalora_run(tmp_path / "searched")
    for run, configset in ((a, None), (b, "x/configset.json")):
        res = json.loads((run / "results.json").read_text())
        res["config"] = {"name": "coalora", "rank": 8, "configset": configset}
        (run / "results.json").write_text(json.dumps(res))
    names = sorted(R.load_frame([a, b])["series"].unique())
    assert names == ["coalora configset=None", "coalora configset=x/configset.json"]
    assert sorted(R.load_frame([a, b], labels="run")["series"].unique()) == ["pool", "searched"]


def test_sweep_folder_and_glob_skip_multirun_yaml(tmp_path):
    sweep = tmp_path / "multirun" / "2026-12-01_10-00-00"
    for job, budget in ((0, 2.5), (1, 3.0), (10, 4.0)):
        write(sweep / str(job), {"method": "qlora", "avg_bits": budget, "seed": 0,
                                 "metrics": {"val/acc": 0.8}})  # fmt: skip
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    by_folder = R.expand_runs([str(sweep)])
    assert [p.name for p in by_folder] == ["0", "1", "10"]
    assert R.expand_runs([f"{sweep}/*"]) == by_folder
    # one seed of a per-budget sweep is one line through its budgets
    assert R.load_frame(by_folder)["series"].unique().tolist() == ["qlora"]
    with pytest.raises(ConfigError, match="matches no path"):
        R.expand_runs([f"{tmp_path}/nothing*"])


def test_aggregate_band_and_loss_overlay(tmp_path, monkeypatch):
    runs = []
    for seed, acc in ((1, 0.80), (2, 0.84), (3, 0.82)):
        runs.append(
            write(
                tmp_path / f"ql{seed}",
                {"method": "qlora", "avg_bits": 2.5, "seed": seed, "metrics": {"val/acc": acc}},
                loss_points=3,
            )
        )
    runs.append(
        write(tmp_path / "lq", {"method": "lq_lora", "avg_bits": 2.5, "metrics": {"val/acc": 0.7}})
    )
    out = compare(tmp_path, monkeypatch, runs_arg(runs), "aggregate=true", "curves=true")
    frame = pd.read_csv(out / "comparison.csv")
    assert list(frame.columns[:9]) == ["series", "model", "task", "method", "kind", "budget",
                                       "avg_bits", "acc", "acc_std"]  # fmt: skip
    qlora = frame[frame["method"] == "qlora"].iloc[0]
    assert qlora["acc"] == pytest.approx(0.82) and qlora["acc_std"] == pytest.approx(0.02)
    assert qlora["n"] == 3 and qlora["seeds"] == "1 2 3"
    lq = frame[frame["method"] == "lq_lora"].iloc[0]
    assert pd.isna(lq["acc_std"]) and lq["n"] == 1  # one run: no standard deviation
    assert (out / "train_loss.png").stat().st_size > 1000
    assert (out / "acc_vs_bits.png").stat().st_size > 1000


def test_short_runs_write_no_empty_loss_plot(tmp_path, monkeypatch, capsys):
    run = write(
        tmp_path / "short",
        {"method": "qlora", "avg_bits": 2.5, "metrics": {"val/acc": 0.8}},
        loss_points=1,
    )
    out = compare(tmp_path, monkeypatch, f"runs={run}", "curves=true")
    assert not (out / "train_loss.png").exists()
    assert "no run logged train/loss" in capsys.readouterr().out  # Hydra logs to stdout


def test_time_for_configs_linear_vs_flat(tmp_path, monkeypatch):
    runs = [coalora_run(tmp_path / "coa", fit=300.0)]
    for budget in (2.5, 3.0):
        runs.append(
            write(
                tmp_path / f"ql{budget}",
                {
                    "method": "qlora",
                    "avg_bits": budget,
                    "fit_seconds": 100.0,
                    "seed": 0,
                    "metrics": {"val/acc": 0.8},
                },
            )  # fmt: skip
        )
    times = C.fit_time_table(R.load_frame(runs)).set_index("series")
    assert times.loc["qlora", "runs"] == 2 and not times.loc["qlora", "shared"]
    assert C.time_for_configs(times.loc["qlora"], 20) == pytest.approx(2000.0)
    assert C.time_for_configs(times.loc["coalora"], 1) == C.time_for_configs(
        times.loc["coalora"], 20
    )  # no evaluation recorded an adaptation time: flat
    out = compare(tmp_path, monkeypatch, runs_arg(runs), "time_max_configs=20")
    text = (out / "comparison.md").read_text()
    assert "N=20" in text and "2000.0" in text


def test_evaluate_runs_take_model_and_task_from_the_trained_run(tmp_path):
    trained = coalora_run(tmp_path / "train")
    ev = tmp_path / "eval"
    ev.mkdir()
    rows = [{"budget": 3.0, "kind": "allocation", "avg_bits": 2.99, "adapt_ms": 2.0, "acc": 0.84},
            {"budget": 3.0, "kind": "random0", "avg_bits": 3.05, "adapt_ms": 4.0, "acc": 0.83}]  # fmt: skip
    (ev / "results.json").write_text(
        json.dumps({"ckpt": str(trained), "method": "coalora", "rows": rows})
    )
    frame = R.load_frame([ev])
    assert set(frame["model"]) == {"minilm_l6"} and set(frame["task"]) == {"sst2"}
    assert set(frame["kind"]) == {"allocation", "random0"}
    times = C.fit_time_table(R.load_frame([trained, ev])).set_index("method")
    assert times.loc["coalora", "adapt_ms"] == pytest.approx(3.0)


@pytest.mark.slow  # wandb start-up takes ~25 s on a loaded 2-core CPU
def test_wandb_logs_into_the_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    ql = write(tmp_path / "ql", {"method": "qlora", "avg_bits": 3.0, "metrics": {"val/acc": 0.8}})
    out = compare(tmp_path, monkeypatch, f"runs={ql}", "wandb=true")
    assert list((out / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "wandb").exists()
    assert os.getcwd() == str(tmp_path)


def test_job_zero_of_two_sweeps_stays_two_runs(tmp_path):
    runs = []
    for date, acc in (("2026-12-01_10-00-00", 0.80), ("2026-12-01_11-00-00", 0.70)):
        runs.append(
            write(
                tmp_path / "multirun" / date / "0",
                {"method": "qlora", "avg_bits": 3.0, "seed": 0, "metrics": {"val/acc": acc}},
            )
        )
    frame = R.load_frame(runs)
    assert sorted(frame["series"]) == [
        "qlora (2026-12-01_10-00-00/0)",
        "qlora (2026-12-01_11-00-00/0)",
    ]
    agg = C.aggregate_seeds(frame, "acc")
    assert len(agg) == 2 and set(agg["n"]) == {1}  # never averaged together
    assert sorted(R.load_frame(runs, labels="run")["series"]) == [
        "2026-12-01_10-00-00/0",
        "2026-12-01_11-00-00/0",
    ]


# ---------------------------------------------------------------------- lower-is-better (LM)
def lm_eval_run(path: Path, method: str, log_ppl: dict[float, float], **extra) -> Path:
    """An evaluate.py run of a decoder: one allocation row per budget (avg_bits = budget) with
    ppl = exp(log_ppl), nll = log_ppl, and an lm-eval zero-shot score (not the task metric)."""
    rows = [
        {"budget": b, "label": f"{b:g}", "kind": "allocation", "avg_bits": b, "switch_ms": 1.0,
         "adapt_ms": 2.0, "ppl": math.exp(v), "nll": v, "arc_easy/acc": 0.9}
        for b, v in log_ppl.items()
    ]  # fmt: skip
    path.mkdir(parents=True)
    res = {"method": method, "model": "smollm2_135m", "task": "wikitext2", "rows": rows, **extra}
    (path / "results.json").write_text(json.dumps(res))
    return path


def lm_pair(tmp_path: Path) -> list[Path]:
    # coalora is better (lower ppl) at both budgets; qlora collapses at 2.5 bits
    return [
        lm_eval_run(tmp_path / "coa", "coalora", {2.5: 4.0, 3.0: 3.0}),
        lm_eval_run(tmp_path / "ql", "qlora", {2.5: 10.0, 3.0: 3.5}),
    ]


def test_lm_runs_compare_on_perplexity_lower_is_better(tmp_path):
    frame = R.load_frame(lm_pair(tmp_path))
    assert R.primary_metric(frame) == "ppl"
    assert "acc" not in frame.columns  # the zero-shot "arc_easy/acc" is not the task metric
    ranks = frame.assign(rank=C.rank_in_cells(frame, "ppl")).set_index(["method", "budget"])
    assert ranks.loc[("coalora", 2.5), "rank"] == 1 and ranks.loc[("qlora", 2.5), "rank"] == 2
    assert ranks.loc[("coalora", 3.0), "rank"] == 1 and ranks.loc[("qlora", 3.0), "rank"] == 2
    best = C.best_lines(frame, "ppl")
    assert "Best per budget (ppl, lower is better)" in best
    gap = math.exp(3.5) - math.exp(3.0)
    assert f"* allocation @ 3: coalora (ppl {math.exp(3.0):.4f}); next qlora" in best
    assert f"{gap:+.4f})" in best
    # nll is lower-is-better too, without the log
    assert C.rank_in_cells(frame, "nll").tolist() == C.rank_in_cells(frame, "ppl").tolist()


def test_higher_is_better_metrics_still_rank_the_highest_first(tmp_path):
    frame = R.load_frame([coalora_run(tmp_path / "a", accs=(0.80, 0.85)),
                          coalora_run(tmp_path / "b", accs=(0.70, 0.90))])  # fmt: skip
    ranked = frame.assign(rank=C.rank_in_cells(frame, "acc")).set_index(["run", "budget"])
    assert ranked.loc[(str(tmp_path / "a"), 2.5), "rank"] == 1
    assert ranked.loc[(str(tmp_path / "b"), 3.0), "rank"] == 1
    assert "(acc, higher is better)" in C.best_lines(frame, "acc")


def test_hypervolume_of_log_perplexity(tmp_path):
    frame = R.load_frame(lm_pair(tmp_path))
    text = C.hypervolume_lines(frame, "ppl")
    # (bits, log ppl) minimised, reference (3.0 + 0.25, 1.1 × the largest log ppl = 11)
    coa = (3.25 - 2.5) * (11 - 4.0) + (3.25 - 3.0) * (4.0 - 3.0)
    ql = (3.25 - 2.5) * (11 - 10.0) + (3.25 - 3.0) * (10.0 - 3.5)
    assert coa > ql  # the run with lower perplexity dominates more
    assert f"* coalora: {coa:.4f} (2 points)" in text and f"* qlora: {ql:.4f} (2 points)" in text
    assert "(average bits, log ppl)" in text and "11 = 1.1 × the largest log ppl" in text
    # a lower-is-better metric without a log scale: the metric itself, reference 1.1 × its max
    nll = C.hypervolume_lines(frame, "nll")
    assert f"* coalora: {coa:.4f} (2 points)" in nll and "(average bits, nll)" in nll


def test_compare_script_on_decoder_runs(tmp_path, monkeypatch):
    out = compare(tmp_path, monkeypatch, runs_arg(lm_pair(tmp_path)))
    table = pd.read_csv(out / "comparison.csv")
    assert "ppl" in table.columns and "rank" in table.columns
    assert table.set_index(["method", "budget"]).loc[("coalora", 2.5), "rank"] == 1
    text = (out / "comparison.md").read_text()
    assert "Best per budget (ppl, lower is better)" in text and "log ppl" in text
    assert (out / "ppl_vs_bits.png").stat().st_size > 1000


def test_unknown_metric_is_refused(tmp_path):
    frame = R.load_frame(lm_pair(tmp_path))
    with pytest.raises(ConfigError, match="metric='bleu' is not allowed"):
        R.primary_metric(frame, "bleu")


@pytest.mark.parametrize(("metric", "scale"), [("ppl", "log"), ("acc", "linear")])
def test_perplexity_plot_has_a_log_axis(tmp_path, monkeypatch, metric, scale):
    from coalora.report import plots

    axes = []
    subplots = plots.plt.subplots

    def spy(*args, **kwargs):
        fig, ax = subplots(*args, **kwargs)
        axes.append(ax)
        return fig, ax

    monkeypatch.setattr(plots.plt, "subplots", spy)
    values = (2.0e8, 40.0) if metric == "ppl" else (0.5, 0.8)
    rows = [{"avg_bits": b, "kind": "allocation", metric: v} for b, v in zip((2.5, 3.0), values)]
    plots.plot_metric_vs_bits({"m": rows}, tmp_path / "p.png")  # metric picked from the rows
    assert axes[0].get_yscale() == scale


def test_metric_directions_agree_with_the_task_configs():
    from omegaconf import OmegaConf

    from coalora.data.metrics import (
        METRIC_HIGHER_IS_BETTER,
        higher_is_better,
        metric_higher_is_better,
        monitor_key,
    )

    tasks = sorted((SCRIPT.parents[1] / "conf" / "task").glob("*.yaml"))
    assert len(tasks) >= 10
    for path in tasks:
        task = OmegaConf.load(path)
        assert metric_higher_is_better(monitor_key(task, prefix="")) == higher_is_better(task)
    assert {k for k, up in METRIC_HIGHER_IS_BETTER.items() if not up} == {
        "ppl", "nll", "loss", "mse"
    }  # fmt: skip
    with pytest.raises(ConfigError, match="direction is unknown"):
        metric_higher_is_better("bleu")


def test_a_budget_sweep_fills_the_budget_column_and_the_rank_header_says_what_it_ranks(
    tmp_path, monkeypatch
):
    runs = []
    for budget, acc in ((2.5, 0.80), (3.0, 0.83)):
        run = write(tmp_path / f"ql{budget}", {"method": "qlora", "avg_bits": budget + 0.004,
                                                "seed": 0, "metrics": {"val/acc": acc}})  # fmt: skip
        (run / "config.yaml").write_text(f"quant:\n  mode: budget\n  budget: {budget}\n")
        runs.append(run)
    fixed = write(tmp_path / "nf4", {"method": "qlora", "avg_bits": 4.127, "seed": 0,
                                      "metrics": {"val/acc": 0.84}})  # fmt: skip
    (fixed / "config.yaml").write_text("quant:\n  mode: nf4\n  budget: null\n")
    frame = R.load_frame([*runs, fixed])
    assert sorted(frame["budget"].dropna().tolist()) == [2.5, 3.0]
    assert frame.set_index("run").loc[str(fixed), "budget"] is None or pd.isna(
        frame.set_index("run").loc[str(fixed), "budget"]
    )
    out = compare(tmp_path, monkeypatch, runs_arg([*runs, fixed]))
    header = (out / "comparison.md").read_text().splitlines()[0]
    assert "rank by acc at the budget (1 = best)" in header
    csv_rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert {r["budget"] for r in csv_rows} >= {"2.5", "3.0"}
