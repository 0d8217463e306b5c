"""LQ-LoRA: the base is Q, s·B·A = L1 L2 at step 0, decomposition-aware allocation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import run_entry

from coalora.adapters import LoRALinear, adapter_modules
from coalora.errors import ConfigError
from coalora.methods.lq_lora import DecomposedQuantLinear
from coalora.methods.lq_table import lq_error_table
from coalora.quant import QuantConfig, QuantSpace, build_error_table, fake_quantize, model_weights

ROOT = Path(__file__).resolve().parents[2]
UNIFORM3 = ["quant=uniform", "quant.config.bits=3"]
SMALL_SPACE = [
    "quant.space.bits=[2,3,4]",
    "quant.space.bits0=[8]",
    "quant.space.dtype1=[fp32]",
    "quant.space.block1=[256]",
]


def inputs_of(dm) -> dict[str, torch.Tensor]:
    batch = next(iter(dm.val_dataloader()))
    return {k: v for k, v in batch.items() if k != "labels"}


def last_hidden(lit, inputs) -> torch.Tensor:
    lit.model.eval()
    with torch.no_grad():
        return lit.model(**inputs, output_hidden_states=True).hidden_states[-1]


def test_folded_adapter_equals_w_within_decomposition_error(built):
    _, lit, _ = built(["method=lq_lora", *UNIFORM3])
    report = lit.method.report["layers"]
    loras = adapter_modules(lit.model, LoRALinear)
    assert set(loras) == set(lit.method.names) == set(report)
    for name, lora in loras.items():
        base = lora.base_layer
        assert isinstance(base, DecomposedQuantLinear)
        w = base.weight_fp
        folded = base.weight + lora.delta_weight().detach()  # Q + s·B·A
        err = float((w - folded).norm())
        assert err == pytest.approx(report[name]["err_lq"], rel=1e-4, abs=1e-6)
        assert err < float((w - fake_quantize(w, base.lq_config)).norm())  # beats plain quant
        torch.testing.assert_close(base.weight, base.weight_q)


def test_base_serves_q_for_its_config_only(built):
    _, lit, _ = built(["method=lq_lora", *UNIFORM3])
    base = next(iter(adapter_modules(lit.model, LoRALinear).values())).base_layer
    q, qc = base.weight_q, base.lq_config
    # Q is exactly representable in its configuration: quantizing it again is a fixed point
    torch.testing.assert_close(fake_quantize(q, qc), q)
    other = QuantConfig(4, 8, "fp32", 64, 256)
    base.set_config(other)
    torch.testing.assert_close(base.weight, fake_quantize(base.weight_fp, other))
    base.set_config(qc)
    assert base.weight is base.weight_q


def test_step0_output_closer_to_fp_than_qlora(built):
    _, fp, dm = built(["method=lora", "quant=none"])
    _, qlora, _ = built(["method=qlora", *UNIFORM3])
    _, lq, _ = built(["method=lq_lora", *UNIFORM3])
    x = inputs_of(dm)
    ref = last_hidden(fp, x)
    err_qlora = float((last_hidden(qlora, x) - ref).norm())
    err_lq = float((last_hidden(lq, x) - ref).norm())
    assert err_lq < err_qlora


def test_gradients_reach_only_lora_and_head(built):
    _, lit, dm = built(["method=lq_lora"])
    lit.model.train()
    loss = lit.method.training_loss(lit.model, next(iter(dm.train_dataloader())), 0)
    loss.backward()
    trainable = {n for n, p in lit.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "classifier" in n for n in trainable)
    grads = {n for n, p in lit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads <= trainable
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    assert any("classifier" in n for n in grads)


def test_budget_allocates_with_decomposition_errors(built, tmp_path):
    cfg, lit, _ = built(["method=lq_lora", "quant=budget", "quant.budget=3.0", *SMALL_SPACE])
    method = lit.method
    assert method.config.average_bits() <= 3.0 + 1e-9
    assert method.report["table_kind"].startswith("lq-r8-i2")
    tables = [p.name for p in Path(cfg.paths.cache_dir).glob("errors-*.safetensors")]
    assert any("-lq-r8-" in t for t in tables), tables
    # the model uses the allocated configuration per layer
    for name, lora in adapter_modules(lit.model, LoRALinear).items():
        assert lora.base_layer.lq_config == method.config[name]


def test_budget_with_fisher_sensitivity_uses_the_cached_fisher(built):
    """quant.sensitivity=fisher weights the decomposition-aware allocation with the run's cached
    sensitivity, which (method.lq.fisher) also weights the SVD."""
    over = ["method=lq_lora", "quant=budget", "quant.budget=3.0", *SMALL_SPACE,
            "quant.sensitivity=fisher", "quant.sensitivity_examples=4", "method.lq.fisher=true",
            "method.lq.table_iters=1"]  # fmt: skip
    cfg, lit, _ = built(over)
    method = lit.method
    assert method.config.average_bits() <= 3.0 + 1e-9
    assert method.report["fisher_examples"] == 4
    cache = Path(cfg.paths.cache_dir)
    assert list((cache / "sensitivity").glob("tiny_bert-sst2-fisher-n4-seed*.safetensors"))
    assert "-fw-fd" in method.report["table_kind"]  # weighted errors and SVD


def test_pruned_table_never_prefers_a_dominated_option(built):
    _, lit, _ = built(["method=lora", "quant=none"])
    weights = dict(list(model_weights(lit.model, lit.method.names).items())[:3])
    space = QuantSpace(bits=(2, 3), bits0=(4, 8), dtype1=("fp32",), block0=(32, 64), block1=(256,))
    plain = build_error_table(weights, space)
    full = lq_error_table(weights, space, rank=4, iters=1)
    pruned = lq_error_table(weights, space, rank=4, iters=1, plain=plain)
    bits = np.array([qc.storage_bits() for qc in space.options()])
    n_pruned = 0
    for i in range(len(weights)):
        for k in range(len(bits)):
            if pruned.costs[i, k] != full.costs[i, k]:  # a pruned option
                n_pruned += 1
                cheaper = (bits <= bits[k]) & (pruned.costs[i].numpy() < pruned.costs[i, k].item())
                assert cheaper.any()
    assert n_pruned > 0


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["quant=none"], "method=lq_lora does not support quant=none"),
        (["quant=bnb_nf4"], "method=lq_lora does not support quant=bnb_nf4"),
        (["method.lq.heuristic=diagonal"], "method.lq.heuristic"),
        (["+method.lq.bogus=1"], "method.lq has unknown keys"),
        (["method.lq.allocation=ilp"], "method.lq.allocation"),
    ],
)
def test_bad_combinations_fail_clearly(tiny_cfg, overrides, needle):
    from coalora.stages.build import prepare

    cfg = tiny_cfg(["method=lq_lora", *overrides])
    with pytest.raises(ConfigError, match="allowed|unknown") as err:
        prepare(cfg)
    assert needle in str(err.value)


def test_train_py_fast_run(tmp_path):
    args = ["model=tiny_bert", f"paths.data_dir={ROOT / 'tests' / 'fixtures'}",
            "data.allow_hub=false", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "callbacks=minimal", "data.batch_size=8", "data.eval_batch_size=16",
            "method=lq_lora", *UNIFORM3]  # fmt: skip
    r = run_entry("train.py", [*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "lq_lora" and results["global_step"] == 3
    assert results["lq"]["err_lq_total"] < results["lq"]["err_quant_total"]
    assert 0.0 <= results["metrics"]["val/acc"] <= 1.0
