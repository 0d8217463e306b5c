from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coalora.errors import ConfigError
from coalora.models import build_model, build_tokenizer, find_targets, module_type, target_names

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

PATTERNS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def model_cfg(name: str):
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


def test_minilm_loads_offline_with_pretrained_weights():
    cfg = model_cfg("minilm_l6")
    model = build_model(cfg, num_labels=2)
    tok = build_tokenizer(cfg)
    names = target_names(model, list(cfg.target_modules))
    assert len(names) == 36  # 6 layers x 6 linears
    w = model.get_submodule(names[0]).weight
    assert w.shape == (384, 384) and w.std() > 0.01  # pretrained, not a fresh init
    enc = tok(["a gripping , funny film ."], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, 2)


def test_tiny_bert_is_random_and_small():
    model = build_model(model_cfg("tiny_bert"), num_labels=3, seed=1)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert model.config.num_labels == 3


def test_module_types_distinguish_attention_and_ffn_output():
    a = "bert.encoder.layer.3.attention.output.dense"
    f = "bert.encoder.layer.3.output.dense"
    assert module_type(a, PATTERNS) == "attention.output.dense"
    assert module_type(f, PATTERNS) == "output.dense"
    model = build_model(model_cfg("tiny_bert"), num_labels=2, seed=0)
    blocks = {t.name: t.block for t in find_targets(model, PATTERNS)}
    assert blocks["bert.encoder.layer.1.output.dense"] == 1  # read off the ModuleList
    assert blocks["bert.encoder.layer.0.attention.self.query"] == 0


def test_unknown_source_is_a_clear_error():
    cfg = model_cfg("tiny_bert")
    cfg.source = "ftp"
    with pytest.raises(ConfigError, match="model.source"):
        build_model(cfg, num_labels=2)
