"""Packed storage: exact equality with the dequantized storage, no dense weight saved for
backward, byte accounting against the storage formula, pinning and dropping the original."""

from __future__ import annotations

import pytest
import torch
from support import tiny_bert_classifier
from torch import nn

from coalora.errors import CoaloraError, ConfigError
from coalora.quant import (
    NF3,
    NF4,
    DequantCache,
    ModelQuantConfig,
    QuantConfig,
    QuantLinear,
    dequantize_packed,
    fake_quantize,
    formula_weight_bytes,
    freeze_model,
    pack_quantized,
    quantize_model,
    quantize_nf,
    resident_weight_bytes,
    set_model_config,
    target_linear_names,
)

Q2 = QuantConfig(2, 4, "bf16", 16, 16)
Q3 = QuantConfig(3, 3, "fp16", 32, 64)
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_bert(seed: int = 0) -> nn.Module:
    return tiny_bert_classifier(hidden=128, layers=2, seed=seed)


def mixed_config(model: nn.Module, names: list[str]) -> ModelQuantConfig:
    options = [NF4, Q2, NF3, Q3]
    numels = {n: model.get_submodule(n).weight.numel() for n in names}
    return ModelQuantConfig({n: options[i % 4] for i, n in enumerate(names)}, numels)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(64, 48), (7, 13)])  # the second pads to a super-block
def test_dequantize_packed_equals_fake_quantize(bits, shape):
    torch.manual_seed(bits)
    W = torch.randn(*shape) * 0.1
    qc = QuantConfig(bits, 4 if bits % 2 else 8, "bf16", 16, 16)
    p = pack_quantized(quantize_nf(W, qc))
    assert torch.equal(dequantize_packed(p), fake_quantize(W, qc))
    assert torch.equal(dequantize_packed(p, torch.bfloat16), fake_quantize(W, qc).bfloat16())


def test_cache_and_layer_storage_are_validated():
    with pytest.raises(ConfigError, match=r"quant.storage='fp8'.*allowed: \['packed'"):
        DequantCache(storage="fp8")
    with pytest.raises(ValueError, match="storage='packed' but the cache stores 'dequantized'"):
        QuantLinear(nn.Linear(4, 4), "l", DequantCache(), storage="packed")
    assert QuantLinear(nn.Linear(4, 4), "l", storage="packed").storage == "packed"


@pytest.mark.parametrize("qc", [NF4, Q2, Q3])
def test_packed_linear_equals_dequantized_and_saves_no_dense_weight(qc):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    dense = QuantLinear(lin, "l", DequantCache(storage="dequantized"))
    packed = QuantLinear(lin, "l", DequantCache(storage="packed"))
    dense.set_config(qc)
    packed.set_config(qc)
    x = torch.randn(4, 7, 96, requires_grad=True)
    gy = torch.randn(4, 7, 80)
    y_dense = dense(x)
    (g_dense,) = torch.autograd.grad(y_dense, x, gy)
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(tuple(t.shape)) or t, lambda t: t
    ):
        y_packed = packed(x)
    (g_packed,) = torch.autograd.grad(y_packed, x, gy)
    assert torch.equal(y_packed, y_dense) and torch.equal(g_packed, g_dense)
    assert (80, 96) not in saved and (96, 80) not in saved  # the weight is recomputed
    assert torch.equal(packed.weight, dense.weight)
    assert packed.current_nbytes() < dense.current_nbytes() / 3


def test_tiny_bert_packed_logits_and_input_grads_equal_dequantized():
    model_d, model_p = tiny_bert(), tiny_bert()
    names = target_linear_names(model_d, TARGETS)
    config = mixed_config(model_d, names)
    quantize_model(model_d, names, config, DequantCache(storage="dequantized"))
    quantize_model(model_p, names, config, DequantCache(storage="packed"))
    ids = torch.randint(0, 100, (3, 11))
    emb_d = model_d.bert.embeddings.word_embeddings(ids).detach().requires_grad_()
    emb_p = emb_d.detach().clone().requires_grad_()
    out_d = model_d(inputs_embeds=emb_d).logits
    out_p = model_p(inputs_embeds=emb_p).logits
    assert torch.equal(out_d, out_p)
    out_d.square().sum().backward()
    out_p.square().sum().backward()
    assert torch.equal(emb_d.grad, emb_p.grad)
    with torch.no_grad():
        assert torch.equal(model_d(ids).logits, model_p(ids).logits)


def test_frozen_packed_model_bytes_match_the_storage_formula():
    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    config = mixed_config(model, names)
    quantize_model(model, names, config, DequantCache(storage="packed"))
    assert resident_weight_bytes(model)["original"] > 0
    freeze_model(model, [config], keep_original="drop")
    got = resident_weight_bytes(model)
    want = formula_weight_bytes(model, config)
    assert got["original"] == 0
    assert abs(got["total"] - want) / want < 0.02
    targets = config.total_bits() / 8
    assert abs(got["quantized"] - targets) / targets < 0.01  # offsets only
    with pytest.raises(CoaloraError, match="full-precision weight was dropped"):
        set_model_config(model, ModelQuantConfig.uniform(config.numels, NF3))


