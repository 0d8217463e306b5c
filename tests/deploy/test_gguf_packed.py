"""The packed export of a GGUF-space model: entries are the GGUF blocks, `coalora.deploy.load`
gives the training-time logits (with and without merge), the NF-only bnb backend refuses."""

from __future__ import annotations

import pytest
import torch
from deploy.packed_helpers import TARGETS
from support import tiny_bert_classifier

from coalora import deploy
from coalora.adapters.inject import inject
from coalora.adapters.lora import LoRALinear
from coalora.errors import CoaloraError
from coalora.quant import (
    DequantCache,
    ModelQuantConfig,
    QuantLinear,
    quantize_model,
    set_model_config,
    target_linear_names,
)
from coalora.quant.config import GGUFOption
from coalora.quant.gguf_space import GGUFPacked


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_bert_classifier(hidden=256, layers=1, seed=0)  # 256-wide rows: K-types fit
    names = target_linear_names(model, TARGETS)
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    pick = {"4.5": ("Q4_K", "IQ4_NL"), "6": ("Q6_K", "Q5_1")}
    configs = {
        label: ModelQuantConfig({n: GGUFOption(t[i % 2]) for i, n in enumerate(names)}, numels)
        for label, t in pick.items()
    }
    quantize_model(model, names, configs["4.5"], DequantCache(storage="packed"))
    torch.manual_seed(1)
    inject(model, names, lambda n, m: LoRALinear(m, 4, 8))
    ids = torch.randint(0, 100, (2, 9))
    adapters, logits = {}, {}
    for label, config in configs.items():
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).lora_B.normal_(0, 0.05)
        set_model_config(model, config)
        adapters[label], scaling = deploy.lora_tensors(model, names)
        with torch.no_grad():
            logits[label] = model(ids).logits
    out = tmp_path_factory.mktemp("export") / "packed"
    deploy.save_packed(model, names, configs, adapters, out, scaling=scaling)
    return {"path": out, "ids": ids, "logits": logits, "names": names, "configs": configs}


def test_round_trip_serves_the_gguf_blocks(exported):
    manifest = deploy.read_manifest(exported["path"])
    assert {e["option"] for e in manifest["entries"].values()} == {
        "gguf-Q4_K",
        "gguf-IQ4_NL",
        "gguf-Q6_K",
        "gguf-Q5_1",
    }
    for label, config in exported["configs"].items():
        model = deploy.load(exported["path"], budget=label)
        with torch.no_grad():
            assert torch.equal(model(exported["ids"]).logits, exported["logits"][label])
        name = exported["names"][0]
        base = model.get_submodule(name).base_layer
        assert isinstance(base, QuantLinear) and isinstance(base._packed, GGUFPacked)
        assert base._packed.qc == config[name] and base.weight_fp is None


def test_merge_requantizes_with_the_same_type(exported):
    model = deploy.load(exported["path"], budget="6", merge=True)
    errors = model.coalora_export["merge_error"]
    assert errors and all(0 < e < 0.05 for e in errors.values())
    with torch.no_grad():
        out = model(exported["ids"]).logits
    assert torch.allclose(out, exported["logits"]["6"], atol=0.05)


def test_bnb_backend_refuses_gguf_entries(exported):
    with pytest.raises(CoaloraError, match="backend='bnb' reads NF4 entries; .* gguf-"):
        deploy.load(exported["path"], budget="4.5", backend="bnb")
