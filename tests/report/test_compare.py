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
    assert (out / "acc_vs_bits.png").stat().st_size > 1000


def test_compare_rejects_a_dir_without_results(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["compare.py", f"runs={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="no results.json"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
