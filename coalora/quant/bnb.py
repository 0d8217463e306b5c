"""QLoRA's original kernel path: bitsandbytes ``Linear4bit`` NF4 with double quantization.

``quant=bnb_nf4`` (docs/quantization.md). bitsandbytes NF4 = blocks of 64, fp32 absmax compressed to 8-bit
blockwise (blocks of 256) with a mean offset — QLoRA's recipe, not LQ-LoRA's min offset
(QLoRA, arXiv 2305.14314 §3). Fast on CUDA; works on CPU, slowly.
bitsandbytes is imported lazily so the rest of ``coalora.quant`` never needs it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from coalora.quant.model import replace_module


def replace_with_bnb_nf4(
    model: nn.Module, names: Iterable[str], compute_dtype: torch.dtype = torch.float32
) -> dict[str, nn.Module]:
    """Replace each named ``nn.Linear`` by a frozen ``bnb.nn.Linear4bit`` (nf4, double quant)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a declared dependency
        raise ImportError("quant=bnb_nf4 needs bitsandbytes: pip install bitsandbytes") from e
    out: dict[str, nn.Module] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target module {name!r} is {type(module).__name__}, not nn.Linear")
        device = module.weight.device
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.detach().to("cpu", torch.float32),
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            blocksize=64,
            module=layer,
        )
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        layer = layer.to(device)  # Params4bit quantizes on its first move to a device
        replace_module(model, name, layer)
        out[name] = layer
    return out


__all__ = ["replace_with_bnb_nf4"]
