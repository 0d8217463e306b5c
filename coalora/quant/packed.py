"""Packed storage: dequantize a ``PackedTensor`` on the fly, and the linear that does it.

A packed entry is what docs/packed.md calls the stored form of one (layer, option): bit-packed NF
codes, bit-packed first-level scales q1, second-level constants s2 in dtype1 and the fp32 offset
(QLoRA's double quantization, arXiv 2305.14314 §3, with LQ-LoRA's configuration tuple, arXiv
2311.12023 §3.2). Its size is the storage formula ``bits + bits0/B0 + w1/(B0*B1)`` bits per weight.

* ``dequantize_packed(p, dtype)``: the weight ``v[code] * (o + q1*s2/M0)`` in ``dtype``. The codes
  are decoded straight from the packed bytes through a look-up table (one table row per byte for
  1/2/4/8 bits, per 12-bit half of a 3-byte group for 3 bits), so decoding is one gather over the
  packed bytes; the float32 product is the same one ``fake_quantize`` computes, so the values are
  bit-identical to the dequantized storage. Plain torch ops: the same code on CPU and CUDA.
* ``packed_linear(x, p, bias)``: ``F.linear`` whose backward recomputes the weight from the
  packed entry instead of saving it (QLoRA §3: the frozen base is dequantized when needed), so no
  dequantized copy stays alive between forward and backward. Only the input (and a bias that
  requires grad) get gradients: the base is frozen.
* Model helpers: ``freeze_model`` quantizes a fixed set of configurations up front and drops (or
  moves to the CPU) the full-precision originals; ``resident_weight_bytes`` and
  ``formula_weight_bytes`` account a model's weight memory against the storage formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coalora.errors import ConfigError
from coalora.quant.config import ModelQuantConfig
from coalora.quant.nf import _dequant_scales, _tables, nf_decode
from coalora.quant.packing import PackedTensor, unpack_bits

STORAGES = ("packed", "dequantized")
KEEP_ORIGINAL = ("device", "cpu", "drop")

_LUTS: dict[tuple[int, str], Tensor] = {}


def check_storage(storage: str, key: str = "quant.storage") -> str:
    if storage not in STORAGES:
        raise ConfigError(f"{key}={storage!r} is not allowed; allowed: {list(STORAGES)}")
    return storage


def _lut(bits: int, device: torch.device) -> Tensor:
    """Decoded codebook values per packed index: (256, 8/bits) for 1/2/4/8 bits, (4096, 4) for 3.

    Row ``i`` holds the values of the codes stored in index ``i``, most significant first (the
    layout of ``pack_bits``).
    """
    key = (bits, str(device))
    if key not in _LUTS:
        values = _tables(bits).values  # (2^b,) float32 on the CPU
        width = 12 if bits == 3 else 8  # index bits: one byte, or half of a 3-byte group
        per = width // bits
        idx = torch.arange(2**width, dtype=torch.int64)[:, None]  # (2^width, 1)
        shifts = torch.arange(per - 1, -1, -1, dtype=torch.int64) * bits  # (per,)
        codes = (idx >> shifts) & ((1 << bits) - 1)  # (2^width, per)
        _LUTS[key] = values[codes].contiguous().to(device)
    return _LUTS[key]


def decode_packed_codes(codes: Tensor, bits: int, n: int) -> Tensor:
    """The codebook values of the first ``n`` codes packed in ``codes`` (uint8), float32 (n,)."""
    if bits in (1, 2, 4, 8) or bits == 3 and n % 8 == 0:
        lut = _lut(bits, codes.device)
        if bits == 3:
            g = codes[: n * 3 // 8].view(-1, 3).to(torch.int32)  # (m, 3) bytes of 8 codes
            word = (g[:, 0] << 16) | (g[:, 1] << 8) | g[:, 2]  # (m,) 24 bits
            idx = torch.stack([word >> 12, word & 0xFFF], dim=1).view(-1)  # (2m,) 12-bit halves
        else:
            idx = codes[: -(-n * bits // 8)].to(torch.int32)  # (m,)
        return torch.index_select(lut, 0, idx).view(-1)[:n]
    return nf_decode(unpack_bits(codes, bits, n), bits)  # 5-7 bits: not in the default grid


def dequantize_packed(p: PackedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dequantized weight of ``p`` in its original shape, ``dtype``, on ``p``'s device.

    Bit-identical to ``fake_quantize`` of the weight ``p`` was packed from (same float32 scales
    and products), cast to ``dtype`` last.
    """
    qc = p.qc
    G = p.s2.numel()
    n_pad = p.padded_numel
    q1 = unpack_bits(p.q1, qc.bits0, G * qc.block1).view(G, qc.block1)
    scales = _dequant_scales(q1, p.s2, p.offset, qc.bits0)  # (G, B1) float32
    values = decode_packed_codes(p.codes, qc.bits, n_pad).view(-1, qc.block0)  # (G*B1, B0)
    values = values.mul_(scales.view(-1, 1)).view(-1)
    n = p.numel
    w = (values if n == n_pad else values[:n]).view(p.shape)
    return w if dtype == torch.float32 else w.to(dtype)


