"""Adapters that wrap a frozen (quantized) base linear: LoRA, the CoA-LoRA mapper, QWHA."""

from coalora.adapters.inject import adapter_modules, inject
from coalora.adapters.lora import LoRALinear
from coalora.adapters.qwha import WHTAdapterLinear

__all__ = ["LoRALinear", "WHTAdapterLinear", "adapter_modules", "inject"]
