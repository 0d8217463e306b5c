"""Shared-LoRA baseline (CoA-LoRA, arXiv 2509.25214 §5): one LoRA + head trained while each step draws
configurations from the set; no configuration-aware adjustment."""

from __future__ import annotations

from coalora.methods.multiconfig import MultiConfigMethod


class SharedLoRA(MultiConfigMethod):
    name = "shared_lora"
