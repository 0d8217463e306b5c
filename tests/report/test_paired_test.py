import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "paired_test.py"


def eval_dir(path: Path, method: str, correct: dict[str, list[bool]]) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"method": method, "rows": []}))
    budgets = list(correct)
    n = len(correct[budgets[0]])
    lines = ["example,label," + ",".join(budgets)]
    for i in reversed(range(n)):  # any example order: matched by index
        lines.append(f"{i},1," + ",".join("1" if correct[b][i] else "0" for b in budgets))
    (path / "predictions.csv").write_text("\n".join(lines) + "\n")
    return path


def run(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["paired_test.py", *map(str, argv)])
    return runpy.run_path(str(SCRIPT), run_name="__main__")


def test_paired_test_counts_discordant_pairs(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    ref = rng.random(400) < 0.8
    better = ref.copy()
    better[np.flatnonzero(~ref)[:40]] = True  # 40 examples only the other run gets right
    a = eval_dir(tmp_path / "a", "qlora", {"2.5": list(ref)})
    b = eval_dir(tmp_path / "b", "coalora", {"2.5": list(better), "3": list(ref)})
    same = eval_dir(tmp_path / "c", "shared_lora", {"2.5": list(ref)})
    out = tmp_path / "paired.md"
    run([a, b, same, "--out", out], monkeypatch)
    table = out.read_text()
    row_b = next(line for line in table.splitlines() if line.startswith("| coalora"))
    cells = [c.strip() for c in row_b.split("|")[1:-1]]
    assert cells[1] == "2.5" and cells[4] == "+10.00" and cells[5:7] == ["0", "40"]
    assert float(cells[7]) < 1e-6  # 40 vs 0 discordant: significant
    row_c = next(line for line in table.splitlines() if line.startswith("| shared_lora"))
    assert [c.strip() for c in row_c.split("|")[1:-1]][7] == "1.000"  # identical predictions


def test_paired_test_needs_predictions(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    b = eval_dir(tmp_path / "b", "coalora", {"2.5": [True, False]})
    with pytest.raises(SystemExit, match="no predictions.csv"):
        run([tmp_path / "x", b], monkeypatch)
