"""LoRA (Hu et al., arXiv 2106.09685) wrapping a frozen base linear, with an optional r x r mixing.

``y = base(x) + s * ((drop(x) Aᵀ) Mᵀ) Bᵀ`` with ``s = alpha / r``; ``M = I`` for plain LoRA and
``M = I + γ U(c)`` for CoA-LoRA (arXiv 2509.25214, §3: ΔW_l = s · B_l (I + γ U(c_l)) A_l).
B starts at zero, so a fresh adapter reproduces the base output exactly.

The layer owns its mixing state. :meth:`mixing` applies M inside a ``with`` block (training and
evaluation of one configuration; the autograd graph keeps M, so the backward may run after the
block). :meth:`fold` stores ``B' = B M`` for one configuration (the zero-cost adaptation that is
exported as a plain LoRA) until :meth:`unfold`.

With an anchor ``B₀`` (:meth:`anchor_mixing`, CoA-LoRA's ``method.mapper.mix=learned`` over a
quantization-aware initialisation) M mixes only what training added to B:
``B_eff = B₀ + (B − B₀) M``, so the mapper does not rotate the low-rank part of the weights the
adapter starts from (docs/methods.md, "What the mapper mixes").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from coalora.adapters.base import AdapterLayer
from coalora.errors import ConfigError


class LoRALinear(AdapterLayer):
    """``base_layer`` (frozen ``nn.Linear``/``QuantLinear``/bnb ``Linear4bit``) plus a LoRA delta."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"method.rank={r!r} must be a positive integer")
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._mix: Tensor | None = None  # (r, r) inside a mixing() block
        self._folded_B: Tensor | None = None  # (d_out, r) = B M after fold()
        # (d_out, r) anchor B₀ of anchor_mixing(); not in the state dict: a restored run
        # recomputes it from the same initialisation
        self.register_buffer("lora_B0", None, persistent=False)

    @classmethod
    def from_weights(
        cls, base_layer: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float
    ) -> LoRALinear:
        """A frozen LoRA with trained ``lora_A`` (r, d_in), ``lora_B`` (d_out, r) and ``scaling``
        (an exported adapter, B already folded): the forward of training, nothing trainable."""
        r = int(lora_A.shape[0])
        with torch.device("meta"):  # A and B are given: no initialisation (and no RNG draw)
            layer = cls(base_layer, r, alpha=float(scaling) * r)
        d_out, d_in = layer.out_features, layer.in_features
        if tuple(lora_A.shape) != (r, d_in) or tuple(lora_B.shape) != (d_out, r):
            raise ValueError(
                f"LoRA A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} do not fit a "
                f"({d_out}, {d_in}) base"
            )
        layer.lora_A = nn.Parameter(lora_A, requires_grad=False)
        layer.lora_B = nn.Parameter(lora_B, requires_grad=False)
        layer.scaling = float(scaling)
        return layer

    # ---------------------------------------------------------------- mixing (CoA-LoRA)
    @contextmanager
    def mixing(self, mix: Tensor) -> Iterator[None]:
        """Apply the (r, r) matrix ``mix`` to the delta inside the block."""
        if tuple(mix.shape) != (self.r, self.r):
            raise ValueError(f"mixing matrix must be ({self.r}, {self.r}), got {tuple(mix.shape)}")
        if self._folded_B is not None:
            raise RuntimeError("unfold() the folded adapter before mixing another configuration")
        previous, self._mix = self._mix, mix
        try:
            yield
        finally:
            self._mix = previous

    @torch.no_grad()
    def anchor_mixing(self) -> None:
        """Fix ``B₀ = B`` (now): from here on a mixing M applies to ``B − B₀`` only."""
        self.lora_B0 = self.lora_B.detach().clone()

    def _mixed_B(self, mix: Tensor) -> Tensor:
        """B M, or B₀ + (B − B₀) M with an anchor (d_out, r)."""
        if self.lora_B0 is None:
            return self.lora_B @ mix
        return self.lora_B0 + (self.lora_B - self.lora_B0) @ mix

    @torch.no_grad()
    def fold(self, mix: Tensor | None) -> None:
        """Store ``B' = B M`` (plain LoRA behaviour with B'); ``None`` folds M = I."""
        self._folded_B = self.lora_B.detach().clone() if mix is None else self._mixed_B(mix)

    def unfold(self) -> None:
        self._folded_B = None

    @property
    def folded(self) -> bool:
        return self._folded_B is not None

    # ---------------------------------------------------------------- the delta
    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        if self._folded_B is not None:
            return F.linear(h, self._folded_B) * self.scaling  # (..., d_out)
        if self._mix is not None:
            if self.lora_B0 is not None:  # B₀ + (B − B₀) M: an (r, r) product on B, not on h
                return F.linear(h, self._mixed_B(self._mix)) * self.scaling
            h = F.linear(h, self._mix)  # (..., r): h Mᵀ
        return F.linear(h, self.lora_B) * self.scaling  # (..., d_out)

    def delta_weight(self) -> Tensor:
        """Dense s · B_eff A (B_eff = :meth:`effective_B`), shape (d_out, d_in)."""
        return self.scaling * self.effective_B() @ self.lora_A

    def effective_B(self) -> Tensor:
        """The B a plain LoRA would need to give this module's current delta: B M (d_out, r)."""
        if self._folded_B is not None:
            return self._folded_B
        return self.lora_B if self._mix is None else self._mixed_B(self._mix)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"
