"""The adapter-layer contract every adapter here follows (docs/architecture.md, "Adapters").

An adapter layer wraps a frozen base linear and adds a trainable delta: ``y = base(x) + Δ(x)``
with ``Δ`` linear in ``x``, so ``Δ(x) = x ΔWᵀ`` for a dense ``ΔW = delta_weight()``. The base
(``nn.Linear``, ``QuantLinear`` or bitsandbytes' ``Linear4bit``) stays at ``base_layer``;
``get_base_layer()`` unwraps nested adapters. The delta runs in the adapter's own dtype: the input
is cast to it and the delta back to the base output's dtype (so an fp32 adapter on a bf16 base
keeps fp32 adapter math, as PEFT does). ``merge()`` adds ``ΔW`` into a base that has a writable
weight and ``unmerge()`` takes it out again; while merged the forward is the base alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AdapterLayer(nn.Module):
    """Base class: ``base_layer`` + ``delta(x)``; subclasses define the delta and its weight."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.merged = False

    # ---------------------------------------------------------------- what subclasses define
    def delta(self, x: Tensor) -> Tensor:
        """``Δ(x)`` (..., d_out) for ``x`` (..., d_in) already in the adapter dtype."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """Dense ``ΔW`` (d_out, d_in): what a merge or an export adds to the base weight."""
        raise NotImplementedError

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of this adapter, by attribute name."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared behaviour
    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(iter(self.adapter_parameters().values())).dtype

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.delta(x.to(self.adapter_dtype)).to(y.dtype)

    def _base_weight(self) -> nn.Parameter:
        w = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(w, nn.Parameter) or w.is_meta or not w.dtype.is_floating_point:
            raise TypeError(
                f"merge needs a base with a floating-point weight parameter (nn.Linear); "
                f"{type(self.get_base_layer()).__name__} has none: export format=merged instead"
            )
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``ΔW`` into the base weight; the forward is then the base alone."""
        if self.merged:
            return
        w = self._base_weight()
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the ``ΔW`` added by :meth:`merge` (the adapter must not have changed since)."""
        if not self.merged:
            return
        w = self._base_weight()
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False
