"""``search.py`` end to end on tiny_bert: outputs, the configset trains in ``train.py``, bad input
is one clear line (exit 2, no traceback, nothing written), W&B offline, and the between-epoch
refresh callback (paper mode)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from support import run_entry

from coalora.search.configset import ConfigSet

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
COMMON = ["model=tiny_bert", f"paths.data_dir={FIXTURES}", "data.allow_hub=false"]
QUICK = [*COMMON, "search=quick"]
TRAIN = [
    *COMMON,
    "method=coalora",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "callbacks=minimal",
    "data.batch_size=8",
    "data.eval_batch_size=16",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for the module: error tables and allocations are built once."""
    return tmp_path_factory.mktemp("coalora-cache")


def run_cli(
    script: str, args: list[str], run_dir: Path, cache: Path
) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "COALORA_LOGEI_FUSED": "0"}
    return run_entry(script, [*args, f"hydra.run.dir={run_dir}"], cache, env, timeout=300)


def our_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.glob("*") if p.name != ".hydra" and not p.name.endswith(".log")]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("search") / "run"
    r = run_cli("search.py", QUICK, run_dir, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hypervolume" in r.stdout and "configset:" in r.stdout
    return run_dir


def test_search_writes_traceable_outputs(searched):
    names = {
        "configset.json",
        "observations.csv",
        "hypervolume.csv",
        "pareto.png",
        "hypervolume.png",
        "results.json",
        "config.yaml",
        "run_info.json",
    }
    assert names <= {p.name for p in searched.iterdir()}
    cs = ConfigSet.load(searched / "configset.json")
    prov = cs.provenance
    assert prov["model"] == "tiny_bert" and prov["task"] == "sst2" and prov["seed"] == 42
    assert prov["git_sha"] and prov["command"].startswith("search.py") and prov["ckpt"] is None
    rows = list(csv.DictReader(open(searched / "observations.csv")))
    assert [r["id"] for r in rows] == [e.id for e in cs.entries]
    assert [r["pareto"] == "True" for r in rows] == [e.pareto for e in cs.entries]
    for r, e in zip(rows, cs.entries):
        assert float(r["avg_bits"]) == pytest.approx(e.avg_bits, abs=1e-5)
        assert float(r["loss"]) == pytest.approx(e.objectives["loss"])
        assert float(r["seconds"]) >= 0
    assert any(r["source"].startswith("allocation@") for r in rows)
    assert any(r["source"].startswith("search/iter") for r in rows)
    assert any(r["pareto"] == "True" for r in rows)
    hv = [float(r["hypervolume"]) for r in csv.DictReader(open(searched / "hypervolume.csv"))]
    assert len(hv) == 3 and all(b >= a for a, b in itertools.pairwise(hv))
    results = json.loads((searched / "results.json").read_text())
    assert results["observations"] == len(rows) and results["selected"] == sum(
        e.pareto for e in cs.entries
    )
    assert results["seconds_per_score"] > 0


def test_configset_trains_coalora(searched, cache, tmp_path):
    path = searched / "configset.json"
    r = run_cli("train.py", [*TRAIN, f"method.configset={path}"], tmp_path / "run", cache)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    pareto = [e for e in ConfigSet.load(path).entries if e.pareto]
    assert results["global_step"] == 3 and results["train_configs"] == len(pareto)


def test_configset_for_another_model_is_one_clear_line(searched, cache, tmp_path):
    path = searched / "configset.json"
    args = [*TRAIN, f"method.configset={path}", "model.target_modules=[query,value]"]
    r = run_cli("train.py", args, tmp_path / "run", cache)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "layer names do not match the model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["search.pool.start=5.0", "search.pool.stop=3.0"], "search.pool is empty"),
        (["search.segments=0"], "search.segments=0"),
        (["search.bits_min=12", "search.bits_max=14"], "outside the achievable average bits"),
        (["quant.space.bits=[2,3,4]", "search.bits_min=5"], "outside the achievable average bits"),
        (["search.generator=random"], "search.generator='random' not allowed"),
        (["method=lora"], "switches configurations"),
    ],
)
def test_bad_search_input_is_one_clear_line(args, needle, cache, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("search.py", [*QUICK, *args], run_dir, cache)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert our_files(run_dir) == [], "half-written artifacts"


def test_checkpoint_of_another_model_is_one_clear_line(cache, tmp_path):
    trained = tmp_path / "trained"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "checkpoints" / "last.ckpt").write_bytes(b"")
    (trained / "config.yaml").write_text(
        "model: {name: minilm_l6}\ntask: {name: sst2}\n"
        "method: {name: coalora}\nquant: {space: {}}\n"
    )
    run_dir = tmp_path / "run"
    r = run_cli("search.py", [*QUICK, f"ckpt={trained}"], run_dir, cache)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "trained with model=minilm_l6" in r.stderr and "Traceback" not in r.stderr
    assert our_files(run_dir) == []


