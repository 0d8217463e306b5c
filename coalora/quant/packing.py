"""The packed storage format of a quantized weight, and the compute that reads it (docs/packed.md).

A packed entry is the stored form of one (layer, option): bit-packed NF codes, bit-packed
first-level scales q1, second-level constants s2 in dtype1 and the fp32 offset (QLoRA's double
quantization, arXiv 2305.14314 §3, with LQ-LoRA's configuration tuple, arXiv 2311.12023 §3.2). Its
size is the storage formula ``bits + bits0/B0 + w1/(B0*B1)`` bits per weight.

* Layout: a big-endian bit stream. Every group of 8 b-bit values becomes b bytes, most significant
  bit first, so for b = 4 the first value of a pair is the high nibble (bitsandbytes' layout) and
  for b = 8 packing is the identity. A final partial group is zero-padded. ``pack_quantized``
  packs the codes (b bits), the first-level scales q1 (b0 bits), keeps s2 in dtype1 and the fp32
  offset: ``8 * payload_nbytes == bits*P + b0*P/B0 + w1*P/(B0*B1)`` where P is the padded element
  count (whole super-blocks), i.e. the formula up to the last super-block's padding and byte
  rounding. ``PackedTensor.validate`` checks a stored entry against that layout.
* ``dequantize_packed(p, dtype)``: the weight ``v[code] * (o + q1*s2/M0)`` in ``dtype``. The codes
  are decoded straight from the packed bytes through a look-up table (one table row per byte for
  1/2/4/8 bits, per 12-bit half of a 3-byte group for 3 bits), so decoding is one gather over the
  packed bytes; the float32 product is the same one ``fake_quantize`` computes, so the values are
  bit-identical to the dequantized storage. Plain torch ops: the same code on CPU and CUDA.
* ``packed_linear(x, p, bias)``: ``F.linear`` whose backward recomputes the weight from the
  packed entry instead of saving it (QLoRA §3: the frozen base is dequantized when needed), so no
  dequantized copy stays alive between forward and backward. Only the input (and a bias that
  requires grad) get gradients: the base is frozen.
* ``STORAGES``: what a ``DequantCache`` keeps per option, this format or the dense dequantized
  weight (``quant.storage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from coalora.errors import CoaloraError, ConfigError
from coalora.quant.config import GGUFOption, LayerOption, QuantConfig
from coalora.quant.gguf_space import GGUFPacked
from coalora.quant.nf import QuantizedTensor, _dequant_scales, _tables, nf_decode, quantize_nf

STORAGES = ("packed", "dequantized")


def check_storage(storage: str, key: str = "quant.storage") -> str:
    if storage not in STORAGES:
        raise ConfigError(f"{key}={storage!r} is not allowed; allowed: {list(STORAGES)}")
    return storage


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not allowed; allowed: 1..8")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``values`` (any shape, each < 2**bits) into ceil(n*bits/8) bytes, uint8 (m,)."""
    _check_bits(bits)
    flat = values.reshape(-1)
    if flat.dtype != torch.uint8:
        raise TypeError(f"expected uint8 values, got {flat.dtype}")
    n = flat.numel()
    nbytes = -(-n * bits // 8)
    if bits == 8:
        return flat.clone()
    if n and int(flat.max()) >= 1 << bits:
        raise ValueError(f"value {int(flat.max())} does not fit in {bits} bits")
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte, plain uint8 shifts
        per = 8 // bits
        groups = torch.nn.functional.pad(flat, (0, -n % per)).view(-1, per)  # (m, per)
        packed = groups[:, 0] << (8 - bits)
        for j in range(1, per):
            packed |= groups[:, j] << (8 - bits * (j + 1))
        return packed
    word = torch.int32 if bits <= 3 else torch.int64  # 8 values = 8*bits bits per word
    groups = torch.nn.functional.pad(flat, (0, -n % 8)).view(-1, 8).to(word)  # (m, 8)
    shifts = torch.arange(7, -1, -1, device=flat.device, dtype=word) * bits  # value j at bits*(7-j)
    words = (groups << shifts).sum(dim=1, dtype=word)  # (m,)
    byte_shifts = torch.arange(bits - 1, -1, -1, device=flat.device, dtype=word) * 8
    packed = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8)  # (m, bits)
    return packed.reshape(-1)[:nbytes]


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``n`` b-bit values as uint8 (n,)."""
    _check_bits(bits)
    flat = packed.reshape(-1)
    need = -(-n * bits // 8)
    if flat.numel() < need:
        raise ValueError(
            f"{flat.numel()} bytes cannot hold {n} values of {bits} bits ({need} needed)"
        )
    if bits == 8:
        return flat[:n].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = [8 - bits * (j + 1) for j in range(per)]
        values = torch.stack([(flat[:need] >> sh) & mask for sh in shifts], dim=1)  # (need, per)
        return values.reshape(-1)[:n]
    word = torch.int32 if bits <= 3 else torch.int64
    m = -(-n // 8)
    groups = torch.nn.functional.pad(flat[:need], (0, m * bits - need)).view(m, bits).to(word)
    byte_shifts = torch.arange(bits - 1, -1, -1, device=flat.device, dtype=word) * 8
    words = (groups << byte_shifts).sum(dim=1, dtype=word)  # (m,)
    shifts = torch.arange(7, -1, -1, device=flat.device, dtype=word) * bits
    values = ((words[:, None] >> shifts) & mask).to(torch.uint8)  # (m, 8)
    return values.reshape(-1)[:n]


@dataclass
class PackedTensor:
    """A ``QuantizedTensor`` in its storage form."""

    FIELDS = ("codes", "q1", "s2", "offset")  # the stored tensors, in file order

    codes: Tensor  # uint8 (ceil(P*bits/8),), P = padded element count
    q1: Tensor  # uint8 (ceil(G*B1*bits0/8),)
    s2: Tensor  # dtype1 (G,)
    offset: Tensor  # float32 ()
    shape: tuple[int, ...]
    qc: QuantConfig

    @property
    def padded_numel(self) -> int:
        return self.s2.numel() * self.qc.block0 * self.qc.block1

    def payload_nbytes(self) -> int:
        """Bytes of codes + q1 + s2 (what the storage formula counts; excludes offset and shape)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.q1, self.s2))

    def nbytes(self) -> int:
        return self.payload_nbytes() + 4  # + the fp32 offset

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> PackedTensor:
        """The same entry on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.codes.device == device:
            return self
        moved = {k: getattr(self, k).to(device) for k in self.FIELDS}
        return PackedTensor(**moved, shape=self.shape, qc=self.qc)

    def validate(self, what: str = "packed entry") -> None:
        """Raise ``CoaloraError`` (naming ``what``) unless every field has the shape and dtype the
        layout above gives for ``shape`` under ``qc`` (e.g. an entry read back from a file)."""
        qc = self.qc
        G = -(-self.numel // (qc.block0 * qc.block1))  # super-blocks
        want = {
            "codes": (-(-G * qc.block0 * qc.block1 * qc.bits // 8),),
            "q1": (-(-G * qc.block1 * qc.bits0 // 8),),
            "s2": (G,),
            "offset": (),
        }
        for field, shape in want.items():
            got = tuple(getattr(self, field).shape)
            if got != shape:
                raise CoaloraError(
                    f"{what} {field} has shape {got}, expected {shape} for weight shape "
                    f"{tuple(self.shape)} under {qc.key}"
                )
        if self.s2.dtype != qc.dtype or self.codes.dtype != torch.uint8:
            raise CoaloraError(f"{what} has the wrong dtypes")

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Tensors for safetensors; ``shape`` and ``qc.key`` go into the file's metadata."""
        return {f"{prefix}{k}": getattr(self, k).contiguous() for k in self.FIELDS}


