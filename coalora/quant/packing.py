"""Bit packing of quantized weights, so stored size equals the storage formula (docs/packed.md).

Layout: a big-endian bit stream. Every group of 8 b-bit values becomes b bytes, most significant
bit first, so for b = 4 the first value of a pair is the high nibble (bitsandbytes' layout) and for
b = 8 packing is the identity. A final partial group is zero-padded. ``pack_quantized`` packs the
codes (b bits), the first-level scales q1 (b0 bits), keeps s2 in dtype1 and the fp32 offset:
``8 * payload_nbytes == bits*P + b0*P/B0 + w1*P/(B0*B1)`` where P is the padded element count
(whole super-blocks), i.e. the formula up to the last super-block's padding and byte rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from coalora.quant.config import QuantConfig
from coalora.quant.nf import QuantizedTensor


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
        moved = {k: getattr(self, k).to(device) for k in ("codes", "q1", "s2", "offset")}
        return PackedTensor(**moved, shape=self.shape, qc=self.qc)

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Tensors for safetensors; ``shape`` and ``qc.key`` go into the file's metadata."""
        return {
            f"{prefix}{k}": getattr(self, k).contiguous() for k in ("codes", "q1", "s2", "offset")
        }


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


__all__ = ["PackedTensor", "pack_bits", "pack_quantized", "unpack_bits", "unpack_quantized"]