# ---------------------------------------------------------------- in process
def compose_cfg(name: str, overrides: list[str], cache: Path, out: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            name,
            overrides=[*COMMON, f"paths.cache_dir={cache}", f"paths.log_dir={out}", *overrides],
        )
    cfg.paths.output_dir = str(out / "run")
    return cfg


def test_search_groups_compose(cache, tmp_path):
    for option in sorted(p.stem for p in (ROOT / "conf" / "search").glob("*.yaml")):
        cfg = compose_cfg("search", [f"search={option}"], cache, tmp_path)
        OmegaConf.to_container(cfg.search, resolve=True)
        assert cfg.method.pool == cfg.search.pool  # one pool for the objective and the search
    cfg = compose_cfg("train", ["method=shared_lora"], cache, tmp_path)
    assert cfg.method.search_refresh_every_n_epochs is None
    assert cfg.method.search_refresh.iterations == 10


def test_wandb_offline_logs_table_and_artifact(cache, tmp_path, monkeypatch):
    from coalora.stages.search import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("COALORA_LOGEI_FUSED", "0")
    cfg = compose_cfg(
        "search",
        ["search=quick", "logger=wandb", "search.iterations=1", "search.generator=both"],
        cache,
        tmp_path,
    )
    results = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "configset.json").is_file() and results["searched"] >= 1
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    import wandb

    assert wandb.run is None  # finished: a multirun's jobs do not merge


def test_refresh_callback_swaps_the_training_set(cache, tmp_path):
    from coalora.lit.search_refresh import SearchRefreshCallback
    from coalora.stages.build import build_module, build_trainer, prepare

    os.environ.setdefault("COALORA_LOGEI_FUSED", "0")
    pool = ["method.pool.start=2.5", "method.pool.stop=4.5", "method.pool.step=0.5"]
    cfg = compose_cfg(
        "train",
        [
            "method=coalora",
            "search@method.search_refresh=quick",
            "method.search_refresh_every_n_epochs=1",
            "logger=none",
            "callbacks=none",
            *pool,
        ],
        cache,
        tmp_path,
    )
    run_dir = Path(cfg.paths.output_dir)
    trainer = build_trainer(cfg)
    callbacks = [c for c in trainer.callbacks if isinstance(c, SearchRefreshCallback)]
    assert len(callbacks) == 1 and callbacks[0].every == 1
    dm, model, method, ctx = prepare(cfg)
    method.setup(model, ctx)
    lit = build_module(cfg, model, method, ctx)
    before = list(method.train_set)
    cb = callbacks[0]
    res = cb.refresh(lit, epoch=1)
    selected = [res.observations[i].config for i in res.selected]
    assert method.train_set == selected and method.train_set != before
    saved = ConfigSet.load(run_dir / "configset_epoch1.json", expected_names=method.names)
    assert sum(e.pareto for e in saved.entries) == len(selected)
    assert cb.history[-1]["train_set_size"] == len(selected)
    assert all(lo._mix is None for lo in method.loras)  # no stale no-grad mixing left behind
    # resume: a new callback restores the selection from the checkpointed state
    method.set_training_set(before)
    fresh = SearchRefreshCallback(1, cfg.method.search_refresh)
    fresh.load_state_dict(cb.state_dict())
    fresh.on_train_start(None, lit)
    assert method.train_set == selected
