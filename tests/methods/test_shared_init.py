"""``method.init=lpq|lq`` for Shared-LoRA and CoA-LoRA (docs/methods.md, "Quantization-aware
initialisation (method.init)"): the bases quantize W − L and the adapter starts at L.

tiny_bert with a planted dominant rank-2 part in every target (the case the initialisation is
for) for the step-0 invariants; tiny_llama trained two steps for the stage paths (restore, packed
/ merged exports, PEFT refused, resume).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from support import TINY_LM

from coalora import adapt
from coalora.errors import ConfigError
from coalora.methods.shared_init import fitting_configs
from coalora.quant import QuantConfig, QuantLinear, fake_quantize, model_weights
from coalora.quant.lq import shared_lowrank, subtract_lowrank
from coalora.quant.residual import ResidualQuantLinear

ROOT = Path(__file__).resolve().parents[2]
POOL = ["method.pool.start=3.0", "method.pool.stop=4.2", "method.pool.step=0.4"]


# ---------------------------------------------------------------- helpers
def spiked(tiny_cfg, tmp_path: Path, overrides: list[str], storage: str = "dequantized"):
    """(lit, dm, W): tiny_bert with a dominant rank-2 part added to every target weight, set up
    (own cache: the planted weights' tables never replace the session's)."""
    from coalora.stages.build import build_module, prepare

    cfg = tiny_cfg([*overrides, f"quant.storage={storage}"])
    cfg.paths.cache_dir = str(tmp_path / "spiked-cache")
    dm, model, method, ctx = prepare(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ctx.names:
            w = model.get_submodule(name).weight  # (d_out, d_in)
            u = torch.randn(w.shape[0], 2, generator=gen)
            v = torch.randn(2, w.shape[1], generator=gen)
            w.add_(u @ v * (10 * w.norm() / (u @ v).norm()))  # ‖L‖ = 10 ‖W‖
    weights = {n: w.clone() for n, w in model_weights(model, ctx.names).items()}
    method.setup(model, ctx)
    return build_module(cfg, model, method, ctx), dm, weights


def svd_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r] @ vh[:r]).float()


def fitted_error(method, weights, configs) -> float:
    """Σ_c Σ_layers ‖deq(quantize_c(W − L)) + L − W‖² with the layers' own L."""
    total = 0.0
    for lora, name in zip(method.loras, method.names, strict=True):
        base = lora.base_layer
        resid = subtract_lowrank(weights[name], base.lowrank_l1, base.lowrank_l2)
        for c in configs:
            total += float((resid - fake_quantize(resid, c[name])).double().square().sum())
    return total


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# ---------------------------------------------------------------- step 0
@pytest.mark.parametrize("method", ["shared_lora", "coalora"])
def test_lpq_starts_every_configuration_closer_to_w_than_plain_quantization(
    tiny_cfg, tmp_path, method
):
    lit, _, weights = spiked(tiny_cfg, tmp_path, [f"method={method}", *POOL, "method.init=lpq"])
    m = lit.method
    # allocations, sensitivities and error tables keep reading W
    assert all(torch.equal(w, weights[n]) for n, w in model_weights(lit.model, m.names).items())
    configs = [*m.train_set, *m.eval_set.values()]
    assert len(configs) >= 4
    for config in configs:
        m.switch_base(lit.model, config)
        err_lpq = err_zero = 0.0
        for lora, name in zip(m.loras, m.names, strict=True):
            base, w = lora.base_layer, weights[name]
            assert isinstance(base, ResidualQuantLinear)
            lowrank = (lora.scaling * lora.lora_B @ lora.lora_A).detach()  # s·B·A at step 0
            torch.testing.assert_close(lowrank, svd_r(w, m.cfg.rank), rtol=1e-4, atol=1e-4)
            resid = subtract_lowrank(w, base.lowrank_l1, base.lowrank_l2)
            assert torch.equal(base.weight, fake_quantize(resid, config[name]))
            err_lpq += float((base.weight + lowrank - w).square().sum())
            err_zero += float((fake_quantize(w, config[name]) - w).square().sum())
        assert err_lpq < 0.5 * err_zero, f"{config.average_bits():.3f} bits"
    d = lit.method.describe()
    assert d["init"] == "lpq" and d["init_fit"]["rank"] == m.cfg.rank


