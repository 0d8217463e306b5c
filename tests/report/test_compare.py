import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare.py"


def write(run: Path, obj: dict) -> Path:
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(obj))
    return run


def test_compare_builds_table_and_plot(tmp_path, monkeypatch, capsys):
    coa = write(
        tmp_path / "coa",
        {
            "method": "coalora",
            "fit_seconds": 10.0,
            "eval_avg_bits": {"2.5": 2.49, "3": 2.99},
            "metrics": {"val/acc@2.5": 0.80, "val/acc@3": 0.85, "val/acc@mean": 0.825},
        },
    )
    ql = write(
        tmp_path / "ql",
        {"method": "qlora", "avg_bits": 2.99, "fit_seconds": 5.0, "metrics": {"val/acc": 0.86}},
    )
    out = tmp_path / "cmp"
    monkeypatch.setattr(sys, "argv", ["compare.py", f"runs={coa},{ql}", f"out={out}"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    table = (out / "comparison.md").read_text()
    assert "coalora" in table and "qlora" in table and "0.8500" in table
    # hypervolume of (bits, 1 - acc) with reference (3.24, 1.0): coalora's staircase area
    coa_hv = (3.24 - 2.49) * (1 - 0.20) + (3.24 - 2.99) * (0.20 - 0.15)
    assert f"* coalora: {coa_hv:.4f} (2 points)" in table
    assert (out / "acc_vs_bits.png").stat().st_size > 1000


def test_compare_rejects_a_dir_without_results(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["compare.py", f"runs={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="no results.json"):
        runpy.run_path(str(SCRIPT), run_name="__main__")


def test_compare_aggregates_seeds_and_overlays_loss(tmp_path, monkeypatch):
    runs = []
    for seed, acc in ((1, 0.80), (2, 0.84), (3, 0.82)):
        run = write(
            tmp_path / f"ql{seed}",
            {"method": "qlora", "avg_bits": 2.5, "seed": seed, "metrics": {"val/acc": acc}},
        )
        (run / "csv").mkdir()
        (run / "csv" / "metrics.csv").write_text(
            "epoch,step,train/loss,val/acc\n0,9,0.70,\n0,19,0.60,\n0,19,,0.8\n0,29,0.50,\n"
        )
        runs.append(run)
    runs.append(
        write(tmp_path / "lq", {"method": "lq_lora", "avg_bits": 2.5, "metrics": {"val/acc": 0.7}})
    )
    out = tmp_path / "cmp"
    argv = ["compare.py", f"runs={','.join(map(str, runs))}", f"out={out}"]
    monkeypatch.setattr(sys, "argv", [*argv, "aggregate=true", "curves=true"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = (out / "comparison.csv").read_text().splitlines()
    assert lines[0].split(",")[:7] == [
        "method",
        "kind",
        "budget",
        "avg_bits",
        "acc",
        "acc_std",
        "n",
    ]
    qlora = next(line.split(",") for line in lines if line.startswith("qlora"))
    assert float(qlora[4]) == pytest.approx(0.82) and float(qlora[5]) == pytest.approx(0.02)
    assert qlora[6] == "3" and qlora[7] == "1 2 3"
    lq = next(line.split(",") for line in lines if line.startswith("lq_lora"))
    assert lq[5] == "" and lq[6] == "1"  # one run: no standard deviation
    assert (out / "train_loss.png").stat().st_size > 1000
    assert (out / "acc_vs_bits.png").stat().st_size > 1000
