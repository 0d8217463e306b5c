"""NF-b codebooks and block-wise quantization with double quantization (algorithms.md §1)."""

from __future__ import annotations

import pytest
import torch

from coalora.quant import (
    NF4,
    QuantConfig,
    dequantize_nf,
    dequantize_nf_blockwise,
    fake_quantize,
    nf_codebook,
    quantization_errors,
    quantize_nf,
    quantize_nf_blockwise,
)
from coalora.quant.nf import _tables, nf_encode

CONFIGS = [
    NF4,
    QuantConfig(2, 2, "bf16", 64, 256),
    QuantConfig(3, 4, "fp16", 32, 64),
    QuantConfig(8, 8, "fp32", 16, 16),
]


def reference_fake_quantize(W: torch.Tensor, qc: QuantConfig) -> torch.Tensor:
    """algorithms.md §1.3 pseudo-code, literally (numel divisible by B0*B1)."""
    A3 = W.reshape(-1, qc.block1, qc.block0)
    s1 = A3.abs().amax(-1, keepdim=True)
    o = s1.min()
    s2 = (s1 - o).amax(1, keepdim=True).to(qc.dtype).float()
    m0 = 2**qc.bits0 - 1
    q1 = ((s1 - o) * (m0 / s2)).round().clamp(0, m0)
    s = q1 * s2 / m0 + o
    v = nf_codebook(qc.bits)
    mids = (v[1:] + v[:-1]) / 2
    code = torch.searchsorted(mids, (A3 / s).contiguous(), side="left")
    return (v[code] * s).reshape(W.shape)


@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_shape_and_exact_values(bits):
    v = nf_codebook(bits)
    half = 2 ** (bits - 1)
    assert v.dtype == torch.float32 and v.shape == (2**bits,)
    assert torch.all(v[1:] > v[:-1])
    assert v[half - 1] == 0.0 and v[-1] == 1.0
    assert (v < 0).sum() == half - 1 and (v > 0).sum() == half
    if bits > 1:
        assert v[0] == -1.0


def test_codebook_golden_values():
    assert nf_codebook(2).tolist() == pytest.approx([-1, 0, 0.3379, 1], abs=1e-4)
    nf3 = [-1, -0.4786, -0.2171, 0, 0.1609, 0.3379, 0.5626, 1]
    assert nf_codebook(3).tolist() == pytest.approx(nf3, abs=1e-4)
    nf8 = nf_codebook(8)
    assert nf8[nf8 > 0].min().item() == pytest.approx(0.00496, abs=1e-5)


def test_nf4_equals_bitsandbytes_table():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(nf_codebook(4), bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_encode_is_searchsorted_with_ties_to_lower(bits):
    mids = _tables(bits).mids
    up, down = torch.full_like(mids, 2.0), torch.full_like(mids, -2.0)
    special = torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0, float("inf"), -float("inf")])
    x = torch.cat(
        [torch.randn(5000) * 0.6, mids, mids.nextafter(up), mids.nextafter(down), special]
    )
    expected = torch.searchsorted(mids, x.clamp(-1, 1), side="left")
    assert torch.equal(nf_encode(x, bits).long(), expected)
    at_mid = nf_encode(mids, bits).long()  # an exact tie goes to the lower value
    assert torch.equal(at_mid, torch.arange(len(mids)))


@pytest.mark.parametrize("qc", CONFIGS, ids=lambda q: q.key)
def test_matches_reference_pseudocode(qc):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    fq = fake_quantize(W, qc)
    assert torch.equal(fq, reference_fake_quantize(W, qc))
    assert torch.equal(dequantize_nf(quantize_nf(W, qc)), fq)


def test_storage_form():
    W = torch.randn(32, 512, generator=torch.Generator().manual_seed(1))
    q = quantize_nf(W, NF4)
    G = W.numel() // (64 * 256)
    assert q.codes.shape == (G, 256, 64) and q.codes.dtype == torch.uint8
    assert q.q1.shape == (G, 256) and q.q1.dtype == torch.uint8 and int(q.q1.max()) <= 255
    assert q.s2.shape == (G,) and q.s2.dtype == torch.float32
    assert q.offset.shape == () and q.offset == W.reshape(-1, 64).abs().amax(-1).min()
    assert int(q.codes.max()) < 16
    q2 = quantize_nf(W, QuantConfig(2, 3, "bf16", 32, 16))
    assert q2.s2.dtype == torch.bfloat16 and int(q2.q1.max()) <= 7 and int(q2.codes.max()) < 4


