"""DequantCache, QuantLinear, model-level switching, target names and the Fisher diagonal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coalora.quant import (
    NF4,
    DequantCache,
    ModelQuantConfig,
    QuantConfig,
    QuantLinear,
    fake_quantize,
    fisher_diagonal,
    model_weights,
    quant_layers,
    quantize_model,
    set_model_config,
    target_linear_names,
)

Q2 = QuantConfig(2, 4, "bf16", 16, 16)


def test_cache_lru_eviction_and_counters():
    t = torch.zeros(256)  # 1 KiB
    cache = DequantCache(limit_mb=2.5 / 1024)  # room for two
    cache.put("a", t.clone())
    cache.put("b", t.clone())
    assert cache.get("a") is not None  # a is now most recent
    cache.put("c", t.clone())  # evicts b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)
    assert cache.nbytes == 2 * 1024 and len(cache) == 2
    cache.put("huge", torch.zeros(4096))  # larger than the limit: not stored
    assert "huge" not in cache and len(cache) == 2
    calls = []
    cache.get_or_create("d", lambda: calls.append(1) or t.clone())
    cache.get_or_create("d", lambda: calls.append(1) or t.clone())
    assert calls == [1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict(
            {"query": nn.Linear(16, 32), "output": nn.ModuleDict({"dense": nn.Linear(32, 16)})}
        )
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(16, 16, bias=False), "dense_x": nn.Linear(16, 16)}
        )
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = self.attention["output"]["dense"](torch.relu(self.attention["query"](x)))
        h = self.output["dense"](h) + self.output["dense_x"](h)
        return self.head(h)


def test_target_names_dotted_boundary_in_module_order():
    model = Tiny()
    names = target_linear_names(model, ["output.dense", "query"])
    assert names == ["attention.query", "attention.output.dense", "output.dense"]
    assert target_linear_names(model, "head") == ["head"]
    with pytest.raises(ValueError, match="no nn.Linear"):
        target_linear_names(model, ["utput.dense", "nothing"])


def test_quant_linear_switching_uses_the_cache():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    cache = DequantCache()
    ql = QuantLinear(lin, "layer", cache)
    assert not any(p.requires_grad for p in ql.parameters())
    assert "weight_fp" not in ql.state_dict() and "bias" in ql.state_dict()
    assert torch.equal(ql(x), lin(x))  # no config = full precision
    ql.set_config(NF4)
    assert torch.equal(ql(x), F.linear(x, fake_quantize(lin.weight, NF4), lin.bias))
    w_nf4 = ql.weight
    ql.set_config(Q2)
    assert not torch.equal(ql.weight, w_nf4)
    ql.set_config(NF4)
    assert ql.weight is w_nf4 and cache.hits == 1 and cache.misses == 2
    ql.set_config(None)
    assert ql.weight is ql.weight_fp and ql.qc is None
    assert "b4-b08" in repr(QuantLinear(lin, "x", cache)) or "fp" in repr(ql)


def test_quantize_model_and_set_model_config():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 16)
    names = target_linear_names(model, ["query", "output.dense"])
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    ref_weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    a = ModelQuantConfig.uniform(numels, NF4)
    b = ModelQuantConfig({n: Q2 if i % 2 else NF4 for i, n in enumerate(names)}, numels)
    cache = DequantCache()
    layers = quantize_model(model, names, a, cache)
    assert set(layers) == set(names) and all(
        isinstance(model.get_submodule(n), QuantLinear) for n in names
    )
    assert set(quant_layers(model)) == set(names)
    ya = model(x)
    set_model_config(model, b)
    yb = model(x)
    assert not torch.allclose(ya, yb)
    set_model_config(model, a, layers)
    assert torch.equal(model(x), ya)
    assert model.get_submodule(names[1]).weight is cache.get((names[1], NF4))
    set_model_config(model, None)
    for n in names:
        assert torch.equal(model.get_submodule(n).weight, ref_weights[n])
    assert all(torch.equal(w, ref_weights[n]) for n, w in model_weights(model, names).items())
    with pytest.raises(ValueError, match="missing"):
        set_model_config(model, ModelQuantConfig.uniform({names[0]: numels[names[0]]}, NF4))


def test_model_weights_through_adapter_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    model = nn.Sequential(nn.Linear(8, 8))
    ref = model[0].weight
    quantize_model(model, ["0"], None)
    model[0] = Wrapper(model[0])
    assert model_weights(model, ["0"])["0"].data_ptr() == ref.data_ptr()  # shared, not copied
    wrapped = nn.Sequential(Wrapper(nn.Linear(8, 8)))
    quantize_model(wrapped, ["0"], ModelQuantConfig.uniform({"0": 64}, Q2))
    assert isinstance(wrapped[0].base_layer, QuantLinear) and wrapped[0].base_layer.qc == Q2


def test_fisher_diagonal_sums_per_example_squared_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model.train()
    batches = [(torch.randn(1, 4), torch.randint(0, 2, (1,))) for _ in range(3)]

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    fisher = fisher_diagonal(model, ["0", "2"], batches, loss_fn)
    expected = torch.zeros_like(model[0].weight)
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        expected += model[0].weight.grad.square()
    assert torch.allclose(fisher["0"], expected) and fisher["2"].shape == (2, 8)
    assert model.training and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="batch size 2"):
        fisher_diagonal(
            model, ["0"], [(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))], loss_fn
        )
