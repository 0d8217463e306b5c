"""scripts/bench_decoder_step.py on tiny_llama, run as a program: every variant trains (its first
step is checked and the loss falls on the repeated batch), the interleaved times give paired
ratios, the deploy export serves the training-time logits, the memory rows split resident vs packed
bytes, and the step check fails for a variant that does not train. Results are read from the JSON
and markdown the script writes."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from coalora.methods.base import Method
from coalora.quant.bnb import bnb_cpu_status

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_decoder_step.py"
# a 12-option space keeps the error table and the MILPs of the CoA-LoRA pool to a second
SMALL_SPACE = ["quant.space.bits0=[8]", "quant.space.dtype1=[fp32]", "quant.space.block1=[256]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-step-cache")


def run_script(monkeypatch, args: list[str]) -> None:
    """``python scripts/bench_decoder_step.py <args>``, in this process."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def results(out: Path) -> dict:
    return json.loads(out.with_suffix(".json").read_text())["results"]


def common(cache: Path) -> list[str]:
    args = ["--model", "tiny_llama", "--batch", "2", "--seq", "32", "--pool", "3.0,4.0,0.5"]
    args += ["--cache-dir", str(cache), "--data-dir", str(ROOT / "tests" / "fixtures")]
    return args + [x for o in SMALL_SPACE for x in ("--override", o)]


def test_every_variant_trains_and_is_timed(cache, tmp_path, monkeypatch):
    variants = ["coalora", "qlora_packed", "qlora_dequantized", "lora"]
    if bnb_cpu_status() is None:  # bitsandbytes runs on this CPU
        variants.append("peft_bnb")
    out = tmp_path / "bench"
    run_script(
        monkeypatch,
        [*common(cache), "--reps", "1", "--parts", "speed,infer", "--variants",
         ",".join(variants), "--out", str(out)],
    )  # fmt: skip
    res = results(out)
    speed = res["speed"]["variants"]
    assert list(speed) == variants
    for name, r in speed.items():
        c = r["check"]
        assert math.isfinite(c["loss"]) and c["grad_norm"] > 0 and c["moved"] > 0, name
        assert len(r["losses"]) == len(r["wall_s"]) + 1 == 2  # checked warm-up + 1 round
        if name != "coalora":  # same batch, same base: one AdamW step lowers the loss
            assert r["losses"][1] < r["losses"][0], name
    lora_params = {speed[v]["check"]["trainable_params"] for v in variants if v != "coalora"}
    assert len(lora_params) == 1  # PEFT and coalora inject the same r=8 LoRA
    assert speed["coalora"]["check"]["trainable_params"] > lora_params.pop()  # + the mapper
    if "peft_bnb" in speed:
        assert "14 Linear4bit layers" in speed["peft_bnb"]["notes"]
    pair = next(p for p in res["speed"]["pairs"] if (p["a"], p["b"]) == ("qlora_packed", "qlora_dequantized"))  # fmt: skip
    assert pair["goal"] == 1.15 and pair["paired_median"] > 0
    infer = res["infer"]
    assert infer["max_abs_logit_diff_deploy_vs_training"] < 1e-4
    assert {"deploy_packed_3.0", "coalora_training_3.0", "qlora_packed_nf4"} <= set(
        infer["median_ms"]
    )
    md = out.with_suffix(".md").read_text()
    assert "load average: start" in md and "| qlora_packed / qlora_dequantized |" in md
    assert out.with_suffix(".json").exists()


def test_memory_rows_split_resident_and_packed_bytes(cache, tmp_path, monkeypatch):
    out = tmp_path / "rss"
    run_script(
        monkeypatch,
        [*common(cache), "--steps", "1", "--parts", "rss", "--rss-variants",
         "qlora_packed,coalora", "--out", str(out)],
    )  # fmt: skip
    packed, coalora = results(out)["rss"]  # each measured in a child process
    multi = coalora["weights"]
    w = packed["weights"]
    assert w["original"] == 0  # QLoRA drops the fp32 originals: one fixed configuration
    assert multi["original"] > 0  # CoA-LoRA keeps them for configurations not seen yet
    assert w["resident_over_packed"] == pytest.approx(1.0, abs=0.02)
    assert packed["peak_process_kb"] > 0 and packed["rss_anon_end_kb"] > 0
    assert packed["check"]["moved"] > 0 and len(packed["losses"]) == 1
    assert "| qlora_packed |" in out.with_suffix(".md").read_text()


def test_the_step_check_fails_when_a_variant_does_not_train(cache, tmp_path, monkeypatch):
    args = [*common(cache), "--reps", "1", "--parts", "speed", "--variants", "qlora_packed"]
    args += ["--out", str(tmp_path / "check")]
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="moved no parameter"):
        m.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)  # steps nothing
        run_script(m, args)
    loss = Method.training_loss

    def unfreezing(self, model, batch, step):
        model.get_input_embeddings().weight.requires_grad_(True)  # a base weight trains
        return loss(self, model, batch, step)

    monkeypatch.setattr(Method, "training_loss", unfreezing)
    with pytest.raises(AssertionError, match="frozen parameters got gradients"):
        run_script(monkeypatch, args)
