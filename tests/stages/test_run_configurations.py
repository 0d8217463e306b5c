"""One owner of "the configurations of this run": a tiny_llama CoA-LoRA run with
``quant.sensitivity=fisher`` trains on Fisher-weighted pool allocations, records them in
``allocations.json``, and evaluate.py / export.py (single budget and packed) use exactly the
configurations it recorded; unrecorded budgets are recomputed with the run's own settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from support import TINY_LM

from coalora.quant import ModelQuantConfig
from coalora.quant.build import solve_allocations
from coalora.quant.model import model_weights
from coalora.quant.record import RECORD_FILE, RunRecord
from coalora.search.pool import PoolGrid, initial_pool

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
LM = TINY_LM
FISHER = ["quant.sensitivity=fisher", "quant.sensitivity_examples=8", "quant.solver=lagrangian"]
POOL = ["method.pool.start=3.0", "method.pool.stop=4.0", "method.pool.step=0.25"]
BUDGETS = [2.5, 3.0, 3.5, 4.0]  # method.eval_budgets (the default)


def composed(name: str, overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from coalora.stages.train import run as train_run

    tmp = tmp_path_factory.mktemp("fisher-run")
    cfg = composed(
        "train",
        [*LM, *FISHER, *POOL, "method=coalora", f"paths.cache_dir={tmp / 'cache'}",
         f"paths.log_dir={tmp}", "callbacks=minimal", "logger=csv", "trainer.max_steps=2",
         "trainer.val_check_interval=2"],
        tmp / "run",
    )  # fmt: skip
    train_run(cfg)
    return tmp


def restored(run: Path, cache: Path | None = None):
    from coalora.stages.restore import restore

    return restore(run / "run", cache_dir=cache or run / "cache")


def test_training_records_fisher_weighted_pool_allocations(run):
    record = RunRecord.load(run / "run")
    assert record.sensitivity["kind"] == "fisher" and record.sensitivity["examples"] == 8
    assert record.solver == "lagrangian" and sorted(record.allocations) == BUDGETS
    assert all(a.info is not None and a.info.solver == "lagrangian"
               for a in record.allocations.values())  # fmt: skip
    assert record.trained is None and record.train_set
    _, lit = restored(run)
    ctx, method = lit.ctx, lit.method
    sens = ctx.sensitivity(lit.model)  # the cached Fisher the run computed
    assert sens.key.digest() == record.sensitivity["digest"]
    weights = model_weights(lit.model, method.names)
    grid = PoolGrid.from_cfg({"start": 3.0, "stop": 4.0, "step": 0.25})
    cache = run / "cache"
    fisher_pool, _ = initial_pool(weights, method.space, grid, cache, "tiny_llama", "lagrangian",
                                  sensitivity=sens)  # fmt: skip
    mse_pool, _ = initial_pool(weights, method.space, grid, cache, "tiny_llama", "lagrangian")
    assert record.train_set == fisher_pool  # trained on the Fisher-weighted pool
    assert method.train_set == fisher_pool  # ... and restored from the record
    assert mse_pool != fisher_pool  # the sensitivity changes what is trained on
    assert len(list(cache.glob("pool-v3-*.json"))) == 2  # MSE and Fisher pools: two files
    fisher_eval = solve_allocations(weights, BUDGETS, method.space, cache, "tiny_llama",
                                    "lagrangian", sens)  # fmt: skip
    for b in BUDGETS:
        assert record.allocations[b].config == fisher_eval[b].config
        assert method.eval_set[f"{b:g}"] == record.allocations[b].config


def test_evaluate_and_export_use_exactly_the_recorded_configurations(run):
    from coalora.stages.evaluate import run as evaluate_run
    from coalora.stages.export import run as export_run

    record = RunRecord.load(run / "run")
    ev = run / "eval"
    cfg = composed("evaluate", [f"ckpt={run / 'run'}", f"paths.cache_dir={run / 'cache'}",
                                "eval.random_per_budget=1", "eval.save_predictions=false"], ev)  # fmt: skip
    results = evaluate_run(cfg)
    assert results["allocations"] == {f"{b:g}": "recorded" for b in BUDGETS}
    assert results["sensitivity"] == "fisher"
    for b in BUDGETS:
        scored = ModelQuantConfig.from_json(ev / "configs" / f"{b:g}-allocation.json")
        assert scored == record.allocations[b].config
    out = run / "adapter"
    cfg = composed("export", [f"ckpt={run / 'run'}", f"paths.cache_dir={run / 'cache'}",
                              "quant.budget=3.0", f"out_dir={out}"], run / "export")  # fmt: skip
    export_run(cfg)
    exported = ModelQuantConfig.from_json(out / "quant_config.json")
    assert exported == record.allocations[3.0].config
    packed = run / "packed"
    cfg = composed("export", [f"ckpt={run / 'run'}", f"paths.cache_dir={run / 'cache'}",
                              "format=packed", f"quant.budgets={BUDGETS}", f"out_dir={packed}"],
                   run / "export_packed")  # fmt: skip
    export_run(cfg)
    for b in BUDGETS:
        config = ModelQuantConfig.from_json(packed / "configs" / f"{b:g}.json")
        assert config == record.allocations[b].config


def test_unrecorded_budgets_are_recomputed_with_the_runs_own_sensitivity(run, tmp_path):
    record = RunRecord.load(run / "run")
    _, lit = restored(run)
    got = lit.ctx.allocations(lit.model, [3.0, 3.25])
    assert got[3.0].source == "recorded" and got[3.25].source == "computed"
    sens = lit.ctx.sensitivity(lit.model)
    weights = model_weights(lit.model, lit.method.names)
    want = solve_allocations(weights, [3.25], lit.method.space, run / "cache", "tiny_llama",
                             "lagrangian", sens)[3.25]  # fmt: skip
    assert got[3.25].config == want.config
    # a cold cache: the Fisher is recomputed from the run's data on a fresh fp backbone
    _, cold = restored(run, tmp_path / "cold")
    again = cold.ctx.allocations(cold.model, [3.25])[3.25]
    assert again.config == want.config
    assert cold.ctx.sensitivity(cold.model).key == sens.key
    assert record.allocations[3.0].config == got[3.0].config


def test_a_tampered_record_warns_and_is_recomputed(run, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run / "run", copy / "run")
    path = copy / "run" / RECORD_FILE
    d = json.loads(path.read_text())
    d["solver"] = "milp"  # an edit without a matching checksum
    path.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        _, lit = restored(copy, run / "cache")
    assert any(str(path) in r.getMessage() and "SHA-256" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert lit.ctx.record is None
    record = RunRecord.load(run / "run")
    got = lit.ctx.allocations(lit.model, [3.0])[3.0]
    assert got.source == "computed" and got.config == record.allocations[3.0].config


def test_unknown_sensitivity_is_one_line_and_exit_2(tmp_path, capsys):
    from coalora.stages.entry import guarded
    from coalora.stages.train import run as train_run

    out = tmp_path / "run"
    cfg = composed("train", [*LM, "method=coalora", "quant.sensitivity=foo",
                             f"paths.cache_dir={tmp_path / 'cache'}"], out)  # fmt: skip
    with pytest.raises(SystemExit) as e:
        guarded(train_run, cfg)  # what train.py runs
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: quant.sensitivity='foo' is not allowed; allowed: ['none', 'fisher']"
    assert not out.exists()  # validated before anything is built or written
