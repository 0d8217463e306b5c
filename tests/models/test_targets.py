from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch import nn

from coalora.errors import ConfigError
from coalora.models import build_causal_lm, build_model, find_targets, num_blocks, target_names
from coalora.quant.model import target_linear_names

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
DECODER_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cfg(name):
    return OmegaConf.load(CONF / f"{name}.yaml")


def test_tiny_llama_targets_from_structure():
    model = build_causal_lm(cfg("tiny_llama"))
    targets = find_targets(model, DECODER_TYPES)
    assert len(targets) == 14 and num_blocks(model) == 2
    assert [t.block for t in targets] == [0] * 7 + [1] * 7
    assert [t.module_type for t in targets[:7]] == DECODER_TYPES
    for t in targets:  # decoder module type = the Linear's attribute name
        assert t.module_type == t.name.rsplit(".", 1)[1]
        assert isinstance(model.get_submodule(t.name), nn.Linear)
    assert "lm_head" not in {t.name for t in targets}


def test_bert_types_keep_attention_and_ffn_output_apart():
    c = cfg("tiny_bert")
    model = build_model(c, num_labels=2)
    targets = find_targets(model, c.target_modules)
    by_name = {t.name: t for t in targets}
    assert by_name["bert.encoder.layer.1.attention.output.dense"].module_type == (
        "attention.output.dense"
    )
    assert by_name["bert.encoder.layer.1.output.dense"].module_type == "output.dense"
    assert by_name["bert.encoder.layer.1.output.dense"].block == 1
    assert len({t.module_type for t in targets}) == 6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # nested list


class Odd(nn.Module):
    """Blocks under a container name no regex knows; a target outside any block."""

    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([Block() for _ in range(3)])
        self.head_proj = nn.Linear(4, 4)


def test_block_index_comes_from_the_outermost_module_list():
    targets = find_targets(Odd(), ["proj", "experts.1"])
    got = [(t.name, t.block, t.module_type) for t in targets]
    assert got == [
        ("stack.0.proj", 0, "proj"),
        ("stack.0.experts.1", 0, "experts.1"),
        ("stack.1.proj", 1, "proj"),
        ("stack.1.experts.1", 1, "experts.1"),
        ("stack.2.proj", 2, "proj"),
        ("stack.2.experts.1", 2, "experts.1"),
    ]  # head_proj does not end with ".proj" on a dotted boundary
    assert num_blocks(Odd()) == 3


def test_one_shared_target_finder():
    model = build_causal_lm(cfg("tiny_llama"))
    assert target_names(model, DECODER_TYPES) == target_linear_names(model, DECODER_TYPES)
    assert [t.name for t in find_targets(model, DECODER_TYPES)] == target_names(
        model, DECODER_TYPES
    )


def test_no_match_is_a_config_error():
    with pytest.raises(ConfigError, match="model.target_modules"):
        find_targets(nn.Sequential(nn.Linear(2, 2)), ["q_proj"])
