"""A tiny random llama whose rows allow every GGUF type (hidden 256, FFN 512: the K-types'
256-weight blocks divide both), quantized at hand-made GGUF configurations, with LoRA adapters
whose B is nonzero; and the run config a GGUF export reads."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from coalora.adapters.inject import inject
from coalora.adapters.lora import LoRALinear
from coalora.models import build_causal_lm, build_tokenizer
from coalora.quant import DequantCache, ModelQuantConfig, quantize_model, set_model_config
from coalora.quant.gguf_space import GGUFOption
from coalora.quant.model import target_linear_names

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# two configurations: K-types and IQ4 at ~4.7 bits, the 32-weight types at ~6 bits
TYPES = {
    "4.7": ["Q4_K", "Q5_K", "IQ4_XS", "Q6_K", "Q3_K", "IQ4_NL", "Q4_0"],
    "6.1": ["Q8_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q6_K", "Q8_0"],
}


def run_cfg(arch: str = "llama", kind: str = "gguf", method: str = "coalora", **model):
    """The parts of a run's composed config that a GGUF export reads."""
    base = OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml")
    base.random_config.update(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=30592,  # 30522 tokens padded: ids past the tokenizer become unused tokens
    )  # fmt: skip
    base.arch = arch
    base.update(model)
    return OmegaConf.create(
        {
            "model": base,
            "method": {"name": method, "rank": 4, "alpha": 8.0},
            "quant": {"space": {"kind": kind}},
            "task": {"name": "wikitext2"},
        }
    )


def configs(names: list[str], numels: dict[str, int]) -> dict[str, ModelQuantConfig]:
    """label → configuration cycling the label's types over the layers."""
    return {
        label: ModelQuantConfig(
            {n: GGUFOption(types[i % len(types)]) for i, n in enumerate(names)}, numels
        )
        for label, types in TYPES.items()
    }


def tiny_gguf_llama(cfg=None, seed: int = 0):
    """(model, names, configs, adapt, tokenizer): QuantLinear targets wrapped by LoRA with random
    B; ``adapt(config)`` switches the base and scales B per configuration (a stand-in for
    CoA-LoRA's fold, so the test sees that the adapter follows the configuration)."""
    cfg = cfg or run_cfg()
    model = build_causal_lm(cfg.model, seed=seed).eval()
    names = target_linear_names(model, TARGETS)
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    confs = configs(names, numels)
    quantize_model(model, names, next(iter(confs.values())), DequantCache())
    gen = torch.Generator().manual_seed(seed + 1)
    loras: dict[str, nn.Module] = inject(
        model, names, lambda _, m: LoRALinear(m, r=cfg.method.rank, alpha=cfg.method.alpha)
    )
    trained = {}
    with torch.no_grad():
        for n, m in loras.items():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.05)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)
            trained[n] = m.lora_B.detach().clone()

    def adapt(config: ModelQuantConfig) -> None:
        set_model_config(model, config)
        factor = 1.0 + 0.1 * config.average_bits()
        with torch.no_grad():
            for n, m in loras.items():
                m.lora_B.copy_(trained[n] * factor)

    return model, names, confs, adapt, build_tokenizer(cfg.model)
