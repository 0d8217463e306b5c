"""The block codecs of GGUF's 32-weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) and the
machinery every GGUF codec shares: fp16 fields, bit packing and the scale fits (docs/gguf.md).
Block structs follow ggml-common.h (block_q4_0 …); multi-byte fields are little-endian, as GGUF
stores them (torch views use the host's order: every platform torch ships for is little-endian).

A codec is ``(encode_blocks, decode_blocks)``: ``encode_blocks(X, Wt, search)`` maps blocks
X (nb, block) float32 with importances Wt (nb, block) to bytes (nb, type_size) uint8;
``decode_blocks(raw)`` maps them back by the type's standard formula, in the same float32
operation order as gguf-py's ``dequantize`` (so the results are equal bit for bit).

Scale rules (``fit_*``): RTN is the type's standard choice (the largest-magnitude weight lands on
the end level, or the block's range spans the levels). The search tries a small grid of scales
(or ranges), refits each by weighted least squares for the codes it gives (the idea of
llama.cpp's make_qx_quants / make_qkx2_quants, our own grid), rounds it to what the block stores,
re-rounds the weights and keeps the candidate of least weighted squared error per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Codec = tuple[Callable[[Tensor, Tensor, bool], Tensor], Callable[[Tensor], Tensor]]

# kvalues_iq4nl (ggml-common.h): the 16 non-uniform levels of IQ4_NL and IQ4_XS, in scale units.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# ---- helpers shared by every codec -------------------------------------------------------------


def f16(x: Tensor) -> Tensor:
    """``x`` rounded to fp16 (what a ggml_half field holds), back in float32."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).float()


def f16_bytes(x: Tensor) -> Tensor:
    """(nb, 1) float32 → (nb, 2) uint8: the fp16 value, little-endian."""
    return x.clamp(-65504.0, 65504.0).to(torch.float16).reshape(-1, 1).view(torch.uint8)


