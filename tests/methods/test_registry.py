"""Methods come from the package's own registry, the config group and the registry agree, and
the smallest method of docs/architecture.md plugs into the shared machinery."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coalora.adapters import LoRALinear
from coalora.errors import ConfigError
from coalora.methods import Method, build_method, registry

ROOT = Path(__file__).resolve().parents[2]


def test_every_method_yaml_names_a_registered_class_and_back():
    names = {OmegaConf.load(p).method.name for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert names == set(registry())
    for name, cls in registry().items():
        assert issubclass(cls, Method) and cls.name == name
        assert cls.export_formats and set(cls.export_formats) <= {"peft", "merged", "packed"}


def test_capabilities_are_declared():
    methods = registry()
    assert {n for n, c in methods.items() if c.switches_configs} == {"coalora", "shared_lora"}
    assert methods["qwha"].export_formats == ("merged",)
    assert methods["lq_lora"].export_formats == ("merged",)
    assert methods["qlora"].export_formats[0] == "peft"


def test_a_dotted_target_in_a_config_is_never_imported(tmp_path, monkeypatch):
    evil = tmp_path / "evil_module_for_coalora.py"
    marker = tmp_path / "ran"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\nclass X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = OmegaConf.create({"name": "evil", "_target_": "evil_module_for_coalora.X"})
    with pytest.raises(ConfigError, match="not a coalora method"):
        build_method(cfg)
    # a known name with a hostile _target_ builds the registered class and imports nothing
    cfg = OmegaConf.create({"name": "lora", "_target_": "evil_module_for_coalora.X", "rank": 2})
    assert type(build_method(cfg)).__name__ == "LoRA"
    assert not marker.exists()


class NoisyLoRA(Method):
    """The example of docs/architecture.md ("Methods"), verbatim."""

    name = "noisy_lora"

    def inject_adapters(self, model, ctx):
        super().inject_adapters(model, ctx)
        g = torch.Generator().manual_seed(ctx.seed)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                with torch.no_grad():
                    m.lora_B.copy_(1e-3 * torch.randn(m.lora_B.shape, generator=g))


def test_the_documented_smallest_method_trains_through_the_shared_machinery(tiny_cfg):
    from coalora.stages.build import build_module, prepare

    cfg = tiny_cfg(["method=qlora", "quant=nf4"])
    dm, model, _, ctx = prepare(cfg)
    method = NoisyLoRA(cfg.method)
    method.check(ctx.quant)
    method.setup(model, ctx)
    lit = build_module(cfg, model, method, ctx)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert loras and all(float(m.lora_B.detach().abs().max()) > 0 for m in loras)
    loss = method.training_loss(lit.model, next(iter(dm.train_dataloader())), 0)
    loss.backward()
    trained = {n for n, p in lit.named_parameters() if p.grad is not None}
    assert trained and all(("lora_" in n or "classifier" in n) for n in trained)


@pytest.mark.parametrize("method", ["qlora", "coalora"])
def test_packed_storage_trains_like_dequantized_storage(tiny_cfg, method):
    """``quant.storage=packed`` is a memory choice only: same loss and same gradients."""
    from coalora.stages.build import build_module, prepare

    extra = ["quant=budget", "quant.budget=3.0"] if method == "qlora" else [
        "method.pool.start=3.0", "method.pool.stop=3.8", "method.pool.step=0.4"]  # fmt: skip
    results = []
    for storage in ("dequantized", "packed"):
        cfg = tiny_cfg([f"method={method}", *extra, f"quant.storage={storage}"])
        dm, model, m, ctx = prepare(cfg)
        m.setup(model, ctx)
        lit = build_module(cfg, model, m, ctx)
        for n, p in lit.named_parameters():  # B = 0 blocks A's gradient: give B a value
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        loss = m.training_loss(lit.model, next(iter(dm.train_dataloader())), 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lit.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads))
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert set(g0) == set(g1) and all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)


def test_a_misspelt_method_key_is_one_clear_line(tiny_cfg):
    from coalora.stages.build import check_run

    cfg = tiny_cfg(["method=lora", "+method.rnak=8"])
    with pytest.raises(ConfigError, match=r"unknown keys \['rnak'\]"):
        check_run(cfg)
