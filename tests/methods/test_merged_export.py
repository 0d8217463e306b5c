"""``export.py format=merged``: a plain transformers checkpoint with the adapted model's effective
weights reproduces its logits, for adapters that are not LoRA (QWHA), a base that is not quant(W)
(LQ-LoRA) and CoA-LoRA after adaptation."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from coalora.adapters import LoRALinear, adapter_modules
from coalora.deploy.merged import effective_linear, merged_model
from coalora.deploy.writer import write_export
from coalora.errors import ConfigError
from coalora.methods import registry
from coalora.stages.build import build_backbone
from coalora.stages.export import export_configuration, export_format

UNIFORM3 = ["quant=uniform", "quant.config.bits=3"]


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def perturb_head(lit) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lit.model.named_parameters():
            if "classifier" in n:
                p.add_(0.5 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["qwha", "lq_lora", "coalora"])
def test_merged_checkpoint_reproduces_the_adapted_logits(built, tmp_path, method):
    overrides = [f"method={method}"] + ([] if method == "coalora" else UNIFORM3)
    if method == "coalora":
        overrides += ["method.pool.start=3.0", "method.pool.stop=4.0", "method.pool.step=0.5"]
    cfg, lit, dm = built(overrides)
    perturb_head(lit)
    if method == "coalora":  # B = 0 at init: give the adapter and the mapper something to fold
        from coalora import adapt

        torch.manual_seed(1)
        with torch.no_grad():
            for m in adapter_modules(lit.model, LoRALinear).values():
                m.lora_B.normal_(0, 0.05)
            for p in lit.method.mapper.parameters():
                p.add_(0.05 * torch.randn_like(p))
        adapt(lit, lit.method.config)
    batch = next(iter(dm.val_dataloader()))
    expected = logits(lit.model, batch)
    merged = merged_model(lit.model, lit.method.names, build_backbone(cfg), cfg.task)
    assert torch.allclose(logits(merged, batch), expected, atol=1e-4)
    out = write_export(tmp_path / "merged", {"model": merged, "README.md": "x"})
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert torch.allclose(logits(reloaded, batch), expected, atol=1e-4)
    # the merged weights differ from the full-precision ones: the quantized base is in them
    name = lit.method.names[0]
    fp = dict(merged.named_parameters())[f"{name}.weight"]
    orig = lit.model.get_submodule(name)
    assert fp.shape == (orig.out_features, orig.in_features)


def test_effective_linear_of_a_plain_linear_is_its_weights():
    lin = torch.nn.Linear(5, 3)
    w, b = effective_linear(lin, 5)
    assert torch.allclose(w, lin.weight, atol=1e-6) and torch.allclose(b, lin.bias, atol=1e-6)


def test_formats_and_fixed_configurations_fail_clearly(built):
    methods = registry()
    assert export_format("auto", methods["qwha"]) == "merged"
    assert export_format("auto", methods["coalora"]) == "peft"
    with pytest.raises(
        ConfigError, match=r"allowed: \['auto', 'peft', 'merged', 'packed', 'gguf'\]"
    ):
        export_format("onnx", methods["coalora"])
    with pytest.raises(ConfigError, match="format=merged"):
        export_format("peft", methods["lq_lora"])
    cfg, lit, _ = built(["method=qwha", *UNIFORM3])
    trained = lit.method.config
    ask = OmegaConf.create({"quant": {"mode": "budget", "budget": None}})
    assert export_configuration(ask, lit) is trained
    ask.quant.budget = trained.average_bits()
    assert export_configuration(ask, lit) is trained
    ask.quant.budget = 8.0
    with pytest.raises(ConfigError, match="trained on one configuration"):
        export_configuration(ask, lit)


def test_regression_head_exports_task_units_and_classes_get_names():
    from coalora.deploy.merged import class_names
    from coalora.deploy.writer import fold_label_affine

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Linear(4, 4))
    model.add_module("classifier", torch.nn.Linear(4, 1))
    x = torch.randn(3, 4)
    before = model(x)
    task = OmegaConf.create({"is_regression": True, "label_shift": 2.7, "label_scale": 1.5})
    fold_label_affine(model, task, ["classifier"])
    torch.testing.assert_close(model(x), before * 1.5 + 2.7)  # standardised -> task scores
    assert class_names(OmegaConf.create({"class_names": ["negative", "positive"]})) == [
        "negative",
        "positive",
    ]
