"""NormalFloat-b block-wise quantization with double quantization (QLoRA arXiv 2305.14314
§3; LQ-LoRA arXiv 2311.12023 §3.2; docs/quantization.md).

* ``nf_codebook(bits)``: the NF-b codebook (docs/quantization.md) (2^b sorted values, exact -1, 0 and +1; NF4 is
  bit-identical to bitsandbytes' table).
* ``quantize_nf`` / ``dequantize_nf`` / ``fake_quantize``: as docs/quantization.md describes. The weight is flattened
  row-major and viewed as ``(G, B1, B0)``; first-level absmax scales ``s1``; one scalar offset
  ``o = min(s1)``; second-level scales ``s2 = max_k (s1 - o)`` per super-block, rounded through
  ``dtype1``; ``q1 = clamp(round_half_even((s1 - o) * (M0 / s2)), 0, M0)`` with ``M0 = 2^b0 - 1``;
  the weights are encoded with the *dequantized* scales ``ŝ1 = q1 * s2 / M0 + o``, nearest value,
  exact ties to the lower code.
* ``quantize_nf_blockwise``: the plain path without double quantization (fp32 absmax per block of
  ``block0``), the same code assignment as bitsandbytes' ``quantize_4bit``.

Deviations, all for inputs the reference rejects:
* numel not divisible by ``B0*B1``: the flat tensor is zero-padded to whole super-blocks and cropped
  on dequantization. The offset ``o`` is the minimum over the first-level blocks that hold real
  weights, so padding never changes it (the zero padding blocks get ``q1 = 0``).
* super-blocks whose shifted scales are all ≤ 2^-24 (``s2 ≤ eps``) get ``q1 = 0`` (ŝ1 = o), like
  pytorch_quantization's zero-amax rule; a zero dequantized scale encodes every weight of its block
  to a code that decodes to 0 (never NaN).
* fp16/bf16 weights are upcast to fp32 (the reference raises); results come back in W's dtype.

Encoding uses a look-up table on a power-of-two grid finer than the smallest gap between decision
boundaries: ``code = count[floor(x*S)] + (x > next_mid[floor(x*S)])``. ``x*S`` and ``floor`` are
exact in float32, so this equals ``searchsorted(mids, x, side='left')`` bit for bit, ~10x faster on
CPU than ``torch.bucketize``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from coalora.quant.config import QuantConfig

OFFSET = 0.9677083  # bitsandbytes' NF4 constant (docs/quantization.md)
S2_EPS = (
    2.0**-24
)  # pytorch_quantization's zero-amax threshold (the edge case of an all-equal super-block)
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class _NFTables:
    values: Tensor  # (2^b,) float32 codebook
    mids: Tensor  # (2^b - 1,) float32 decision boundaries
    count: Tensor  # (2S + 1,) uint8: number of mids < i/S for grid cell i - S
    next_mid: Tensor  # (2S + 1,) float32: first mid >= the cell's left edge (+inf if none)
    scale: int  # S, a power of two


_TABLES: dict[tuple[int, str], _NFTables] = {}


def _codebook_cpu(bits: int) -> Tensor:
    """The codebook following bitsandbytes' recipe, so NF4 is bit-identical to its table.

    float32 probabilities, Φ⁻¹ in float64, one rounding to float32, then a float32 division by the
    largest value (Φ⁻¹(OFFSET)): the same values as N(0, σ²).icdf with σ = 1/Φ⁻¹(OFFSET).
    """
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(OFFSET, 0.5, half + 1)[:-1].double())  # (2^(b-1),)
    neg = -torch.special.ndtri(torch.linspace(OFFSET, 0.5, half)[:-1].double())  # (2^(b-1) - 1,)
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return v / v.max()  # exact -1 (b ≥ 2), 0 and +1


def _tables(bits: int, device: torch.device | str | None = None) -> _NFTables:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not allowed; allowed: 1..8")
    device = torch.device(device if device is not None else "cpu")
    key = (bits, str(device))
    if key not in _TABLES:
        values = _codebook_cpu(bits)
        mids = (values[1:] + values[:-1]) / 2  # float32, as bitsandbytes computes them
        gap = (mids[1:].double() - mids[:-1].double()).min().item() if len(mids) > 1 else 1.0
        scale = 2 ** (math.floor(math.log2(1.0 / gap)) + 2)  # 1/S < gap/2: ≤ 1 mid per cell
        edges = torch.arange(-scale, scale + 1, dtype=torch.float64).div(scale).float()  # exact
        count = torch.searchsorted(mids, edges, side="left")  # (2S+1,)
        next_mid = torch.cat([mids, torch.tensor([math.inf])])[count]
        _TABLES[key] = _NFTables(
            values.to(device),
            mids.to(device),
            count.to(torch.uint8).to(device),
            next_mid.to(device),
            scale,
        )
    return _TABLES[key]


def nf_codebook(bits: int, device: torch.device | str | None = None) -> Tensor:
    """The NF-``bits`` codebook, sorted, float32, shape ``(2**bits,)`` (docs/quantization.md)."""
    return _tables(bits, device).values.clone()


def nf_encode(x: Tensor, bits: int) -> Tensor:
    """Nearest NF code of normalised values ``x`` (ties to the lower code), uint8, same shape.

    Equal to ``searchsorted(mids, x, side='left')``; values beyond ±1 clamp to the end codes.
    """
    t = _tables(bits, x.device)
    xc = x.reshape(-1).clamp(-1.0, 1.0)  # (n,)
    cell = (xc * t.scale).floor_().to(torch.int32).add_(t.scale)  # (n,) in [0, 2S]
    code = torch.index_select(t.count, 0, cell)
    code += xc > torch.index_select(t.next_mid, 0, cell)
    return code.view(x.shape)


def nf_decode(codes: Tensor, bits: int) -> Tensor:
    """Codebook values of uint8 ``codes``, float32, same shape."""
    t = _tables(bits, codes.device)
    return torch.index_select(t.values, 0, codes.reshape(-1).to(torch.int32)).view(codes.shape)


@dataclass
class QuantizedTensor:
    """A weight in its stored form (docs/quantization.md). Padded to whole super-blocks (see module docstring)."""

    codes: Tensor  # (G, B1, B0) uint8 NF codes
    q1: Tensor  # (G, B1) uint8 first-level scales, unsigned bits0-bit
    s2: Tensor  # (G,) second-level scales in dtype1
    offset: Tensor  # () float32 scalar offset o
    shape: tuple[int, ...]  # original weight shape
    qc: QuantConfig

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _blocks(W: Tensor, block0: int, block1: int) -> tuple[Tensor, int]:
    """Flatten row-major to float32, zero-pad to whole super-blocks: ((G, B1, B0), numel)."""
    if not W.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {W.dtype}")
    n = W.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = W.detach().reshape(-1).to(torch.float32)
    pad = -n % (block0 * block1)
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block1, block0), n


def _absmax(A3: Tensor) -> Tensor:
    """max |A3| over the last dim without a full-size |A| temporary: (..., B0) -> (...)."""
    lo, hi = torch.aminmax(A3, dim=-1)
    return torch.maximum(hi, lo.neg_())


def _dequant_scales(q1: Tensor, s2: Tensor, offset: Tensor, bits0: int) -> Tensor:
    """ŝ1 = q1 * s2 / M0 + o, float32 (G, B1). The single formula used to encode and decode."""
    m0 = float(2**bits0 - 1)
    return q1.to(torch.float32) * s2.to(torch.float32)[:, None] / m0 + offset


def _double_quantize(
    s1: Tensor, n_real: int, qc: QuantConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Double quantization of the first-level scales s1 (G, B1) -> (q1 uint8, s2 dtype1, o, ŝ1 float32)."""
    if not bool(torch.isfinite(s1).all()):
        raise ValueError("weight has non-finite values (inf/NaN); cannot quantize")
    offset = s1.reshape(-1)[:n_real].min()  # () over blocks holding real weights only
    shifted = s1 - offset  # (G, B1); padding blocks are < 0 and clamp to q1 = 0
    s2 = shifted.amax(dim=1).to(qc.dtype)  # (G,) rounded through dtype1
    s2f = s2.to(torch.float32)
    if not bool(torch.isfinite(s2f).all()):
        raise ValueError(f"second-level scale overflows dtype1={qc.dtype1}; use fp32")
    m0 = float(2**qc.bits0 - 1)
    ok = s2f > S2_EPS  # (G,)
    inv = m0 / torch.where(ok, s2f, torch.ones_like(s2f))  # pytorch_quantization: scale = M0/amax
    q1 = (shifted * inv[:, None]).round_().clamp_(0.0, m0)
    q1 = torch.where(ok[:, None], q1, torch.zeros_like(q1)).to(torch.uint8)
    return q1, s2, offset, _dequant_scales(q1, s2f, offset, qc.bits0)