def test_lq_fits_its_configurations_at_least_as_well_as_lpq(tiny_cfg, tmp_path):
    over = ["method=shared_lora", *POOL, "method.init_configs=3", "method.init_iters=4"]
    lpq, _, weights = spiked(tiny_cfg, tmp_path / "a", [*over, "method.init=lpq"])
    lq, _, weights_lq = spiked(tiny_cfg, tmp_path / "b", [*over, "method.init=lq"])
    assert all(torch.equal(weights[n], weights_lq[n]) for n in weights)
    configs = fitting_configs(lq.method.train_set, 3)
    assert len(configs) == 3
    assert [c.to_dict() for c in configs] == [
        c.to_dict() for c in fitting_configs(lpq.method.train_set, 3)
    ]
    e_lpq, e_lq = (
        fitted_error(lpq.method, weights, configs),
        fitted_error(lq.method, weights, configs),
    )
    assert e_lq <= e_lpq
    fit = lq.method.describe()["init_fit"]
    assert fit["iterates_mean"] >= 1 and fit["err_fitted"] == pytest.approx(e_lq / 3, rel=1e-6)


def test_shared_lowrank_first_iterate_is_the_truncated_svd_and_refits_never_get_worse():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 2, generator=gen) @ torch.randn(2, 64, generator=gen)
    w += 0.05 * torch.randn(48, 64, generator=gen)
    qcs = [QuantConfig(2, 8, "fp32", 64, 256), QuantConfig(3, 8, "fp32", 64, 256)]
    fns = [lambda m, qc=qc: fake_quantize(m, qc) for qc in qcs]
    one = shared_lowrank(w, 4)
    torch.testing.assert_close(one.l1 @ one.l2, svd_r(w, 4), rtol=1e-5, atol=1e-5)
    many = shared_lowrank(w, 4, fns, iters=6)
    resid = subtract_lowrank(w, many.l1, many.l2)
    kept = sum(float((resid - f(resid)).double().square().sum()) for f in fns) / len(fns)
    assert kept == pytest.approx(min(many.errors), rel=1e-9) and kept <= many.errors[0]
    assert shared_lowrank(w, 4, fns, iters=1).errors == many.errors[:1]  # lpq = lq's 1st iterate
    fisher = torch.rand(48, 64, generator=gen)
    weighted = shared_lowrank(w, 4, fns, iters=3, fisher=fisher)
    assert weighted.l1.shape == (48, 4) and weighted.l2.shape == (4, 64)
    with pytest.raises(ConfigError, match="method.rank=65"):
        shared_lowrank(w, 65)


@pytest.mark.parametrize("mix", ["full", "learned"])
def test_cache_packed_storage_adapt_and_held_out_configurations_give_the_training_logits(
    tiny_cfg, tmp_path, mix
):
    from coalora.stages.evaluate import random_near

    over = ["method=coalora", *POOL, "method.init=lpq", f"method.mapper.mix={mix}"]
    lit, dm, _ = spiked(tiny_cfg, tmp_path / "dense", over)
    packed, _, _ = spiked(tiny_cfg, tmp_path / "packed", over, storage="packed")
    torch.manual_seed(1)
    with torch.no_grad():  # a mapper that does something and a B that moved, in both models
        for p in lit.method.mapper.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for lora in lit.method.loras:
            lora.lora_B.add_(0.1 * lora.lora_B.std() * torch.randn_like(lora.lora_B))
    assert all((lo.lora_B0 is not None) == (mix == "learned") for lo in lit.method.loras)
    packed.load_state_dict(lit.state_dict(), strict=False)
    m, batch = lit.method, next(iter(dm.val_dataloader()))
    rng = random.Random(0)
    held_out = random_near(m.eval_set["3.5"], m.space, 3.5, 0.1, rng)
    assert held_out is not None and held_out not in m.train_set
    for config in (m.train_set[0], m.eval_set["3"], held_out):
        with m.configured(lit.model, config):
            trained = logits(lit.model, batch)  # the training-time path (cache filled)
        m.cache.clear()
        with m.configured(lit.model, config):  # a cold cache quantizes W − L again
            assert torch.equal(logits(lit.model, batch), trained)
        with packed.method.configured(packed.model, config):  # packed entries of W − L
            torch.testing.assert_close(logits(packed.model, batch), trained)
        adapt(lit, config)  # coalora.adapt: switch + fold B' = B (I + γU) (B₀ + (B − B₀)(..))
        torch.testing.assert_close(logits(lit.model, batch), trained, rtol=1e-5, atol=1e-5)
        for lora in m.loras:
            lora.unfold()