class _PackedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W recomputed from the packed entry in backward (nothing dense saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, p: PackedTensor) -> Tensor:
        ctx.packed = p
        ctx.x_dtype = x.dtype
        return F.linear(x, dequantize_packed(p, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize_packed(ctx.packed, grad_out.dtype)  # (d_out, d_in)
            grad_x = grad_out.matmul(w).to(ctx.x_dtype)  # (..., d_in)
        if ctx.needs_input_grad[1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (d_out,)
        return grad_x, grad_b, None


def packed_linear(x: Tensor, p: PackedTensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, dequantize_packed(p, x.dtype), bias)``; the weight is freed after use."""
    needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _PackedLinear.apply(x, bias, p)
    return F.linear(x, dequantize_packed(p, x.dtype), bias)


def _quant_layers(model: nn.Module) -> dict:
    from coalora.quant.linear import QuantLinear  # linear.py imports this module: a cycle

    return {m.name: m for m in model.modules() if isinstance(m, QuantLinear)}


def freeze_model(
    model: nn.Module,
    configs: Iterable[ModelQuantConfig],
    keep_original: str = "drop",
    layers: Mapping | None = None,
) -> dict[str, int]:
    """Quantize every (layer, option) of ``configs`` now, pin it in its layer, and drop the
    full-precision original (``"drop"``), move it to the CPU (``"cpu"``) or keep it (``"device"``).

    Afterwards switching among ``configs`` never needs the original; a configuration outside them
    needs ``keep_original != "drop"``. Returns name → pinned bytes.
    """
    layers = _quant_layers(model) if layers is None else layers
    configs = list(configs)
    for config in configs:
        config.validate_names(layers)
    return {
        name: layer.freeze([c[name] for c in configs], keep_original=keep_original)
        for name, layer in layers.items()
    }


def own_frozen_weights(model: nn.Module) -> int:
    """Give every frozen parameter and buffer outside the ``QuantLinear`` layers its own memory.

    ``from_pretrained`` memory-maps a safetensors checkpoint: the loaded weights are views of one
    file mapping, so after :func:`freeze_model` drops the targets' originals the remaining views
    (embeddings, norms) keep the whole mapping alive, and with it the pages of the dropped
    weights that quantization read (measured on SmolLM2-135M: 540 MiB file-backed RSS before,
    125 MiB after; docs/packed.md). Copies them (tied weights once); returns the bytes copied."""
    from coalora.quant.linear import QuantLinear  # linear.py imports this module: a cycle

    seen: set[int] = set()
    copied = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            continue
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is None or id(t) in seen or t.requires_grad:
                    continue
                seen.add(id(t))
                if isinstance(t, nn.Parameter):
                    t.data = t.data.clone()
                else:
                    store[key] = t.clone()
                    seen.add(id(store[key]))
                copied += _nbytes(t)
    return copied


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds for its weights: ``quantized`` (the current configuration of every
    ``QuantLinear``: packed entry or dequantized tensor), ``original`` (full-precision originals
    still held), ``other`` (every other parameter and buffer, biases included), ``total``."""
    layers = _quant_layers(model)
    quantized = sum(layer.current_nbytes() for layer in layers.values())
    original = sum(layer.original_nbytes() for layer in layers.values())
    seen: set[int] = set()
    other = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith("weight_fp") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += _nbytes(t)
    return {
        "quantized": quantized,
        "original": original,
        "other": other,
        "total": quantized + original + other,
    }


def formula_weight_bytes(model: nn.Module, config: ModelQuantConfig) -> float:
    """The storage formula: average bits × target parameters / 8 + every non-target weight."""
    layers = _quant_layers(model)
    config.validate_names(layers)
    targets = config.total_bits() / 8
    return targets + resident_weight_bytes(model)["other"]


__all__ = [
    "own_frozen_weights",
    "KEEP_ORIGINAL",
    "STORAGES",
    "check_storage",
    "decode_packed_codes",
    "dequantize_packed",
    "formula_weight_bytes",
    "freeze_model",
    "packed_linear",
    "resident_weight_bytes",
]
