"""The adapter-layer contract (coalora.adapters.base), checked the way PEFT checks its tuners:
merge -> unmerge round-trips, folded = unfolded, only adapters get gradients, dtypes preserved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coalora.adapters import AdapterLayer, LoRALinear, WHTAdapterLinear
from coalora.quant import NF4, DequantCache, QuantLinear


def lora(base=None, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(base or nn.Linear(16, 12), r=4, alpha=8)
    nn.init.normal_(layer.lora_B, std=0.1)
    return layer


def wht(seed=0):
    torch.manual_seed(seed)
    layer = WHTAdapterLinear(nn.Linear(16, 12), rank=2, scaling=2.0)
    nn.init.normal_(layer.spectrum, std=0.1)
    return layer


@pytest.mark.parametrize("make", [lora, wht], ids=["lora", "wht"])
def test_every_adapter_follows_the_contract(make):
    layer = make()
    assert isinstance(layer, AdapterLayer)
    assert layer.get_base_layer() is layer.base_layer
    assert set(layer.adapter_parameters()) and all(
        p.requires_grad for p in layer.adapter_parameters().values()
    )
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    x = torch.randn(5, 16)
    base_out = layer.base_layer(x)
    torch.testing.assert_close(layer(x), base_out + x @ layer.delta_weight().T)


@pytest.mark.parametrize("make", [lora, wht], ids=["lora", "wht"])
def test_merge_unmerge_round_trip(make):
    layer = make()
    x = torch.randn(5, 16)
    w0 = layer.base_layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.merge()  # a second merge is a no-op, not a double add
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_into_a_quantized_base_is_refused_with_a_clear_error():
    base = QuantLinear(nn.Linear(64, 8), "q", DequantCache())
    base.set_config(NF4)
    layer = lora(base)
    with pytest.raises(TypeError, match="format=merged"):
        layer.merge()


def test_folded_equals_mixed_and_unfold_restores_plain_lora():
    layer = lora()
    mix = torch.eye(4) + 0.2 * torch.randn(4, 4)
    x = torch.randn(3, 16)
    with layer.mixing(mix):
        mixed = layer(x)
    plain = layer(x)
    layer.fold(mix)
    torch.testing.assert_close(layer(x), mixed, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unfold"):
        with layer.mixing(mix):
            pass
    layer.unfold()
    torch.testing.assert_close(layer(x), plain)


def test_gradients_flow_to_the_adapter_and_through_the_mixing_only():
    layer = lora()
    mix = (torch.eye(4) + 0.1 * torch.randn(4, 4)).requires_grad_(True)
    x = torch.randn(6, 16)
    with layer.mixing(mix):
        out = layer(x)
    out.square().sum().backward()  # backward after the block: the graph kept M
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert mix.grad is not None and mix.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_dtype_preserved_with_a_bf16_base_and_an_fp32_adapter():
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = lora(base)
    assert layer.adapter_dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16  # the delta is cast back to the base output's dtype
    ref = base(x).float() + (x.float() @ layer.delta_weight().T)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
