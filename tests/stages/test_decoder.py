"""Decoder LMs end to end on tiny_llama + the WikiText-format fixture: every method trains and
reports perplexity, evaluation and export work, and the Pareto search runs on a causal LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import TINY_LM, run_entry

from coalora.stages.train import run as train_run

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
LM = TINY_LM
POOL = ["method.pool.start=3.0", "method.pool.stop=4.0", "method.pool.step=0.5"]
METHODS = {
    "lora": [],
    "qlora": ["quant=budget", "quant.budget=3.0"],
    "lq_lora": ["quant=budget", "quant.budget=3.0", "method.lq.table_iters=1"],
    "qwha": ["quant=budget", "quant.budget=3.0", "method.init.calib_batches=2"],
    "shared_lora": POOL,
    "coalora": POOL,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-cache")


def compose_lm(overrides: list[str], cache: Path, out: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*LM, f"paths.cache_dir={cache}",
                      f"paths.log_dir={out}", "callbacks=minimal", "logger=csv", *overrides])  # fmt: skip
    cfg.paths.output_dir = str(out / "run")
    return cfg


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_a_decoder_and_reports_perplexity(method, cache, tmp_path):
    cfg = compose_lm(
        [
            f"method={method}",
            *METHODS[method],
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ],
        cache,
        tmp_path,
    )
    results = train_run(cfg)
    ppl = {k: v for k, v in results["metrics"].items() if k.startswith("val/ppl")}
    assert ppl and all(1.0 < v < 1e6 for v in ppl.values())  # random 30k-token model: ~vocab
    nll = {k: v for k, v in results["metrics"].items() if k.startswith("val/nll")}
    for k, v in ppl.items():  # ppl = exp(mean token NLL)
        assert v == pytest.approx(float(torch.tensor(nll[k.replace("ppl", "nll")]).exp()), rel=1e-4)
    if method in ("shared_lora", "coalora"):
        assert {"val/ppl@3", "val/ppl@4", "val/ppl@mean"} <= set(ppl)


def test_coalora_decoder_evaluate_and_peft_export(cache, tmp_path):
    from peft import PeftModel

    from coalora import adapt
    from coalora.deploy.peft import load_quantized_base
    from coalora.models import build_causal_lm
    from coalora.quant.build import allocations
    from coalora.quant.model import model_weights
    from coalora.stages.restore import restore

    cfg = compose_lm(["method=coalora", *POOL, "trainer.max_steps=3"], cache, tmp_path)
    train_run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    zs = ["eval.lm_eval_tasks=[coalora_sci_mc]", f"eval.lm_eval_include=[{FIX / 'lm_eval'}]",
          "eval.lm_eval_batch_size=4"]  # fmt: skip
    r = run_entry("evaluate.py", [f"ckpt={run_dir}", "eval.budgets=[3.0]", *zs,
                  "eval.random_per_budget=1", f"hydra.run.dir={tmp_path / 'eval'}"], cache)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert rows and all(row["ppl"] > 1 for row in rows)
    zero_shot = [row for row in rows if row["kind"] == "allocation"]
    assert zero_shot and 0.0 <= zero_shot[0]["coalora_sci_mc/acc"] <= 1.0  # lm-eval, local task
    out = tmp_path / "adapter"
    r = run_entry("export.py", [f"ckpt={run_dir}", "quant.budget=3.0", f"out_dir={out}",
                  f"hydra.run.dir={tmp_path / 'exp'}"], cache)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    # vanilla peft on a plain causal LM whose target weights are quantize-dequantized
    run_cfg, lit = restore(run_dir, cache_dir=cache)
    config = allocations(model_weights(lit.model, lit.method.names), [3.0], lit.method.space,
                         cache, "tiny_llama")[3.0]  # fmt: skip
    plain = load_quantized_base(build_causal_lm(run_cfg.model, seed=run_cfg.seed), config)
    peft_model = PeftModel.from_pretrained(plain, str(out)).eval()
    x = torch.randint(200, 2000, (2, 16))
    with torch.no_grad():
        ours = adapt(lit, config)(input_ids=x).logits
        theirs = peft_model(input_ids=x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_search_runs_one_iteration_on_a_decoder(cache, tmp_path):
    r = run_entry(
        "search.py",
        [*LM, "search=quick", "search.iterations=1", "search.candidates_per_iter=1",
         "search.generator=discrete", "search.calib_batch_size=2",
         f"hydra.run.dir={tmp_path / 'search'}"],
        cache,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "search" / "results.json").read_text())
    assert summary["searched"] >= 1 and (tmp_path / "search" / "configset.json").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=minilm_l6", "task=wikitext2"], "needs a decoder model"),
        (["model=tiny_llama", "task=sst2"], "is a decoder"),
    ],
)
def test_model_task_mismatch_is_one_line(args, needle, cache, tmp_path):
    from hydra import compose, initialize_config_dir

    from coalora.errors import ConfigError
    from coalora.stages.build import check_run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*args, f"paths.data_dir={FIX}"])
    with pytest.raises(ConfigError, match=needle):
        check_run(cfg)
