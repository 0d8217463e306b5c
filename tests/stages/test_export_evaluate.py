"""A tiny CoA-LoRA run, then ``export.py`` (PEFT adapter) and ``evaluate.py`` on it."""

from __future__ import annotations

import csv
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from support import run_entry

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
POOL = ["method.pool.start=3.0", "method.pool.stop=4.2", "method.pool.step=0.4"]


def cli(script: str, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    return run_entry(script, args, cache)


@pytest.fixture(scope="module")
def coalora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coa")
    r = cli(
        "train.py",
        [
            "model=tiny_bert",
            f"paths.data_dir={FIX}",
            "data.allow_hub=false",
            "method=coalora",
            *POOL,
            "trainer.max_steps=3",
            "callbacks=minimal",
            "data.batch_size=8",
            f"hydra.run.dir={tmp / 'run'}",
        ],
        tmp / "cache",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_export_writes_a_peft_adapter(coalora_run):
    out = coalora_run / "adapter"
    r = cli(
        "export.py",
        [
            f"ckpt={coalora_run / 'run'}",
            "quant.budget=3.5",
            f"out_dir={out}",
            f"hydra.run.dir={coalora_run / 'export'}",
        ],
        coalora_run / "cache",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "coalora_export.json",
        "quant_config.json",
        "tokenizer_config.json",  # the tokenizer lives beside the adapter
    } <= set(names), names
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    bits = json.loads((coalora_run / "export" / "export.json").read_text())["avg_bits"]
    assert bits <= 3.5


def test_export_rejects_an_unreachable_budget(coalora_run):
    r = cli(
        "export.py",
        [
            f"ckpt={coalora_run / 'run'}",
            "quant.budget=1.0",
            f"out_dir={coalora_run / 'bad'}",
            f"hydra.run.dir={coalora_run / 'export_bad'}",
        ],
        coalora_run / "cache",
    )
    assert r.returncode == 2 and "min achievable" in r.stderr and "Traceback" not in r.stderr
    assert not (coalora_run / "bad").exists()


def test_evaluate_scores_budgets_and_random_neighbours(coalora_run):
    out = coalora_run / "eval"
    r = cli(
        "evaluate.py",
        [
            f"ckpt={coalora_run / 'run'}",
            "eval.budgets=[3.0,4.0]",
            "eval.random_per_budget=1",
            f"hydra.run.dir={out}",
        ],
        coalora_run / "cache",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {row["budget"] for row in rows} == {3.0, 4.0}
    assert all(0.0 <= row["acc"] <= 1.0 and row["adapt_ms"] >= 0 for row in rows)
    assert (out / "metric_vs_bits.png").is_file() and (out / "results.csv").is_file()
    # per-example predictions at each allocation, every dev example once, consistent with acc
    with open(out / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == ["example", "label", "3", "3-random0", "4", "4-random0"]
    assert sorted(int(p["example"]) for p in preds) == list(range(len(preds)))
    alloc = {row["budget"]: row["acc"] for row in rows if row["kind"] == "allocation"}
    for budget, key in ((3.0, "3"), (4.0, "4")):
        correct = sum(p[key] == p["label"] for p in preds) / len(preds)
        assert correct == pytest.approx(alloc[budget])
    held_out = {row["budget"]: row["acc"] for row in rows if row["kind"] == "random0"}
    for budget, key in ((3.0, "3-random0"), (4.0, "4-random0")):
        correct = sum(p[key] == p["label"] for p in preds) / len(preds)
        assert correct == pytest.approx(held_out[budget])


def test_mapper_stats_reports_a_near_identity_mixing_after_three_steps(coalora_run, monkeypatch):
    script = Path(__file__).resolve().parents[2] / "scripts" / "mapper_stats.py"
    out = coalora_run / "mapper.md"
    argv = [str(script), str(coalora_run / "run"), "--budgets", "3.0", "4.0"]
    argv += ["--cache-dir", str(coalora_run / "cache"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
    per_budget = {r[0].strip(): float(r[1]) for r in rows if r[0].strip() in ("3", "4")}
    assert set(per_budget) == {"3", "4"}
    # the mapper's last layer starts near zero (init_std 1e-3): I + γU is close to I
    assert all(0.0 <= v < 0.05 for v in per_budget.values())
    assert any("3 vs 4" in r[0] for r in rows)


def test_export_never_deletes_what_it_did_not_write(coalora_run):
    """An existing folder that is not this run's export is refused (one line, nothing touched),
    the run directory can never be the target, and re-exporting into our own export replaces it
    atomically."""
    from coalora.deploy.writer import write_export
    from coalora.errors import ConfigError

    run = (coalora_run / "run").resolve()
    stranger = coalora_run / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="overwrite=true"):
        write_export(stranger, {"a.json": {}}, run_dir=run)
    assert (stranger / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="would replace the training run"):
        write_export(run, {"a.json": {}}, run_dir=run, overwrite=True)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    afile = coalora_run / "a_file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        write_export(afile, {"a.json": {}}, run_dir=run)
    assert afile.read_text() == "x"
    ours = coalora_run / "ours"
    write_export(ours, {"first.json": {}}, run_dir=run)
    write_export(ours, {"second.json": {}}, run_dir=run)  # same run: replaced
    assert (ours / "second.json").is_file() and not (ours / "first.json").exists()
    assert not [p for p in coalora_run.iterdir() if p.name.startswith(".ours")]
    # the CLI says it in one line and exits 2
    r = cli("export.py", [f"ckpt={run}", "quant.budget=3.5", f"out_dir={stranger}",
            f"hydra.run.dir={coalora_run / 'e1'}"], coalora_run / "cache")  # fmt: skip
    assert r.returncode == 2 and "overwrite=true" in r.stderr and "Traceback" not in r.stderr


def test_a_new_run_refuses_another_runs_directory(coalora_run):
    r = cli(
        "train.py",
        ["model=tiny_bert", f"paths.data_dir={FIX}", "data.allow_hub=false", "method=lora",
         "trainer.max_steps=2", "callbacks=minimal", f"hydra.run.dir={coalora_run / 'run'}"],
        coalora_run / "cache",
    )  # fmt: skip
    assert r.returncode == 2 and "already holds another run" in r.stderr
    assert "Traceback" not in r.stderr


def test_packed_export_serves_every_budget_with_the_adapted_models_logits(coalora_run):
    """``export.py format=packed quant.budgets=[...]``: one artefact; ``deploy.load(path, budget)``
    gives the same logits as the restored run adapted to that budget."""
    import torch

    from coalora import adapt, deploy
    from coalora.quant.build import allocations
    from coalora.quant.model import model_weights
    from coalora.stages.restore import restore

    out = coalora_run / "packed"
    r = cli(
        "export.py",
        [f"ckpt={coalora_run / 'run'}", "format=packed", "quant.budgets=[3.0,4.0]",
         f"out_dir={out}", f"hydra.run.dir={coalora_run / 'pk'}"],
        coalora_run / "cache",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(deploy.labels(out)) == ["3", "4"]
    run_cfg, lit = restore(coalora_run / "run", cache_dir=coalora_run / "cache")
    weights = model_weights(lit.model, lit.method.names)
    allocs = allocations(weights, [3.0], lit.method.space, coalora_run / "cache", "tiny_bert")
    x = {"input_ids": torch.randint(5, 1000, (2, 12)), "attention_mask": torch.ones(2, 12).long()}
    with torch.no_grad():
        expected = adapt(lit, allocs[3.0])(**x).logits
        served = deploy.load(out, budget=3.0)(**x).logits
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="available"):
        deploy.load(out, budget=2.75)
    # docs/packed.md spells the budget "3.0"; the label is "3" (#20 item 12)
    assert deploy.load(out, budget="3.0").coalora_export["label"] == "3"
    # the run's tokenizer ships with the export (#20 item 11)
    from transformers import AutoTokenizer

    from coalora.models import build_tokenizer

    run_tok = build_tokenizer(run_cfg.model)
    sentence = "the export keeps its tokenizer"
    for tok in (AutoTokenizer.from_pretrained(str(out)), deploy.load_tokenizer(out)):
        assert len(tok) == len(run_tok) > 1000
        assert tok(sentence)["input_ids"] == run_tok(sentence)["input_ids"]


def test_peft_card_code_loads_the_exported_adapter(coalora_run):
    """The model card's "Load with coalora" block runs as written and gives the adapted run's
    logits (#20 item 15)."""
    import re

    import torch

    from coalora import adapt
    from coalora.quant import ModelQuantConfig
    from coalora.stages.restore import restore

    out = coalora_run / "card_adapter"
    r = cli(
        "export.py",
        [f"ckpt={coalora_run / 'run'}", "quant.budget=3.5", f"out_dir={out}",
         f"hydra.run.dir={coalora_run / 'card_export'}"],
        coalora_run / "cache",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    card = (out / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, card
    scope: dict = {}
    exec(compile(blocks[0], str(out / "README.md"), "exec"), scope)  # the card, as a user runs it
    _, lit = restore(coalora_run / "run", cache_dir=coalora_run / "cache")
    config = ModelQuantConfig.from_json(out / "quant_config.json")
    x = {"input_ids": torch.randint(5, 1000, (2, 12)), "attention_mask": torch.ones(2, 12).long()}
    with torch.no_grad():
        expected = adapt(lit, config)(**x).logits
        served = scope["model"](**x).logits
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-5)
    assert "randomly initialised" in card  # tiny_bert: no published base (peft-only section)