_CHUNK = 1 << 16  # elements per CPU chunk: temporaries stay in cache and off the page-fault path


def _nf_rows(
    A2: Tensor,
    scales: Tensor,
    bits: int,
    codes_out: Tensor | None = None,
    deq_out: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor | None:
    """Encode rows A2 (R, B0) under per-row scales (R,) with the nearest-value rule (ties to the lower code), chunk by chunk.

    Writes codes (R, B0) uint8 into ``codes_out`` and/or v[code]*scale into ``deq_out``; with
    ``weight`` (R, B0) or ``weight=True`` (all ones) returns Σ weight ⊙ (A2 - v[code]*scale)² as a
    float64 0-d tensor. Reusing small buffers avoids allocating several full-size temporaries,
    which on CPU costs more (page faults) than the arithmetic.
    """
    t = _tables(bits, A2.device)
    R, B0 = A2.shape
    rows = max(1, _CHUNK // B0) if A2.device.type == "cpu" else R
    m = min(rows, R)
    x, tmp = A2.new_empty(m, B0), A2.new_empty(m, B0)
    cell = torch.empty(m, B0, dtype=torch.int32, device=A2.device)
    code = torch.empty(m, B0, dtype=torch.uint8, device=A2.device)
    above = torch.empty(m, B0, dtype=torch.bool, device=A2.device)
    safe = scales.clamp_min(_TINY)[:, None]  # a zero scale decodes to 0 whatever the code
    total = torch.zeros((), dtype=torch.float64, device=A2.device) if weight is not None else None
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        k = r1 - r0
        xk, tk, ck, gk = x[:k], tmp[:k], cell[:k], above[:k]
        torch.div(A2[r0:r1], safe[r0:r1], out=xk).clamp_(-1.0, 1.0)  # (k, B0)
        torch.mul(xk, t.scale, out=tk).floor_()
        ck.copy_(tk).add_(t.scale)  # grid cell in [0, 2S]; exact integers
        cd = codes_out[r0:r1] if codes_out is not None else code[:k]
        torch.index_select(t.count, 0, ck.view(-1), out=cd.view(-1))
        torch.index_select(t.next_mid, 0, ck.view(-1), out=tk.view(-1))
        cd += torch.gt(xk, tk, out=gk)
        if deq_out is None and total is None:
            continue
        ck.copy_(cd)
        dq = deq_out[r0:r1] if deq_out is not None else tk
        torch.index_select(t.values, 0, ck.view(-1), out=dq.view(-1))
        dq.mul_(scales[r0:r1, None])
        if total is not None:
            torch.sub(A2[r0:r1], dq, out=tk).square_()
            if weight is not True:
                tk.mul_(weight[r0:r1])
            total += tk.sum(dtype=torch.float64)
    return total


def quantize_nf(W: Tensor, qc: QuantConfig) -> QuantizedTensor:
    """NF-b + double quantization of ``W`` (any shape, row-major), docs/quantization.md."""
    A3, n = _blocks(W, qc.block0, qc.block1)  # (G, B1, B0)
    q1, s2, offset, scales = _double_quantize(_absmax(A3), -(-n // qc.block0), qc)
    codes = torch.empty(A3.shape, dtype=torch.uint8, device=A3.device)
    _nf_rows(A3.view(-1, qc.block0), scales.view(-1), qc.bits, codes_out=codes.view(-1, qc.block0))
    return QuantizedTensor(codes, q1, s2, offset, tuple(W.shape), qc)


def dequantize_nf(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """â = v[code] * (o + q1 * s2 / M0), cropped to the original shape."""
    scales = _dequant_scales(q.q1, q.s2, q.offset, q.qc.bits0)  # (G, B1)
    out = nf_decode(q.codes, q.qc.bits) * scales[..., None]  # (G, B1, B0)
    return out.reshape(-1)[: q.numel].view(q.shape).to(dtype)


def fake_quantize(W: Tensor, qc: QuantConfig) -> Tensor:
    """Quantize-dequantize ``W`` with ``qc``; same shape, dtype and device as ``W``.

    A GGUF option (``coalora.quant.gguf_space.GGUFOption``) quantizes through its own codec.
    """
    if not isinstance(qc, QuantConfig):
        return qc.fake_quantize(W)
    A3, n = _blocks(W, qc.block0, qc.block1)  # (G, B1, B0)
    *_, scales = _double_quantize(_absmax(A3), -(-n // qc.block0), qc)
    out = torch.empty(A3.shape, dtype=torch.float32, device=A3.device)
    _nf_rows(A3.view(-1, qc.block0), scales.view(-1), qc.bits, deq_out=out.view(-1, qc.block0))
    flat = out.view(-1) if out.numel() == n else out.view(-1)[:n].clone()  # drop padding storage
    return flat.view(W.shape).to(W.dtype)


def quantization_errors(
    W: Tensor, options: list[QuantConfig], weight: Tensor | None = None
) -> Tensor:
    """Σ weight ⊙ (W - fake_quantize(W, qc))² for every option, float64 (K,) on the CPU.

    Options sharing (block0, block1, bits0, dtype1) share the scale computation; nothing of the
    weight's size is allocated per option. ``weight`` (W's shape, e.g. a diagonal Fisher)
    defaults to 1. Zero padding contributes exactly 0.
    """
    out = torch.empty(len(options), dtype=torch.float64)
    groups: dict[tuple, list[int]] = {}
    for k, qc in enumerate(options):
        groups.setdefault((qc.block0, qc.block1, qc.bits0, qc.dtype1), []).append(k)
    shaped: dict[tuple[int, int], tuple] = {}
    for (b0, b1, _, _), ks in groups.items():
        if (b0, b1) not in shaped:
            A3, n = _blocks(W, b0, b1)
            Wt = True if weight is None else _blocks(weight, b0, b1)[0].view(-1, b0)
            shaped[(b0, b1)] = (A3, n, _absmax(A3), Wt)
        A3, n, s1, Wt = shaped[(b0, b1)]
        *_, scales = _double_quantize(s1, -(-n // b0), options[ks[0]])
        for k in ks:
            err = _nf_rows(A3.view(-1, b0), scales.view(-1), options[k].bits, weight=Wt)
            out[k] = err.item()
    return out


def quantize_nf_blockwise(W: Tensor, bits: int = 4, block0: int = 64) -> tuple[Tensor, Tensor]:
    """Plain NF without double quantization: fp32 absmax per ``block0`` consecutive weights.

    Returns (codes uint8 (numel,), absmax float32 (ceil(numel/block0),)). A short last block is
    zero-padded (zeros never change an absmax), as bitsandbytes does.
    """
    A3, n = _blocks(W, block0, 1)  # (nb, 1, B0)
    absmax = _absmax(A3).view(-1)  # (nb,)
    codes = torch.empty(A3.numel(), dtype=torch.uint8, device=A3.device)
    _nf_rows(A3.view(-1, block0), absmax, bits, codes_out=codes.view(-1, block0))
    return codes[:n], absmax


def dequantize_nf_blockwise(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], bits: int = 4, block0: int = 64
) -> Tensor:
    n = math.prod(shape)
    vals = F.pad(nf_decode(codes.reshape(-1), bits), (0, -n % block0)).view(-1, block0)
    return (vals * absmax.reshape(-1, 1)).reshape(-1)[:n].view(shape)


__all__ = [
    "QuantizedTensor",
    "dequantize_nf",
    "dequantize_nf_blockwise",
    "fake_quantize",
    "nf_codebook",
    "nf_decode",
    "nf_encode",
    "quantization_errors",
    "quantize_nf",
    "quantize_nf_blockwise",
]
