"""scripts/decoder_report.py on committed SmolLM2 results: the tables, the paired block bootstrap
(its point difference equals the two runs' perplexities), the held-out rows and the figure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "decoder_smollm2"
RUNS = ("coalora_s42", "shared_lora_s42", "qlora_b3.0")


@pytest.mark.skipif(
    not all((RESULTS / r / "predictions.csv").is_file() for r in RUNS),
    reason="the committed decoder comparison results are not in this checkout",
)
def test_report_tables_and_paired_differences(tmp_path):
    results = tmp_path / "results"
    for r in RUNS:
        shutil.copytree(RESULTS / r, results / r)
    out, fig = tmp_path / "report.md", tmp_path / "fig.png"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "decoder_report.py"), "--results", str(results),
         "--base", str(ROOT / "docs" / "results" / "decoder_quantized_base.json"),
         "--out", str(out), "--figure", str(fig), "--reps", "200"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    text = out.read_text()
    assert fig.is_file() and fig.stat().st_size > 10_000
    assert "| (f) CoA-LoRA | 5.33e+06 | 896.7 | 40.96 | 33.10 | coalora_s42 |" in text
    assert "| (c) QLoRA, one adapter per budget | — | 88.72 | — | — | qlora_b3.0 |" in text
    assert "Not run yet: (b) LoRA, full-precision base; (d) LQ-LoRA, one per budget;" in text
    # paired rows: difference = ppl(CoA-LoRA) - ppl(other), interval around it
    rows = re.findall(r"^\| coalora_s42 \| (shared_lora_s42|qlora_b3\.0) \| (\S+) \| "
                      r"(\S+) \| (\S+) \| (\S+) \| \[(\S+), (\S+)\] \|", text, re.M)  # fmt: skip
    by = {(who, col): vals for who, col, *vals in rows}
    a, b, diff, lo, hi = by[("shared_lora_s42", "3.5")]
    assert float(a) - float(b) == pytest.approx(float(diff), abs=0.01)
    assert float(lo) < float(diff) < float(hi) < 0  # CoA-LoRA lower at 3.5 bits, seed 42
    assert ("qlora_b3.0", "3") in by and ("shared_lora_s42", "4-random0") in by
    # goal lines: CoA-LoRA (40 steps here, not 4x) has no 4x series, so none is printed
    assert "### Goal lines" in text
