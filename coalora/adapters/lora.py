"""LoRA (Hu et al. 2021) wrapping a frozen base linear, with an optional r x r mixing matrix.

``y = base(x) + s * ((drop(x) A^T) M^T) B^T`` with ``s = alpha / r``; ``M = I`` for plain LoRA and
``M = I + gamma * U(c)`` for CoA-LoRA (arXiv 2509.25214, Eq. for the configuration-aware adapter).
B starts at zero, so a fresh adapter reproduces the base output exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LoRALinear(nn.Module):
    """``base_layer`` (frozen ``nn.Linear``/``QuantLinear``/bnb ``Linear4bit``) plus a LoRA delta."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"method.rank must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mix: torch.Tensor | None = None  # (r, r), set per configuration by CoA-LoRA
        # (d_out, r): B M folded for one configuration (zero-cost adaptation); overrides B and mix
        self.folded_B: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        if self.folded_B is not None:
            return F.linear(h, self.folded_B) * self.scaling  # (..., d_out)
        if self.mix is not None:
            h = F.linear(h, self.mix)  # (..., r): h M^T
        return F.linear(h, self.lora_B) * self.scaling  # (..., d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)

    def delta_weight(self) -> torch.Tensor:
        """Dense s * B M A, shape (d_out, d_in) — what a merge/export adds to the base weight."""
        return self.scaling * self.effective_B() @ self.lora_A

    def effective_B(self) -> torch.Tensor:
        """The B a plain LoRA would need to give this module's current delta: B M (d_out, r)."""
        if self.folded_B is not None:
            return self.folded_B
        return self.lora_B if self.mix is None else self.lora_B @ self.mix

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"