def test_packed_cache_switching_is_a_lookup_and_lru_in_bytes():
    model = tiny_bert()
    names = target_linear_names(model, TARGETS)
    a = mixed_config(model, names)
    b = ModelQuantConfig.uniform(a.numels, NF4)
    cache = DequantCache(storage="packed")
    layers = quantize_model(model, names, a, cache)
    set_model_config(model, b, layers)
    misses = cache.misses
    for _ in range(3):
        set_model_config(model, a, layers)
        set_model_config(model, b, layers)
    assert cache.misses == misses and cache.hits >= 6 * len(names)
    pairs = {(n, c[n]) for n in names for c in (a, b)}  # shared options are stored once
    assert len(cache) == len(pairs) < 2 * len(names)
    assert cache.nbytes == sum(layers[n].packed_entry(qc).nbytes() for n, qc in pairs)
    small = DequantCache(limit_mb=cache.nbytes / 2**20 / 2, storage="packed")
    model2 = tiny_bert()
    layers2 = quantize_model(model2, names, a, small)
    set_model_config(model2, b, layers2)
    assert small.evictions > 0 and small.nbytes <= small.limit_bytes


def test_keep_original_on_cpu_still_quantizes_new_configurations():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = QuantLinear(lin, "l", DequantCache(storage="packed"))
    layer.set_config(NF4)
    layer.freeze([NF4], keep_original="cpu")
    assert layer.weight_fp is None and layer.original_nbytes() == lin.weight.numel() * 4
    layer.set_config(Q2)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ fake_quantize(lin.weight, Q2).T + lin.bias)
    assert layer.options() == [NF4]
    with pytest.raises(ValueError, match="keep_original='gpu' is not allowed"):
        layer.freeze([NF4], keep_original="gpu")


def test_subclass_serving_dense_weights_stays_dequantized():
    class Dense(QuantLinear):
        def _dequantized(self, qc):
            return torch.zeros(self.out_features, self.in_features)

    layer = Dense(nn.Linear(8, 4), "l", DequantCache(storage="packed"))
    layer.set_config(NF4)
    assert layer.storage == "dequantized" and torch.equal(layer.weight, torch.zeros(4, 8))


def test_compute_dtype_follows_the_input_under_autocast_and_bf16():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    dense = QuantLinear(lin, "l", DequantCache(storage="dequantized"))
    packed = QuantLinear(lin, "l", DequantCache(storage="packed"))
    dense.set_config(NF4)
    packed.set_config(NF4)
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_dense, y_packed = dense(x), packed(x)
    assert y_packed.dtype == torch.bfloat16 and torch.equal(y_dense, y_packed)
    (g_dense,) = torch.autograd.grad(y_dense.float().sum(), x)
    (g_packed,) = torch.autograd.grad(y_packed.float().sum(), x)
    assert g_packed.dtype == torch.float32 and torch.equal(g_dense, g_packed)
    lin16 = nn.Linear(64, 32).to(torch.bfloat16)  # a bf16 model: its bf16 weight is quantized
    dense16 = QuantLinear(lin16, "l", DequantCache(storage="dequantized"))
    packed16 = QuantLinear(lin16, "l", DequantCache(storage="packed"))
    dense16.set_config(NF4)
    packed16.set_config(NF4)
    xb = torch.randn(8, 64, dtype=torch.bfloat16)
    assert torch.equal(dense16(xb), packed16(xb))


def test_own_frozen_weights_copies_views_of_a_shared_storage_and_keeps_ties():
    from coalora.quant import QuantLinear, own_frozen_weights

    blob = torch.randn(4 * 16 + 16)  # one storage, as a memory-mapped checkpoint gives
    emb = nn.Embedding(4, 16)
    emb.weight = nn.Parameter(blob[: 4 * 16].view(4, 16), requires_grad=False)
    head = nn.Linear(16, 4, bias=False)
    head.weight = emb.weight  # tied
    norm = nn.LayerNorm(16)
    norm.weight = nn.Parameter(blob[4 * 16 :], requires_grad=False)
    norm.bias.requires_grad_(True)  # trainable: left alone
    q = QuantLinear(nn.Linear(16, 16), "q")
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": norm, "q": q})
    bias_ptr = norm.bias.data_ptr()
    q_ptr = q.weight_fp.untyped_storage().data_ptr()
    before = emb.weight.detach().clone()
    copied = own_frozen_weights(model)
    base = blob.untyped_storage().data_ptr()
    assert emb.weight.untyped_storage().data_ptr() != base
    assert norm.weight.untyped_storage().data_ptr() != base
    assert head.weight is emb.weight and torch.equal(emb.weight, before)
    assert norm.bias.data_ptr() == bias_ptr  # trainable parameters are not copied
    assert q.weight_fp.untyped_storage().data_ptr() == q_ptr  # QuantLinear layers untouched
    assert copied == (4 * 16 + 16) * 4
