"""Bit packing round-trips exactly and matches the storage formula (algorithms.md §1.4)."""

from __future__ import annotations

import pytest
import torch

from coalora.quant import (
    NF4,
    QuantConfig,
    dequantize_nf,
    pack_bits,
    pack_quantized,
    quantize_nf,
    unpack_bits,
    unpack_quantized,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    values = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), values)


def test_msb_first_layout():
    assert pack_bits(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [0x12, 0x34]
    # 3 bits: 1,2,3,4,5,6,7,0 -> 001 010 011 100 101 110 111 000
    vals = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_bits(vals, 3).tolist() == [0b00101001, 0b11001011, 0b10111000]


def test_four_bit_layout_equals_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from coalora.quant import quantize_nf_blockwise

    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    codes, _ = quantize_nf_blockwise(W, 4, 64)
    packed, _ = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(pack_bits(codes, 4), packed.reshape(-1))


def test_rejects_values_too_wide():
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits=9"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 9)


CONFIGS = [
    NF4,
    QuantConfig(3, 2, "bf16", 32, 64),
    QuantConfig(2, 3, "fp16", 16, 16),
    QuantConfig(8, 8, "fp32", 16, 256),
]


@pytest.mark.parametrize("qc", CONFIGS, ids=lambda q: q.key)
def test_quantized_round_trip_and_size(qc):
    W = torch.randn(
        64, 1024, generator=torch.Generator().manual_seed(1)
    )  # divisible by every B0*B1
    q = quantize_nf(W, qc)
    p = pack_quantized(q)
    assert p.s2.dtype == qc.dtype
    # storage formula, exactly: bits + bits0/B0 + w1/(B0*B1) per parameter
    assert 8 * p.payload_nbytes() == qc.storage_bits() * W.numel()
    assert p.nbytes() == p.payload_nbytes() + 4
    r = unpack_quantized(p)
    for name in ("codes", "q1", "s2", "offset"):
        assert torch.equal(getattr(r, name), getattr(q, name)), name
    assert r.shape == q.shape and r.qc == qc
    assert torch.equal(dequantize_nf(r), dequantize_nf(q))


def test_padded_size_within_last_superblock():
    qc = QuantConfig(3, 4, "fp16", 16, 16)
    W = torch.randn(5, 37, generator=torch.Generator().manual_seed(2))  # 185 weights, 1 super-block
    p = pack_quantized(quantize_nf(W, qc))
    padded = p.padded_numel
    assert padded == 256 and padded - W.numel() < qc.block0 * qc.block1
    assert 8 * p.payload_nbytes() == qc.storage_bits() * padded
    assert torch.equal(dequantize_nf(unpack_quantized(p)), dequantize_nf(quantize_nf(W, qc)))


@pytest.mark.parametrize("qc", CONFIGS, ids=lambda q: q.key)
def test_validate_accepts_the_layout_and_names_a_wrong_field(qc):
    from dataclasses import replace

    from coalora.errors import CoaloraError

    p = pack_quantized(quantize_nf(torch.randn(5, 300), qc))
    p.validate()  # what pack_quantized writes is the layout validate checks
    with pytest.raises(CoaloraError, match=r"entry x codes has shape \(\d+,\), expected"):
        replace(p, codes=p.codes[:-1]).validate("entry x")
    with pytest.raises(CoaloraError, match=r"for weight shape \(500, 300\)"):
        replace(p, shape=(500, 300)).validate()
    with pytest.raises(CoaloraError, match="wrong dtypes"):
        replace(p, s2=p.s2.to(torch.float64)).validate()
