"""notebooks/analysis.ipynb runs top to bottom on a folder of train/evaluate/search outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "analysis.ipynb"


def write(run: Path, name: str, obj) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def outputs(root: Path) -> Path:
    """Two sweeps whose job 0 are different runs, an evaluation and a search."""
    for date, accs in (("2026-12-01_10-00-00", (0.80, 0.84)), ("2026-12-01_11-00-00", (0.6, 0.7))):
        for job, (bits, acc) in enumerate(zip((2.5, 3.0), accs, strict=True)):
            write(root / "multirun" / date / str(job), "results.json",
                  {"model": "minilm_l6", "task": "sst2", "method": "qlora", "seed": 0,
                   "avg_bits": bits, "fit_seconds": 50.0, "metrics": {"val/acc": acc},
                   "config": {"lr": 1e-3 if date.endswith("10-00-00") else 5e-4}})  # fmt: skip
    coa = root / "sst2" / "coalora" / "2026-12-01_12-00-00"
    write(coa, "results.json",
          {"model": "minilm_l6", "task": "sst2", "method": "coalora", "seed": 0,
           "fit_seconds": 200.0, "train_configs": 16, "eval_avg_bits": {"3.0": 2.99},
           "metrics": {"val/acc@3.0": 0.85}})  # fmt: skip
    write(root / "evaluate" / "2026-12-01_13-00-00", "results.json",
          {"ckpt": str(coa), "method": "coalora",
           "rows": [{"budget": 3.0, "kind": "allocation", "avg_bits": 2.99, "adapt_ms": 2.0,
                     "acc": 0.85},
                    {"budget": 3.0, "kind": "random0", "avg_bits": 3.04, "adapt_ms": 3.0,
                     "acc": 0.84}]})  # fmt: skip
    search = root / "search" / "sst2" / "minilm_l6" / "2026-12-01_14-00-00"
    write(search, "results.json", {"model": "minilm_l6", "task": "sst2", "hypervolume": [1, 2]})
    write(search, "observations.csv",
          "id,source,generator,iteration,avg_bits,loss,pareto,front,seconds\n"
          "o0000,initial,,0,2.5,0.7,True,True,0.1\no0001,search/iter1,discrete,1,3.0,0.6,False,True,0.1\n")  # fmt: skip
    write(search, "hypervolume.csv", "iteration,hypervolume\n0,1.0\n1,2.0\n")
    return root


def run_notebook(out_root: Path, aggregate: bool = False) -> dict:
    nb = json.loads(NOTEBOOK.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert re.search(r"^OUTPUTS = Path\(", code, flags=re.M), "OUTPUTS must be set at the top"
    code = re.sub(r"^OUTPUTS = .*$", f"OUTPUTS = Path({str(out_root)!r})", code, flags=re.M)
    code = re.sub(r"^AGGREGATE = .*$", f"AGGREGATE = {aggregate}", code, flags=re.M)
    import matplotlib.pyplot as plt

    ns: dict = {}
    shown = []
    original = plt.show
    plt.show = lambda *a, **k: (shown.append(plt.gcf()), plt.close("all"))
    try:
        exec(compile(code, str(NOTEBOOK), "exec"), ns)
    finally:
        plt.show = original
    ns["_figures"] = shown
    return ns


def test_notebook_reads_train_evaluate_and_search_runs(tmp_path):
    ns = run_notebook(outputs(tmp_path / "outputs"))
    frame = ns["frame"]
    assert set(frame["source"]) == {"train", "evaluate"}
    assert len(ns["search_dirs"]) == 1
    assert "random0" in set(frame["kind"])  # the evaluation's random configurations are kept
    # job 0 of the two sweeps: two series (their lr differs), never one averaged point
    qlora = sorted(frame[frame["method"] == "qlora"]["series"].unique())
    assert len(qlora) == 2
    assert len(ns["_figures"]) == 2  # metric-vs-bits and the search plot
    assert "N=16" in ns["times"].columns


def test_notebook_aggregate_keeps_the_sweeps_apart(tmp_path):
    ns = run_notebook(outputs(tmp_path / "outputs"), aggregate=True)
    table = ns["table"]
    q = table[(table["method"] == "qlora") & (table["avg_bits"] == 2.5)]
    assert len(q) == 2 and set(q["n"]) == {1}
    assert isinstance(ns["display_table"], pd.DataFrame)