def test_zero_stays_the_default_and_changes_nothing(built):
    _, lit, _ = built(["method=shared_lora", *POOL])
    m = lit.method
    assert m.init.mode == "zero" and m.shared_init is None
    assert all(type(lo.base_layer) is QuantLinear for lo in m.loras)
    assert all(torch.count_nonzero(lo.lora_B) == 0 for lo in m.loras)
    assert m.extra_state() == {"init": "zero"} and m.describe()["init"] == "zero"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method.init=svd"], "method.init='svd' is not allowed; allowed: ['zero', 'lpq', 'lq']"),
        (["method.init_iters=0"], "method.init_iters=0 must be an integer >= 1"),
        (["method.mapper.mix=all"], "method.mapper.mix='all' is not allowed; allowed: ['full', "),
    ],
)
def test_init_keys_are_checked_before_anything_loads(tiny_cfg, overrides, needle):
    from coalora.stages.build import check_run

    with pytest.raises(ConfigError) as e:
        check_run(tiny_cfg(["method=coalora", *overrides]))
    assert needle in str(e.value)


def test_a_configset_searched_with_another_init_is_refused(tiny_cfg, built, tmp_path):
    from coalora.search.configset import ConfigSet
    from coalora.stages.build import prepare

    _, lit, _ = built(["method=shared_lora", *POOL])
    path = tmp_path / "configset.json"
    cs = ConfigSet.from_model_configs(lit.method.train_set, space=lit.method.space.to_dict(),
                                      provenance={"init": "zero"})  # fmt: skip
    cs.save(path)
    cfg = tiny_cfg(["method=shared_lora", f"method.configset={path}", "method.init=lpq"])
    _, model, method, ctx = prepare(cfg)
    with pytest.raises(ConfigError, match="was searched with method.init=zero, but this run has"):
        method.setup(model, ctx)


