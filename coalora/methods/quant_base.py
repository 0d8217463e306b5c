"""Glue between the ``quant=`` config group and the quantization engine: build the base
configuration (uniform / budget allocation / file) and quantize the target linears in place."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def quantize_base(model: nn.Module, names: list[str], ctx):
    """Returns ``(ModelQuantConfig | None, DequantCache | None)``."""
    q = ctx.cfg.quant
    if q.mode == "none":
        return None, None
    if q.mode == "bnb_nf4":
        from coalora.quant.bnb import replace_with_bnb_nf4

        replace_with_bnb_nf4(model, names)
        return None, None
    from coalora.quant import DequantCache, quantize_model
    from coalora.quant.build import build_model_config
    from coalora.quant.model import model_weights

    weights = model_weights(model, names)
    numels = {n: w.numel() for n, w in weights.items()}
    cache_dir = Path(ctx.cache_dir) if ctx.cache_dir else None
    config = build_model_config(q, weights, numels, cache_dir, ctx.cfg.model.name)
    cache = DequantCache(limit_mb=q.cache_limit_mb)
    quantize_model(model, names, config, cache)
    return config, cache
