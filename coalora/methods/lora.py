"""LoRA on a full-precision base (Hu et al., arXiv 2106.09685). The reference point for every quantized method."""

from __future__ import annotations

from coalora.methods.base import Method


class LoRA(Method):
    name = "lora"
    quant_modes = ("none",)
    export_formats = ("peft", "merged")  # a full-precision base: nothing to pack
