import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from coalora.report.paired import lm_stats

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "paired.py"


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
    monkeypatch.setattr(sys, "argv", ["paired.py", *map(str, argv)])
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


# ---------------------------------------------------------------------- language modelling
def lm_dir(path: Path, method: str, tokens, nll: dict[str, np.ndarray], *, rows=True,
           examples=None, **res) -> Path:  # fmt: skip
    """An evaluate.py run of a decoder: per block its scored tokens (label) and summed NLL."""
    path.mkdir(parents=True)
    examples = list(range(len(tokens))) if examples is None else list(examples)
    row = {"budget": 3.0, "label": "3", "kind": "allocation", "avg_bits": 3.0, "ppl": 1.0}
    res = {"method": method, "rows": [row] if rows else [], **res}
    (path / "results.json").write_text(json.dumps(res))
    lines = ["example,label," + ",".join(nll)]
    for k in reversed(range(len(tokens))):  # any block order: matched by example index
        lines.append(
            f"{examples[k]},{int(tokens[k])}," + ",".join(repr(float(v[k])) for v in nll.values())
        )
    (path / "predictions.csv").write_text("\n".join(lines) + "\n")
    return path


def table_rows(text: str, first: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith(f"| {first}")
    ]


def population(rng, n: int):
    """Blocks with a difficulty shared by both runs; B is 5% lower per token, plus noise."""
    tokens = rng.integers(120, 256, n)
    mean_a = rng.normal(3.6, 0.3, n)  # per-token NLL: ppl around 37
    mean_b = mean_a - 0.05 + rng.normal(0, 0.02, n)
    return tokens, mean_a * tokens, mean_b * tokens


def test_lm_paired_test_matches_a_hand_computation(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    tokens, nll_a, nll_b = population(rng, 40)
    worse = nll_a + 0.2 * tokens  # a held-out configuration of B, worse than A's
    a = lm_dir(tmp_path / "a", "qlora", tokens, {"3": nll_a, "3-random0": nll_a, "2.5": nll_a})
    b = lm_dir(tmp_path / "b", "coalora", tokens, {"3": nll_b, "3-random0": worse})
    out = tmp_path / "paired.md"
    run([a, b, "--out", out], monkeypatch)
    text = out.read_text()
    assert "ppl(other) − ppl(reference)" in text
    rows = table_rows(text, "coalora")
    assert [r[1] for r in rows] == ["3", "3-random0"]  # every shared column, "2.5" is A's only
    ppl_a = math.exp(nll_a.sum() / tokens.sum())
    ppl_b = math.exp(nll_b.sum() / tokens.sum())
    assert rows[0][2:5] == [f"{ppl_a:.4f}", f"{ppl_b:.4f}", f"{ppl_b - ppl_a:+.4f}"]
    assert rows[0][7:9] == ["40", str(int(tokens.sum()))]
    assert rows[0][9] == "other lower"  # B is 5% lower per token: far beyond the 0.1% margin
    assert float(rows[0][6]) < 0.01  # B is lower in (nearly) every resample
    assert float(rows[1][4]) > 0 and float(rows[1][6]) > 0.99  # the worse column: B not lower
    lo, hi = (float(x) for x in rows[0][5].strip("[]").split(","))
    assert lo < ppl_b - ppl_a < hi < 0


def test_lm_interval_covers_the_true_difference(tmp_path):
    rng = np.random.default_rng(7)
    tokens, nll_a, nll_b = population(rng, 20000)  # the population of blocks
    true = math.exp(nll_b.sum() / tokens.sum()) - math.exp(nll_a.sum() / tokens.sum())
    pick = rng.choice(len(tokens), 80, replace=False)  # the evaluation set: 80 blocks of it
    s = lm_stats(nll_a[pick], nll_b[pick], tokens[pick])
    assert s["ci_low"] < true < s["ci_high"]
    assert not s["ci_low"] < -true < s["ci_high"]  # the sign matters: B − A, not A − B
    assert s["ppl_ref"] == pytest.approx(math.exp(nll_a[pick].sum() / tokens[pick].sum()))
    assert s["diff"] == pytest.approx(s["ppl_other"] - s["ppl_ref"])
    assert s["p_not_lower"] < 0.05


def test_lm_runs_on_other_blocks_are_refused(tmp_path, monkeypatch):
    tokens, nll_a, nll_b = population(np.random.default_rng(2), 10)
    a = lm_dir(tmp_path / "a", "qlora", tokens, {"3": nll_a})
    shifted = lm_dir(tmp_path / "b", "coalora", tokens, {"3": nll_b}, examples=range(1, 11))
    with pytest.raises(SystemExit, match="scored other evaluation blocks than"):
        run([a, shifted], monkeypatch)
    fewer = tokens.copy()
    fewer[3] -= 1
    c = lm_dir(tmp_path / "c", "coalora", fewer, {"3": nll_b})
    with pytest.raises(SystemExit, match=r"token counts differ in 1 blocks, first block 3"):
        run([a, c], monkeypatch)


def test_lm_detected_from_the_training_config(tmp_path, monkeypatch):
    tokens, nll_a, nll_b = population(np.random.default_rng(3), 10)
    trained = tmp_path / "train"
    trained.mkdir()
    (trained / "config.yaml").write_text("task:\n  name: wikitext2\n  kind: causal_lm\n")
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    a = lm_dir(tmp_path / "a", "qlora", tokens, {"3": nll_a}, rows=False, ckpt=ckpt)
    b = lm_dir(tmp_path / "b", "coalora", tokens, {"3": nll_b}, rows=False, ckpt=ckpt)
    run([a, b, "--out", tmp_path / "p.md"], monkeypatch)
    text = (tmp_path / "p.md").read_text()
    assert "ppl ref" in text and len(table_rows(text, "coalora")) == 1
    cls = eval_dir(tmp_path / "cls", "coalora", {"3": [True] * 10})
    with pytest.raises(SystemExit, match="is a classification evaluation but"):
        run([a, cls], monkeypatch)


def test_float_noise_is_no_practical_difference():
    """88.7227 vs 88.7228 ppl with an interval excluding 0 is not a difference that matters."""
    from coalora.report.paired import verdict

    assert verdict(-0.0003, -0.0000001, 88.7227).startswith("no practical difference")
    assert verdict(-2.03, -1.59, 40.0) == "other lower"
    assert verdict(0.5, 0.9, 40.0) == "other higher"
    assert verdict(-0.5, 0.9, 40.0) == "not resolved"
    # accuracy: one SST-2 dev example is 0.11 points, far above 0.1% of 0.85
    assert verdict(0.0011, 0.02, 0.85) == "other higher"