def f16_read(raw: Tensor, at: int) -> Tensor:
    """The ggml_half at byte ``at`` of each block: (nb, type_size) uint8 → (nb, 1) float32."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).float()


def pack(fields: Tensor, width: int) -> Tensor:
    """(..., k, n) integer fields of ``width`` bits → (..., n) uint8 with field i at bit width·i."""
    shifts = torch.arange(fields.shape[-2], device=fields.device, dtype=torch.int32) * width
    return (fields.to(torch.int32) << shifts[:, None]).sum(-2).to(torch.uint8)


def unpack(b: Tensor, width: int, k: int) -> Tensor:
    """(..., n) uint8 → (..., k, n) int32: field i is bits [width·i, width·(i+1)) of each byte."""
    shifts = torch.arange(k, device=b.device, dtype=torch.int32) * width
    return (b.to(torch.int32).unsqueeze(-2) >> shifts[:, None]) & ((1 << width) - 1)


def exact(x: Tensor) -> Tensor:
    """The ``store`` of a scale kept in float32 until a later step quantizes it (K sub-blocks)."""
    return x


def safe_inv(s: Tensor) -> Tensor:
    return torch.where(s != 0, 1.0 / s, torch.zeros_like(s))


def extreme(X: Tensor) -> Tensor:
    """The signed value of largest magnitude of each row: (nb, n) → (nb, 1)."""
    return X.gather(1, X.abs().argmax(1, keepdim=True))


def q_sym(X: Tensor, s: Tensor, qmin: int, qmax: int) -> Tensor:
    """Nearest integer level of X / s in [qmin, qmax] (value = s·q)."""
    return torch.round(X * safe_inv(s)).clamp_(qmin, qmax)


def q_affine(X: Tensor, d: Tensor, m: Tensor, nmax: int) -> Tensor:
    """Nearest level of (X - m) / d in [0, nmax] (value = d·q + m)."""
    return torch.round((X - m) * safe_inv(d)).clamp_(0, nmax)


def iq4_values(q: Tensor) -> Tensor:
    """IQ4 level of each index ``q`` (any integer dtype), float32, same shape."""
    return torch.index_select(_iq4_tables(q.device)[0], 0, q.reshape(-1).to(torch.int32)).view(
        q.shape
    )


def q_iq4(X: Tensor, s: Tensor) -> Tensor:
    """Index of the IQ4 level nearest to X / s (value = s·IQ4_LEVELS[q]; ties to the lower one).

    Every midpoint between two integer levels is a multiple of 1/2, so ``ceil(2·X/s)`` (exact in
    float32) picks a cell holding no midpoint and a look-up table gives the count of midpoints
    below: the same index as ``bucketize`` over the midpoints, several times faster on CPU.
    """
    lut = _iq4_tables(X.device)[1]
    cell = torch.ceil(X * safe_inv(s) * 2).clamp_(-_IQ4_SPAN, _IQ4_SPAN).to(torch.int32)
    return torch.index_select(lut, 0, cell.view(-1) + _IQ4_SPAN).view(X.shape)


_IQ4_SPAN = 300  # |2·level| < 300 for every IQ4 level; beyond it the end levels are nearest
_IQ4_TABLES: dict[str, tuple[Tensor, Tensor]] = {}


def _iq4_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """(levels (16,) float32, lut (2·SPAN + 1,) int32: number of doubled midpoints < cell)."""
    if str(device) not in _IQ4_TABLES:
        levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32)
        mids2 = levels[1:] + levels[:-1]  # doubled midpoints, integers
        cells = torch.arange(-_IQ4_SPAN, _IQ4_SPAN + 1, dtype=torch.float32)
        lut = (mids2[None, :] < cells[:, None]).sum(1).to(torch.int32)
        _IQ4_TABLES[str(device)] = (levels.to(device), lut.to(device))
    return _IQ4_TABLES[str(device)]


def sse(Wt: Tensor, Xhat: Tensor, X: Tensor) -> Tensor:
    return (Wt * (Xhat - X).square()).sum(1, keepdim=True)  # (nb, 1)


def keep_best(best: list[Tensor], err: Tensor, *vals: Tensor) -> None:
    """In place: rows where ``err`` beats best[0] take ``err`` and ``vals``."""
    take = err < best[0]
    for i, v in enumerate((err, *vals)):
        best[i] = torch.where(take, v, best[i])


# Candidate ratios tried by the search: the extreme weight lands on (ratio × the end level); with a
# least-squares refit of the scale for every candidate (like llama.cpp's make_qx_quants, our grid).
_RATIOS = (0.75, 0.8, 0.85, 0.9, 0.93, 0.96, 1.0, 1.03, 1.06, 1.1)
_SHIFTS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)  # range / (nmax + shift)


def fit_sym(X: Tensor, Wt: Tensor, qmin: int, qmax: int, search: bool, store=f16) -> Tensor:
    """Scale s (nb, 1) for value = s·q, q ∈ [qmin, qmax]. RTN: the extreme weight lands exactly on
    qmin (Q4_0's d = max / -8). ``store`` rounds a scale to what the block can hold."""
    mx = extreme(X)
    s = store(mx / qmin)
    if not search:
        return s
    best = [sse(Wt, s * q_sym(X, s, qmin, qmax), X), s]
    for end in (qmin, qmax):
        for r in _RATIOS:
            q = q_sym(X, store(mx / (end * r)), qmin, qmax)
            den = (Wt * q * q).sum(1, keepdim=True)
            s = store((Wt * X * q).sum(1, keepdim=True) * safe_inv(den))  # least-squares scale
            keep_best(best, sse(Wt, s * q_sym(X, s, qmin, qmax), X), s)
    return best[1]


def fit_affine(
    X: Tensor, Wt: Tensor, nmax: int, search: bool, store=f16, min_le_zero: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale d and offset m (nb, 1) for value = d·q + m, q ∈ [0, nmax]. RTN: d = (max - min)/nmax,
    m = min (Q4_1's rule). ``min_le_zero``: the K-types store -m as an unsigned multiple of dmin."""
    lo, hi = X.amin(1, keepdim=True), X.amax(1, keepdim=True)
    if min_le_zero:
        lo = lo.clamp(max=0.0)
    d, m = store((hi - lo) / nmax), store(lo)
    if not search:
        return d, m
    best = [sse(Wt, d * q_affine(X, d, m, nmax) + m, X), d, m]
    sw = Wt.sum(1, keepdim=True)
    swx = (Wt * X).sum(1, keepdim=True)
    for shift in _SHIFTS:
        d0 = (hi - lo) / (nmax + shift)
        q = q_affine(X, d0, lo, nmax)
        # Weighted least-squares (d, m) for these codes; a singular system keeps (d0, lo).
        sq, sqq, sxq = ((Wt * q).sum(1, True), (Wt * q * q).sum(1, True), (Wt * X * q).sum(1, True))
        det = sw * sqq - sq * sq
        ok = det > 1e-12 * (sw * sqq).clamp(min=1e-30)
        d1 = torch.where(ok, (sw * sxq - sq * swx) * safe_inv(det), d0)
        m1 = torch.where(ok, (sqq * swx - sq * sxq) * safe_inv(det), lo)
        if min_le_zero:  # refit d alone with m = 0 where the joint fit wants a positive offset
            d1 = torch.where(m1 > 0, sxq * safe_inv(sqq), d1)
            m1 = m1.clamp(max=0.0)
        d1, m1 = store(d1), store(m1)
        keep_best(best, sse(Wt, d1 * q_affine(X, d1, m1, nmax) + m1, X), d1, m1)
    return best[1], best[2]


def fit_iq4(X: Tensor, Wt: Tensor, search: bool, store=f16) -> Tensor:
    """Scale s (nb, 1) for value = s·IQ4_LEVELS[q] (IQ4_NL's codebook). RTN: the extreme weight
    lands exactly on the lowest level, -127."""
    mx = extreme(X)
    s = store(mx / IQ4_LEVELS[0])
    if not search:
        return s
    best = [sse(Wt, s * iq4_values(q_iq4(X, s)), X), s]
    for end in (IQ4_LEVELS[0], IQ4_LEVELS[-1]):
        for r in _RATIOS:
            v = iq4_values(q_iq4(X, store(mx / (end * r))))
            s = store((Wt * X * v).sum(1, True) * safe_inv((Wt * v * v).sum(1, True)))
            keep_best(best, sse(Wt, s * iq4_values(q_iq4(X, s)), X), s)
    return best[1]


# ---- the 32-weight types (block_q4_0, block_q4_1, block_q5_0, block_q5_1, block_q8_0, block_iq4_nl)
# A 4-bit block stores weight j in the low nibble of byte j and weight j+16 in its high nibble; the
# 5-bit types add a 32-bit little-endian word whose bit j is bit 4 of weight j.


def _nibbles(q: Tensor) -> Tensor:
    return pack(q.view(-1, 2, 16), 4)  # (nb, 16)


def _from_nibbles(b: Tensor) -> Tensor:
    return unpack(b, 4, 2).reshape(-1, 32)  # (nb, 32)


def _high_bits(q: Tensor) -> Tensor:
    return pack((q >> 4).view(-1, 4, 8).transpose(1, 2), 1)  # (nb, 4): byte b, bit i = weight 8b+i


def _from_high_bits(b: Tensor) -> Tensor:
    return unpack(b, 1, 8).transpose(1, 2).reshape(-1, 32)  # (nb, 32)


def _enc_sym(qmin: int, qmax: int):
    def enc(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
        s = fit_sym(X, Wt, qmin, qmax, search)
        q = q_sym(X, s, qmin, qmax)  # (nb, 32)
        if qmax == 127:  # Q8_0: int8 codes
            return torch.cat([f16_bytes(s), q.to(torch.int8).view(torch.uint8)], 1)
        u = (q - qmin).to(torch.int32)  # stored unsigned
        high = [_high_bits(u)] if qmax == 15 else []
        return torch.cat([f16_bytes(s), *high, _nibbles(u & 15)], 1)

    return enc


def _dec_sym(qmin: int, qmax: int):
    def dec(raw: Tensor) -> Tensor:
        d = f16_read(raw, 0)
        if qmax == 127:
            return raw[:, 2:].contiguous().view(torch.int8).float() * d
        u = _from_nibbles(raw[:, -16:])
        if qmax == 15:
            u = u | (_from_high_bits(raw[:, 2:6]) << 4)
        return d * (u + qmin).float()

    return dec


def _enc_affine(nmax: int):
    def enc(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
        d, m = fit_affine(X, Wt, nmax, search)
        u = q_affine(X, d, m, nmax).to(torch.int32)
        high = [_high_bits(u)] if nmax == 31 else []
        return torch.cat([f16_bytes(d), f16_bytes(m), *high, _nibbles(u & 15)], 1)

    return enc


def _dec_affine(nmax: int):
    def dec(raw: Tensor) -> Tensor:
        d, m = f16_read(raw, 0), f16_read(raw, 2)
        u = _from_nibbles(raw[:, -16:])
        if nmax == 31:
            u = u | (_from_high_bits(raw[:, 4:8]) << 4)
        return d * u.float() + m

    return dec


def _enc_iq4_nl(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
    s = fit_iq4(X, Wt, search)
    return torch.cat([f16_bytes(s), _nibbles(q_iq4(X, s))], 1)


def _dec_iq4_nl(raw: Tensor) -> Tensor:
    return f16_read(raw, 0) * iq4_values(_from_nibbles(raw[:, 2:]))


CODECS: dict[str, Codec] = {
    "Q4_0": (_enc_sym(-8, 7), _dec_sym(-8, 7)),
    "Q5_0": (_enc_sym(-16, 15), _dec_sym(-16, 15)),
    "Q8_0": (_enc_sym(-127, 127), _dec_sym(-127, 127)),  # ±127 like ggml, never -128
    "Q4_1": (_enc_affine(15), _dec_affine(15)),
    "Q5_1": (_enc_affine(31), _dec_affine(31)),
    "IQ4_NL": (_enc_iq4_nl, _dec_iq4_nl),
}
