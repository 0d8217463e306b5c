from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coalora.errors import CoaloraError, ConfigError
from coalora.models import (
    build_causal_lm,
    build_model,
    build_tokenizer,
    check_model_task,
    model_kind,
)

ROOT = Path(__file__).resolve().parents[2]
DECODERS = [
    "smollm2_135m",
    "qwen2_5_0_5b",
    "qwen2_5_1_5b",
    "qwen2_5_3b",
    "llama2_7b",
    "llama3_1_8b",
]
DECODER_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(group, name):
    return OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml")


def test_tiny_llama_is_seeded_small_and_runs():
    c = load("model", "tiny_llama")
    a, b = build_causal_lm(c, seed=3), build_causal_lm(c, seed=3)
    assert torch.equal(
        a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    )
    assert not torch.equal(
        a.model.layers[0].mlp.up_proj.weight,
        build_causal_lm(c, seed=4).model.layers[0].mlp.up_proj.weight,
    )
    assert sum(p.numel() for p in a.parameters()) < 3_000_000
    assert a.config.use_cache is False and a.dtype == torch.float32
    tok = build_tokenizer(c)
    assert (tok.eos_token, tok.bos_token) == ("[SEP]", "[CLS]")
    assert tok.eos_token_id == a.config.eos_token_id and tok.pad_token is not None
    ids = torch.tensor([tok("the cat sat on the mat", add_special_tokens=False).input_ids])
    out = a(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], a.config.vocab_size)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_configs_declare_kind_and_the_seven_projections(name, compose):
    cfg = compose([f"model={name}"])
    assert model_kind(cfg.model) == "decoder"
    assert list(cfg.model.target_modules) == DECODER_TYPES
    assert int(cfg.model.num_layers) > 0
    if cfg.model.source == "gguf_wheel":  # the converted folder lives under paths.cache_dir
        assert str(cfg.model.local_dir).startswith(str(cfg.paths.cache_dir))
        assert str(cfg.model.wheel.download_dir).startswith(str(cfg.paths.cache_dir))
    else:
        assert cfg.model.source == "hub" and "/" in cfg.model.hub_id


@pytest.mark.parametrize("name", ["minilm_l6", "tiny_bert", "roberta_base", "roberta_large"])
def test_encoder_configs_declare_kind(name):
    assert model_kind(load("model", name)) == "encoder"


def test_model_and_task_kinds_must_match():
    sst2, wt2 = load("task", "sst2"), load("task", "wikitext2")
    check_model_task(load("model", "tiny_llama"), wt2)
    check_model_task(load("model", "minilm_l6"), sst2)
    with pytest.raises(ConfigError, match="task=wikitext2 .* needs a decoder model"):
        check_model_task(load("model", "minilm_l6"), wt2)
    with pytest.raises(ConfigError, match="task=sst2 .* needs an encoder model"):
        check_model_task(load("model", "tiny_llama"), sst2)


def test_classifier_builder_refuses_a_decoder():
    with pytest.raises(ConfigError, match="is a decoder"):
        build_model(load("model", "tiny_llama"), num_labels=2)


def test_unknown_kind_and_source_are_clear_errors():
    c = load("model", "tiny_llama")
    c.kind = "seq2seq"
    with pytest.raises(ConfigError, match=r"model.kind='seq2seq' .*allowed"):
        model_kind(c)
    c = load("model", "qwen2_5_0_5b")
    c.source = "ftp"
    with pytest.raises(ConfigError, match="model.source='ftp'"):
        build_causal_lm(c)


def test_hub_model_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = load("model", "qwen2_5_0_5b")
    c.hub_id = "coalora-tests/not-a-cached-model"
    with pytest.raises(CoaloraError, match="model=qwen2_5_0_5b: cannot load") as err:
        build_causal_lm(c)
    assert "\n" not in str(err.value)
