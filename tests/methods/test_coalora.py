"""CoA-LoRA invariants: U = 0 gives LoRA; folded = unfolded; PEFT export round-trip; resume."""

from __future__ import annotations

import json

import pytest
import torch

from coalora import adapt
from coalora.adapters import LoRALinear

POOL = ["method.pool.start=3.0", "method.pool.stop=4.2", "method.pool.step=0.4"]


def batch_of(dm):
    return next(iter(dm.train_dataloader()))


def test_zero_mapper_equals_plain_lora(built):
    cfg, lit, dm = built(["method=coalora", *POOL])
    method = lit.method
    torch.nn.init.zeros_(method.mapper.fc2.weight)
    for lora in method.loras:
        torch.nn.init.normal_(lora.lora_B, std=0.05)
    batch = batch_of(dm)
    config = method.train_set[0]
    lit.model.eval()
    with torch.no_grad():
        with method.configured(lit.model, config):
            with_mapper = lit.model(**batch).logits
        plain = lit.model(**batch).logits  # same base configuration, no mixing
    torch.testing.assert_close(with_mapper, plain)


def test_folded_adapter_equals_unfolded_forward(built):
    cfg, lit, dm = built(["method=coalora", *POOL])
    method = lit.method
    torch.nn.init.normal_(method.mapper.fc2.weight, std=0.05)
    for lora in method.loras:
        torch.nn.init.normal_(lora.lora_B, std=0.05)
    batch = batch_of(dm)
    config = method.eval_set["3"]
    lit.model.eval()
    with torch.no_grad():
        with method.configured(lit.model, config):
            unfolded = lit.model(**batch).logits
        adapt(lit, config)
        assert all(lo.folded for lo in method.loras)
        folded = lit.model(**batch).logits
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)


def test_training_step_updates_lora_and_mapper_only(built):
    cfg, lit, dm = built(["method=coalora", *POOL])
    lit.model.train()
    for lora in lit.method.loras:  # B = 0 at init blocks the gradient of A and of the mapper
        torch.nn.init.normal_(lora.lora_B, std=0.05)
    loss = lit.method.training_loss(lit.model, batch_of(dm), lit.global_step)
    loss.backward()
    grads = {n for n, p in lit.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_A" in n for n in grads) and any("mapper" in n for n in grads)
    assert any("classifier" in n for n in grads)
    frozen = [
        n
        for n, p in lit.named_parameters()
        if p.requires_grad and not ("lora_" in n or "mapper" in n or "classifier" in n)
    ]
    assert frozen == []
    assert all(isinstance(m, LoRALinear) for m in lit.method.loras)


def test_draw_is_seeded_by_step(built):
    _, lit, _ = built(["method=shared_lora", *POOL])
    a = lit.method.draw(7)
    b = lit.method.draw(7)
    assert a == b and len(a) == 2


def test_train_on_eval_budgets_trains_on_the_evaluation_allocations_only(built):
    budgets = "method.eval_budgets=[3.0,4.0]"
    _, pool_lit, _ = built(["method=shared_lora", *POOL, budgets])
    _, lit, _ = built(["method=shared_lora", *POOL, budgets, "method.train_on=eval_budgets"])
    assert lit.method.train_set == list(lit.method.eval_set.values())
    assert len(lit.method.train_set) == 2 and len(pool_lit.method.train_set) == 4
    assert {round(c.average_bits(), 1) for c in lit.method.train_set} == {3.0, 4.0}


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method.train_on=budgets"], "method.train_on='budgets'; allowed: pool, eval_budgets"),
        (
            ["method.train_on=eval_budgets", "method.configset=/x.json"],
            "cannot be combined with method.configset",
        ),
    ],
)
def test_train_on_is_checked(tiny_cfg, overrides, needle):
    from coalora.errors import ConfigError
    from coalora.stages.build import check_run

    with pytest.raises(ConfigError) as e:
        check_run(tiny_cfg(["method=shared_lora", *overrides]))
    assert needle in str(e.value)


@pytest.mark.parametrize("method", ["coalora"])
def test_peft_export_round_trip_gives_equal_logits(built, tmp_path, method):
    peft = pytest.importorskip("peft")
    from coalora.deploy.peft import adapter_config, load_quantized_base, peft_state
    from coalora.deploy.writer import write_export
    from coalora.models import build_model

    cfg, lit, dm = built([f"method={method}", *POOL])
    m = lit.method
    torch.nn.init.normal_(m.mapper.fc2.weight, std=0.05)
    for lora in m.loras:
        torch.nn.init.normal_(lora.lora_B, std=0.05)
    config = m.eval_set["3.5"]
    lit.model.eval()
    adapt(lit, config)
    batch = batch_of(dm)
    with torch.no_grad():
        ours = lit.model(**batch).logits
    head = ["classifier"]
    out = write_export(
        tmp_path / "adapter",
        {
            "adapter_config.json": adapter_config(cfg, m.names, head),
            "adapter_model.safetensors": peft_state(lit.model, m.names, head),
            "quant_config.json": config.to_dict(),
        },
    )
    base = build_model(cfg.model, num_labels=cfg.task.num_labels, seed=cfg.seed)
    load_quantized_base(base, out / "quant_config.json")
    theirs_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        theirs = theirs_model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == cfg.method.rank


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method=qlora", "quant=budget", "quant.budget=1.5"], "min achievable 2.0322"),
        (["method=qlora", "quant=budget", "quant.budget=9"], "max achievable 8.6250"),
        (["method=qlora", "quant=uniform", "quant.config.bits=5"], "allowed: [2, 3, 4, 8]"),
        (["method=qlora", "quant=file", "quant.file=/nonexistent.json"], "quant.file"),
        (["method=lora", "quant=nf4"], "allowed quant modes: ['none']"),
    ],
)
def test_quant_block_is_checked_before_anything_loads(tiny_cfg, overrides, needle):
    from coalora.errors import ConfigError
    from coalora.stages.build import check_run

    cfg = tiny_cfg(overrides)
    with pytest.raises(ConfigError) as e:
        check_run(cfg)
    assert needle in str(e.value)
