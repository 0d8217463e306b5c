"""Diagonal empirical Fisher of target weights, for Fisher-weighted allocation errors.

LQ-LoRA (arXiv 2311.12023 §3.4): F = Σ_n (∂L_n/∂W)², summed — not averaged — over
single-example batches, accumulated in float32. The per-example gradient is what makes this the
empirical Fisher: squaring the gradient of a batch mean would give a different (smaller, biased)
quantity, so every batch must hold exactly one example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn


def _batch_size(batch) -> int | None:
    """Leading dimension of the first tensor in ``batch`` (mapping / sequence / tensor), if any."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    items = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (list, tuple))
        else []
    )
    for item in items:
        if isinstance(item, Tensor) and item.dim():
            return item.shape[0]
    return None


def fisher_diagonal(
    model: nn.Module,
    names: Iterable[str],
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], Tensor],
) -> dict[str, Tensor]:
    """Σ over ``batches`` of (∂ loss_fn(model, batch) / ∂W)² for each target ``nn.Linear`` weight.

    Each batch must contain one example (checked when its first tensor has a batch dimension).
    The model runs in eval mode (no dropout); only the target weights get gradients, and the
    model's ``requires_grad`` flags and training mode are restored; ``.grad`` is not touched.
    Returns name → float32 tensor of the weight's shape, on the weight's device.
    """
    names = list(names)
    params: dict[str, nn.Parameter] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"{name!r} is {type(module).__name__}; Fisher needs the full-precision nn.Linear"
            )
        params[name] = module.weight
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    targets = set(params.values())
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(p in targets)  # no graph through frozen parameters
        count = 0
        with torch.enable_grad():
            for batch in batches:
                size = _batch_size(batch)
                if size is not None and size != 1:
                    raise ValueError(
                        f"fisher_diagonal needs single-example batches; got batch size {size}"
                    )
                loss = loss_fn(model, batch)
                grads_n = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (name, _), g in zip(params.items(), grads_n):
                    if g is not None:
                        fisher[name] += g.detach().float().square()
                count += 1
        if count == 0:
            raise ValueError("fisher_diagonal got no batches")
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return fisher


__all__ = ["fisher_diagonal"]