def test_padding_keeps_offset_and_shape():
    g = torch.Generator().manual_seed(2)
    W = (torch.rand(7, 45, generator=g) + 0.5) * torch.sign(torch.randn(7, 45, generator=g))
    qc = QuantConfig(4, 8, "fp32", 16, 16)  # 315 weights -> 2 super-blocks of 256, 197 padded
    q = quantize_nf(W, qc)
    flat = W.reshape(-1)
    block_max = [
        flat[i : i + 16].abs().max() for i in range(0, flat.numel(), 16)
    ]  # real blocks only
    assert q.offset == min(block_max)
    assert q.offset >= 0.5  # zero padding never becomes the offset
    out = fake_quantize(W, qc)
    assert out.shape == W.shape and torch.equal(out, dequantize_nf(q))
    assert ((out - W).norm() / W.norm()) < 0.1


def test_error_decreases_with_bits():
    W = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    errs = [
        ((fake_quantize(W, QuantConfig(b, 8, "fp32", 64, 256)) - W).norm() / W.norm()).item()
        for b in (2, 3, 4, 8)
    ]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert 0.07 < errs[2] < 0.12  # NF4 on Gaussian weights


def test_zero_and_constant_blocks_never_nan():
    W = torch.zeros(4, 256 * 16)
    assert torch.equal(fake_quantize(W, NF4), W)
    W[0, :64] = 0.3  # one non-zero block; the offset is 0 and most super-blocks have s2 = 0
    out = fake_quantize(W, QuantConfig(3, 4, "bf16", 64, 16))
    assert torch.isfinite(out).all() and torch.equal(out[1:], W[1:])
    assert torch.allclose(out[0, :64], W[0, :64], atol=0.02)


def test_dtype_preserved_and_non_finite_rejected():
    W = torch.randn(16, 64)
    assert (
        fake_quantize(W.to(torch.bfloat16), QuantConfig(4, 8, "fp32", 16, 16)).dtype
        == torch.bfloat16
    )
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fake_quantize(W, QuantConfig(4, 8, "fp32", 16, 16))


@pytest.mark.gpu
def test_cuda_matches_cpu():  # pragma: no cover - CPU machines
    W = torch.randn(64, 256)
    assert torch.equal(fake_quantize(W.cuda(), NF4).cpu(), fake_quantize(W, NF4))


def test_quantization_errors_match_fake_quantize():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(48, 80, generator=g)
    F = torch.rand(48, 80, generator=g)
    errs = quantization_errors(W, CONFIGS[:3], F)
    for k, qc in enumerate(CONFIGS[:3]):
        expected = ((W - fake_quantize(W, qc)).square() * F).double().sum().item()
        assert errs[k].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shape", [(64, 128), (7, 33), (3, 64)])
def test_blockwise_codes_equal_bitsandbytes(shape):
    """Our NF4 without double quantization assigns bitsandbytes' codes; bnb packs two 4-bit
    codes per byte with the first code in the high nibble (checked through its dequantize)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(5)) * 0.05
    codes, absmax = quantize_nf_blockwise(W, bits=4, block0=64)
    packed, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed = packed.reshape(-1)
    bnb_codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: W.numel()]
    assert torch.equal(bnb_codes, codes)
    assert torch.equal(state.absmax, absmax)
    ours = dequantize_nf_blockwise(codes, absmax, tuple(W.shape))
    assert torch.allclose(ours, W, atol=0.2 * float(W.abs().max()))
    if W.numel() % 64 == 0:  # bnb's short-last-block dequantize path compiles (slow): skip it
        assert torch.equal(bnbf.dequantize_4bit(packed.unsqueeze(1), state), ours)