# ---------------------------------------------------------------- stages (tiny_llama)
def compose_lm(name: str, overrides: list[str], cache: Path, out: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = [f"paths.cache_dir={cache}", f"paths.log_dir={out.parent / 'logs'}"]
        if name == "train":
            base += [*TINY_LM, "callbacks=minimal", "logger=csv"]
        cfg = compose(name, overrides=[*base, *overrides])
    cfg.paths.output_dir = str(out)
    return cfg


LM_INIT = ["method=coalora", "method.pool.start=3.0", "method.pool.stop=4.0",
           "method.pool.step=0.5", "method.init=lpq", "method.mapper.mix=learned",
           "trainer.max_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    from coalora.stages.train import run

    tmp = tmp_path_factory.mktemp("lpq-lm")
    results = run(compose_lm("train", LM_INIT, tmp / "cache", tmp / "run"))
    return tmp, results


def test_lm_run_records_its_init_and_restores_the_training_model(lm_run):
    from coalora.stages.restore import restore

    tmp, results = lm_run
    assert results["init"] == "lpq" and results["config"]["init"] == "lpq"
    state = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["coalora"]["init"] == "lpq"
    _, lit = restore(tmp / "run", cache_dir=tmp / "cache")
    assert lit.method.shared_init.report["digest"] == state["coalora"]["init_digest"]
    assert all(isinstance(lo.base_layer, ResidualQuantLinear) for lo in lit.method.loras)
    assert all(lo.lora_B0 is not None for lo in lit.method.loras)  # the anchor, recomputed
    trained = state["state_dict"]
    restored = lit.trainable_state_dict()
    assert all(torch.equal(restored[k], v) for k, v in trained.items())


def test_lm_packed_and_merged_exports_equal_evaluation_and_peft_is_refused(lm_run):
    from transformers import AutoModelForCausalLM

    from coalora import deploy
    from coalora.stages.export import run as export
    from coalora.stages.restore import restore

    tmp, _ = lm_run
    run_dir = tmp / "run"
    _, lit = restore(run_dir, cache_dir=tmp / "cache")
    x = {"input_ids": torch.randint(200, 3000, (2, 16)), "attention_mask": torch.ones(2, 16).long()}
    expected = {}
    for b in (3.0, 4.0):
        config = lit.ctx.allocations(lit.model, [b])[b].config
        with lit.method.configured(lit.model, config):  # evaluate.py's path
            expected[b] = logits(lit.model, x)

    out = tmp / "packed"
    cfg = compose_lm("export", [f"ckpt={run_dir}", "format=packed", "quant.budgets=[3.0,4.0]",
                                f"out_dir={out}"], tmp / "cache", tmp / "export-packed")  # fmt: skip
    export(cfg)
    for b in (3.0, 4.0):
        torch.testing.assert_close(logits(deploy.load(out, budget=b), x), expected[b],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip

    merged = tmp / "merged"
    cfg = compose_lm("export", [f"ckpt={run_dir}", "quant.budget=3.0", f"out_dir={merged}"],
                     tmp / "cache", tmp / "export-merged")  # fmt: skip
    export(cfg)  # format=auto: merged for a method.init=lpq run
    assert json.loads((tmp / "export-merged" / "export.json").read_text())["format"] == "merged"
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    torch.testing.assert_close(logits(reloaded, x), expected[3.0], rtol=1e-4, atol=1e-4)

    cfg = compose_lm("export", [f"ckpt={run_dir}", "format=peft", "quant.budget=3.0",
                                f"out_dir={tmp / 'peft'}"], tmp / "cache", tmp / "export-peft")  # fmt: skip
    with pytest.raises(ConfigError) as e:
        export(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "method.init=lpq" in msg and "format=packed" in msg
    assert not (tmp / "peft").exists()


class CopyCheckpointAt(L.Callback):
    """Copy ``last.ckpt`` once it holds step ``step`` (what a run killed then would leave)."""

    def __init__(self, step: int, src: Path, dst: Path) -> None:
        self.step, self.src, self.dst = step, src, dst

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.dst.exists():
            shutil.copy(self.src, self.dst)


def test_lpq_resume_is_bit_identical_and_another_init_is_refused(tmp_path, monkeypatch):
    import coalora.stages.train as train_stage

    steps, k = 6, 3
    common = [*LM_INIT[:-1], f"trainer.max_steps={steps}", "trainer.val_check_interval=3",
              "method.dropout=0.1", "callbacks.last_checkpoint.every_n_train_steps=1"]  # fmt: skip
    copy = tmp_path / "full" / "checkpoints" / f"step{k}.ckpt"  # beside the run's record
    build = train_stage.build_trainer

    def with_copy(cfg):
        trainer = build(cfg)
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        trainer.callbacks.append(CopyCheckpointAt(k, last, copy))
        return trainer

    monkeypatch.setattr(train_stage, "build_trainer", with_copy)
    cache = tmp_path / "cache"
    full = train_stage.run(compose_lm("train", common, cache, tmp_path / "full"))
    assert torch.load(copy, weights_only=True)["global_step"] == k
    monkeypatch.setattr(train_stage, "build_trainer", build)
    resumed = train_stage.run(
        compose_lm("train", [*common, f"ckpt_path={copy}"], cache, tmp_path / "resumed")
    )
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert resumed["metrics"] == full["metrics"]
    zero = [*common, "method.init=zero", f"ckpt_path={copy}"]
    with pytest.raises(ConfigError, match="trained with method.init=lpq, but this run has"):
        train_stage.run(compose_lm("train", zero, cache, tmp_path / "zero"))
