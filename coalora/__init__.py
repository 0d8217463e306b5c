"""coalora: fine-tune quantized transformers with adapters that serve many quantization configurations.

The headline method is CoA-LoRA (configuration-aware LoRA, arXiv 2509.25214); baselines are QLoRA,
Shared-LoRA, LQ-LoRA and QWHA. See README.md and docs/architecture.md.
"""

from __future__ import annotations

__version__ = "0.1.0"


def adapt(holder, configuration):
    """Put a trained run into ``configuration``: switch the quantized base and fold any
    configuration-aware adjustment (CoA-LoRA: one mapper call + B' = B (I + γU), milliseconds).

    ``holder`` is the LightningModule returned by :func:`coalora.stages.restore.restore` (anything
    with ``.model`` and ``.method``). Returns the adapted transformers model. A method trained on
    one configuration accepts only that configuration.
    """
    return holder.method.adapt(holder.model, configuration)
