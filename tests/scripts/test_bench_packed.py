"""scripts/bench_packed.py on tiny_llama (the decoder path): resident and exported bytes split into
packed targets + non-target weights, the four configurations switch from the cache, the deploy
export serves the training-time logits, and the MiniLM-only parts refuse another model."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_packed.py"


def run_bench(argv: list[str], monkeypatch) -> None:
    """``python scripts/bench_packed.py <argv>``, in this process."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def test_decoder_bytes_switch_and_deploy(tmp_path, monkeypatch):
    out = tmp_path / "packed"
    run_bench(
        ["--model", "tiny_llama", "--parts", "bytes,switch,deploy", "--reps", "1", "--batch", "2",
         "--seq", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
         # a 12-option space (bits x block0) keeps the error table and the four MILPs to a second
         "--space", "bits0=[8]", "dtype1=[fp32]", "block1=[256]"],
        monkeypatch,
    )  # fmt: skip
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    assert res["model"] == "tiny_llama"
    assert [r["budget"] for r in res["bytes"]] == [2.5, 3.0, 3.5, 4.0]
    for r in res["bytes"]:
        assert r["average_bits"] <= r["budget"] + 1e-9
        assert r["resident_bytes"] == r["packed_target_bytes"] + r["non_target_bytes"]
        assert r["dequantized_resident_bytes"] > r["fp_bytes"] > r["resident_bytes"]
    switch = {r["storage"]: r for r in res["switch"]}
    assert switch["packed"]["layers"] == switch["dequantized"]["layers"] == 14  # 2 blocks x 7
    assert switch["packed"]["entries"] == switch["dequantized"]["entries"]
    assert switch["packed"]["cache_mb"] < switch["dequantized"]["cache_mb"]
    d = res["deploy"]
    assert d["max_abs_logit_diff_deploy_vs_training"] < 1e-4
    assert d["latency_batch"] == [2, 16]
    served = {"deploy_packed_3.0", "training_dequantized_3.0", "deploy_packed_nf4"}
    assert served <= set(d["latency_ms"])
    for r in d["sizes"]:  # loaded = packed entries + non-target weights (+ non-persistent buffers)
        on_disk = r["packed_data_bytes"] + r["non_target_bytes"]
        assert r["loaded_resident_bytes"] == pytest.approx(on_disk, rel=0.01)
    m = d["multi"]
    assert m["layer_option_pairs"] == 56 and m["entries"] <= 56
    assert m["packed_data_bytes"] <= m["sum_of_single_exports_bytes"]
    md = out.with_suffix(".md").read_text()
    assert "(tiny_llama)" in md and "(14 target layers" in md and "batch 2 × 16" in md
    assert out.with_suffix(".json").exists()


def test_training_parts_refuse_another_model(monkeypatch):
    with pytest.raises(SystemExit, match="minilm_l6 only; for tiny_llama use"):
        run_bench(["--model", "tiny_llama", "--parts", "bytes,rss"], monkeypatch)