def pack_quantized(q: QuantizedTensor) -> PackedTensor:
    qc = q.qc
    return PackedTensor(
        codes=pack_bits(q.codes, qc.bits),
        q1=pack_bits(q.q1, qc.bits0),
        s2=q.s2.to(qc.dtype).clone(),
        offset=q.offset.to(torch.float32).clone(),
        shape=tuple(q.shape),
        qc=qc,
    )


def unpack_quantized(p: PackedTensor) -> QuantizedTensor:
    qc = p.qc
    G = p.s2.numel()
    n_codes = G * qc.block1 * qc.block0
    if math.prod(p.shape) > n_codes:
        raise ValueError(f"shape {p.shape} holds more than the {n_codes} packed codes")
    codes = unpack_bits(p.codes, qc.bits, n_codes).view(G, qc.block1, qc.block0)
    q1 = unpack_bits(p.q1, qc.bits0, G * qc.block1).view(G, qc.block1)
    return QuantizedTensor(codes, q1, p.s2.clone(), p.offset.clone(), tuple(p.shape), qc)


_LUTS: dict[tuple[int, str], Tensor] = {}


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
    and products), cast to ``dtype`` last. A GGUF entry (``coalora.quant.gguf_space.GGUFPacked``)
    decodes its blocks.
    """
    if not isinstance(p, PackedTensor):
        return p.dequantize(dtype)
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


def pack_option(W: Tensor, qc: LayerOption) -> PackedTensor | GGUFPacked:
    """The packed entry of ``W`` under ``qc``: NF codes + scales, or a GGUF type's blocks."""
    if isinstance(qc, GGUFOption):
        return qc.pack(W)
    return pack_quantized(quantize_nf(W, qc))


def entry_from_fields(
    fields: dict[str, Tensor], shape: tuple[int, ...], qc: LayerOption
) -> PackedTensor | GGUFPacked:
    """An entry from its stored tensors (``entry_fields(qc)``), e.g. read back from a file."""
    cls = GGUFPacked if isinstance(qc, GGUFOption) else PackedTensor
    return cls(**fields, shape=tuple(shape), qc=qc)


def entry_fields(qc: LayerOption) -> tuple[str, ...]:
    """The tensors an entry of ``qc`` stores, in file order."""
    return GGUFPacked.FIELDS if isinstance(qc, GGUFOption) else PackedTensor.FIELDS


def packed_linear(x: Tensor, p: PackedTensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, dequantize_packed(p, x.dtype), bias)``; the weight is freed after use."""
    needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return _PackedLinear.apply(x, bias, p)
    return F.linear(x, dequantize_packed(p, x.dtype), bias)


__all__ = [
    "STORAGES",
    "PackedTensor",
    "check_storage",
    "decode_packed_codes",
    "dequantize_packed",
    "entry_fields",
    "entry_from_fields",
    "pack_option",
    "pack_bits",
    "pack_quantized",
    "packed_linear",
    "unpack_bits",
    "unpack_quantized",
]
