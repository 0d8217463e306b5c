"""Glue between the ``quant=`` config group and the quantization engine: build the base
configuration (uniform / budget allocation / file) and quantize the target linears in place."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from coalora.errors import CoaloraError, ConfigError


def calibration_fisher(
    model: nn.Module, names: list[str], ctx, n_examples: int
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the target weights from ``n_examples`` single-example
    training batches (LQ-LoRA §3.4; the task loss with the model's fresh head)."""
    from coalora.quant import fisher_diagonal

    if ctx.datamodule is None:
        raise ConfigError("quant.fisher=true needs the task data for calibration batches")
    batches = ctx.datamodule.calibration_batches(n_examples, seed=int(ctx.cfg.seed), batch_size=1)
    return fisher_diagonal(model, names, batches, lambda m, b: m(**b).loss)


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
    fisher = None
    if q.mode == "budget" and q.get("fisher"):
        fisher = calibration_fisher(model, names, ctx, int(q.get("fisher_examples", 64)))
    cache_dir = str(ctx.cache_dir) if ctx.cache_dir else None
    try:
        if q.mode == "budget" and fisher is None and isinstance(q.budget, (int, float)):
            # the data-free allocation, shared (cached) with every method's evaluation set
            from coalora.methods.pool import allocations
            from coalora.quant import QuantSpace

            b = float(q.budget)
            config = allocations(
                weights,
                [b],
                QuantSpace.from_cfg(q.space),
                Path(cache_dir) if cache_dir else None,
                ctx.cfg.model.name,
                q.solver,
            )[b]
        else:
            config = build_model_config(q, weights, numels, cache_dir, ctx.cfg.model.name, fisher)
    except CoaloraError:
        raise
    except ValueError as e:  # e.g. an unreachable budget: name the key, keep the message
        raise ConfigError(f"quant: {e}") from None
    cache = DequantCache(limit_mb=q.cache_limit_mb)
    quantize_model(model, names, config, cache)
    return config, cache
