"""LoRA on a full-precision base (Hu et al. 2021). The reference point for every quantized method."""

from __future__ import annotations

from coalora.methods.base import Method


class LoRA(Method):
    name = "lora"
    quant_modes = ("none",)
