"""QLoRA's original kernel path: bitsandbytes ``Linear4bit`` NF4 with double quantization.

``quant=bnb_nf4`` (docs/quantization.md). bitsandbytes NF4 = blocks of 64, fp32 absmax compressed to 8-bit
blockwise (blocks of 256) with a mean offset — QLoRA's recipe, not LQ-LoRA's min offset
(QLoRA, arXiv 2305.14314 §3). Fast on CUDA; works on CPU, slowly.

* ``replace_with_bnb_nf4``: swap target linears for bitsandbytes' own NF4 layers (training);
* ``bnb_linear4bit``: serve a packed entry (``coalora.quant.packing``) through ``Linear4bit``
  with the same values (``coalora.deploy.load(backend="bnb")``, docs/packed.md);
* ``compare_with_bnb_nf4``: how far coalora's NF4 is from bitsandbytes' (scripts/nf4_vs_bnb.py);
* ``bnb_cpu_status`` and ``bnb_weight_bytes``: whether ``Linear4bit`` runs on this CPU, and what
  a bitsandbytes model holds (scripts/bench_decoder_step.py).

bitsandbytes is imported lazily so the rest of ``coalora.quant`` never needs it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from coalora.errors import CoaloraError
from coalora.quant.config import NF4
from coalora.quant.model import replace_module
from coalora.quant.nf import (
    _dequant_scales,
    dequantize_nf,
    dequantize_nf_blockwise,
    nf_codebook,
    quantize_nf,
    quantize_nf_blockwise,
)
from coalora.quant.packing import PackedTensor, unpack_bits


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


def bnb_linear4bit(p: PackedTensor, bias: Tensor | None, compute_dtype=torch.float32) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (nf4, no nested statistics) holding exactly ``p``'s values.

    Needs bits=4 and block0=64: the NF4 codebook and the high-nibble-first byte layout are
    bitsandbytes', and its fp32 absmax per 64 weights is our dequantized first-level scale
    ``o + q1*s2/M0``, so ``dequantize_4bit`` gives ``dequantize_packed(p)`` bit for bit. The
    absmax costs 0.5 bit/weight instead of the double-quantized scales' ``bits0/64 + ...``.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    qc, n = p.qc, p.numel
    if qc.bits != 4 or qc.block0 != 64 or n % 64 or len(p.shape) != 2:
        raise CoaloraError(
            f"backend='bnb' needs bits=4, block0=64 and a 2-D weight with numel % 64 == 0; "
            f"got {qc.key} for shape {tuple(p.shape)}"
        )
    G = p.s2.numel()
    q1 = unpack_bits(p.q1, qc.bits0, G * qc.block1).view(G, qc.block1)
    absmax = _dequant_scales(q1, p.s2, p.offset, qc.bits0).reshape(-1)[: n // 64].contiguous()
    state = QuantState(
        absmax=absmax,
        shape=torch.Size(p.shape),
        code=nf_codebook(4),
        blocksize=64,
        quant_type="nf4",
        dtype=compute_dtype,
    )
    d_out, d_in = p.shape
    layer = bnb.nn.Linear4bit(
        d_in,
        d_out,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type="nf4",
        device="meta",
    )
    data = p.codes[: n // 2].reshape(-1, 1).contiguous()  # (n/2, 1) uint8, bitsandbytes' shape
    weight = bnb.nn.Params4bit.from_prequantized(
        data, state.as_dict(packed=True), device=data.device, module=layer
    )
    layer.weight = weight
    layer.quant_state = weight.quant_state
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def compare_with_bnb_nf4(W: Tensor) -> dict[str, float]:
    """Max |difference| between the dequantized NF4 weights of coalora and bitsandbytes, with and
    without double quantization, and the mean |error| of each to ``W`` (blocks of 64).

    The codes and the fp32 absmax agree (``plain_vs_plain`` is 0); the second levels differ:
    LQ-LoRA's min offset and linear codes (arXiv 2311.12023) vs QLoRA's mean offset and
    dynamic-tree codes (arXiv 2305.14314 §3), hence ``ours_vs_bnb_dq``.
    """
    import bitsandbytes.functional as BF

    ours = dequantize_nf(quantize_nf(W, NF4))
    ours_plain = dequantize_nf_blockwise(*quantize_nf_blockwise(W, 4, 64), W.shape, 4, 64)
    q, state = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_dq = BF.dequantize_4bit(q, state, quant_type="nf4")
    q, state = BF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    bnb_plain = BF.dequantize_4bit(q, state, quant_type="nf4")

    def mx(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max())

    return {
        "ours_vs_bnb_dq": mx(ours, bnb_dq),
        "plain_vs_plain": mx(ours_plain, bnb_plain),
        "bnb_dq_vs_plain": mx(bnb_dq, bnb_plain),
        "ours_dq_vs_plain": mx(ours, ours_plain),
        "mean_err_ours": float((ours - W).abs().mean()),
        "mean_err_bnb": float((bnb_dq - W).abs().mean()),
    }


def bnb_cpu_status() -> str | None:
    """None when ``bitsandbytes.nn.Linear4bit`` (nf4) runs forward + backward on this CPU, else
    why not."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(
            torch.randn(64, 128), requires_grad=False, quant_type="nf4", module=layer
        )
        layer = layer.to("cpu")
        x = torch.randn(2, 128, requires_grad=True)
        layer(x).sum().backward()
        if not torch.isfinite(x.grad).all():
            return "bitsandbytes Linear4bit gave a non-finite gradient on CPU"
    except Exception as e:  # noqa: BLE001 - any failure means: cannot run here
        return f"bitsandbytes Linear4bit does not run on this CPU: {type(e).__name__}: {e}"
    return None


def bnb_weight_bytes(model: nn.Module) -> dict[str, int]:
    """What a bitsandbytes model holds: ``quantized`` (Linear4bit codes + quantization state:
    absmax, its second-level state and codebooks) and ``other`` (every other parameter and
    buffer), in the keys of ``coalora.quant.model.resident_weight_bytes``."""
    import bitsandbytes as bnb

    seen: set[int] = set()

    def nbytes(t) -> int:  # each storage once (a codebook may be shared by layers)
        if not isinstance(t, torch.Tensor) or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    def state_bytes(qs) -> int:
        if qs is None:
            return 0
        n = sum(nbytes(getattr(qs, k, None)) for k in ("absmax", "code", "offset"))
        return n + state_bytes(getattr(qs, "state2", None))

    quantized, other = 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            quantized += nbytes(m.weight) + state_bytes(getattr(m.weight, "quant_state", None))
    for _, t in [*model.named_parameters(), *model.named_buffers()]:
        other += nbytes(t)
    return {"quantized": quantized, "original": 0, "other": other, "total": quantized + other}


__all__ = [
    "bnb_cpu_status",
    "bnb_linear4bit",
    "bnb_weight_bytes",
    "compare_with_bnb_nf4",
    "replace_with_bnb_nf4",
]
