"""Adapters that wrap a frozen (quantized) base linear: LoRA, the CoA-LoRA mapper, QWHA.

Every adapter layer derives from :class:`coalora.adapters.base.AdapterLayer` (docs/architecture.md).
"""

from coalora.adapters.base import AdapterLayer
from coalora.adapters.inject import adapter_modules, inject, replace_module
from coalora.adapters.lora import LoRALinear
from coalora.adapters.qwha import WHTAdapterLinear

__all__ = [
    "AdapterLayer",
    "LoRALinear",
    "WHTAdapterLinear",
    "adapter_modules",
    "inject",
    "replace_module",
]
