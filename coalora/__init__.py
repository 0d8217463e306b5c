"""coalora: fine-tune quantized transformers with adapters that serve many quantization configurations.

The headline method is CoA-LoRA (configuration-aware LoRA, arXiv 2509.25214); baselines are QLoRA,
Shared-LoRA, LQ-LoRA and QWHA. See README.md and docs/architecture.md.
"""

from __future__ import annotations

__version__ = "0.1.0"


def adapt(model, configuration):
    """Switch ``model`` to ``configuration`` and fold the configuration-aware adjustment.

    Zero-cost adaptation of a CoA-LoRA model (DESIGN §4); see :func:`coalora.methods.coalora.adapt`.
    """
    from coalora.methods.coalora import adapt as _adapt

    return _adapt(model, configuration)
