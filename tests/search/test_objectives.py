"""The calibration-loss objective on tiny_bert: deterministic on fixed batches, scored with the
trained adapter when given a checkpoint, and the search on it improves hypervolume monotonically."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from coalora.errors import ConfigError
from coalora.search.objectives import CalibrationObjective
from coalora.stages.search import build_objective

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
# search.yaml makes method.pool follow search.pool: one small cached pool for everything
POOL = ["search.pool.start=3.0", "search.pool.stop=4.2", "search.pool.step=0.4"]


def compose_cfg(name: str, overrides: list[str], cache: Path, out: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=[
            "model=tiny_bert", f"paths.data_dir={FIXTURES}", f"paths.cache_dir={cache}",
            f"paths.log_dir={out}", "data.allow_hub=false", *overrides])  # fmt: skip
    cfg.paths.output_dir = str(out / "run")
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coalora-cache")


@pytest.fixture(scope="module")
def fresh(cache, tmp_path_factory):
    """(search cfg, fresh-head objective) built once for the module."""
    cfg = compose_cfg("search", ["search=quick", *POOL], cache, tmp_path_factory.mktemp("out"))
    objective, _, _ = build_objective(cfg)
    return cfg, objective


def test_fresh_objective_is_deterministic_and_leaves_the_mode(fresh):
    cfg, obj = fresh
    train_set = obj.method.train_set
    low, high = train_set[0], train_set[-1]
    assert high.average_bits() > low.average_bits()
    obj.model.train()
    n = len(obj.seconds)
    a = obj(low)
    assert obj.model.training  # eval for scoring only
    b = obj(high)
    assert obj(low) == a and obj(high) == b  # fixed batches, eval mode: bit-identical
    assert a != b  # the base really switched configuration
    assert len(obj.seconds) == n + 4 and all(s > 0 for s in obj.seconds)
    assert len(obj.batches) == cfg.search.calib_batches
    assert obj.batches[0]["input_ids"].shape[0] == cfg.search.calib_batch_size
    # B = 0 at init: the adapters are the identity, so the loss is the quantized base's
    assert all(float(lo.lora_B.detach().abs().max()) == 0.0 for lo in obj.method.loras)


def test_objective_uses_the_trained_adapter(fresh, cache, tmp_path):
    """A checkpoint's adapters, mapper and head are what is scored: the restored objective equals
    the in-memory perturbed model and differs from the fresh-head objective."""
    from coalora.stages.build import build_module, prepare

    search_cfg, fresh_obj = fresh
    cfg = compose_cfg(
        "train",
        [
            "method=coalora",
            "search@method.search_refresh=quick",
            "method.pool.start=3.0",
            "method.pool.stop=4.2",
            "method.pool.step=0.4",
        ],
        cache,
        tmp_path,
    )
    dm, model, method, ctx = prepare(cfg)
    method.setup(model, ctx)
    lit = build_module(cfg, model, method, ctx)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training": move the adapters, the mapper and the head
        for p in lit.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    run_dir = tmp_path / "trained"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.save(
        {"state_dict": lit.trainable_state_dict(), "coalora": method.extra_state()},
        run_dir / "checkpoints" / "last.ckpt",
    )

    restored, _, _ = build_objective(OmegaConf.merge(search_cfg, {"ckpt": str(run_dir)}))
    live = CalibrationObjective(lit.model, lit.method, fresh_obj.batches)
    config = fresh_obj.method.train_set[1]
    for a, b in zip(restored.batches, fresh_obj.batches):  # the same fixed calibration batches
        assert torch.equal(a["input_ids"], b["input_ids"])
    loss_ckpt, loss_live, loss_fresh = restored(config), live(config), fresh_obj(config)
    assert loss_ckpt == pytest.approx(loss_live, rel=1e-6)
    assert abs(loss_ckpt - loss_fresh) > 1e-3
    assert restored(config) == loss_ckpt
    # the mapper was applied inside the score and nothing is left behind after it
    assert all(lo._mix is None and not lo.folded for lo in restored.method.loras)
    with restored.method.configured(restored.model, config):
        assert all(lo._mix is not None for lo in restored.method.loras)


def test_objective_rejects_a_fixed_configuration_method(fresh):
    _, obj = fresh

    class OneConfig:
        name = "qlora"

    with pytest.raises(ConfigError, match="coalora"):
        CalibrationObjective(obj.model, OneConfig(), obj.batches)
    with pytest.raises(ConfigError, match="at least one batch"):
        CalibrationObjective(obj.model, obj.method, [])


def test_search_on_the_real_objective_never_loses_hypervolume(fresh):
    from coalora.search.loop import run_search

    cfg, obj = fresh
    method = obj.method
    n0 = len(obj.seconds)
    res = run_search(obj, method.train_set, method.space, obj.names, obj.numels, iterations=3,
                     candidates_per_iter=2, seed=1, progress=False, max_steps=3, mc_samples=16,
                     segments=4, bits_range=(2.25, 7.25))  # fmt: skip
    assert len(res.hypervolume) == 4 and res.hypervolume[0] > 0
    assert all(b >= a for a, b in itertools.pairwise(res.hypervolume))
    assert len(obj.seconds) - n0 == len(res.observations) > len(method.train_set)
    assert res.selected
