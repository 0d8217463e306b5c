"""QLoRA (Dettmers et al., arXiv 2305.14314): LoRA on a frozen quantized base, trained and evaluated on one
configuration — uniform NF4 with double quantization (``quant=nf4``), a budget's allocation
(``quant=budget``), a configuration file (``quant=file``) or bitsandbytes' kernel (``quant=bnb_nf4``)."""

from __future__ import annotations

from coalora.methods.base import Method


class QLoRA(Method):
    name = "qlora"
    quant_modes = ("nf4", "uniform", "budget", "file", "bnb_nf4")
