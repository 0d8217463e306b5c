"""GGUF's K-types (Q2_K … Q6_K) and IQ4_XS: 256-weight super-blocks whose sub-block scales are
themselves quantized against one or two fp16 super-block constants (llama.cpp's k-quants;
docs/gguf.md). Block structs follow ggml-common.h (block_q2_K … block_q6_K, block_iq4_xs).

Encoding, per super-block: fit every sub-block's scale (and offset) in float32 with the shared
rules of ``coalora.quant.gguf_codecs`` (RTN, or the weighted search); quantize those scales to the
type's integer width against the fp16 super-block constant (with the search: then try ±1 on each
stored integer of each sub-block, keeping a step where the sub-block's error drops); then round
every weight to its level under the *stored* scale, so the codes are the nearest ones for what
llama.cpp will compute.
Decoding is the standard formula of each type, vectorised over super-blocks.

Element order inside a super-block (j runs over 32 bytes unless stated):
* 2-bit fields (Q2_K codes, Q3_K low bits): byte h·32 + j, bits 2s → weight h·128 + s·32 + j.
* 1-bit fields (Q3_K hmask, Q5_K qh): byte j, bit s → weight s·32 + j.
* 4-bit fields (Q4_K, Q5_K low bits): byte c·32 + j, nibble s → weight c·64 + s·32 + j.
* Q6_K: ql byte h·64 + j (j < 64), nibble s → weight h·128 + s·64 + j; qh byte h·32 + j, bits 2s
  → weight h·128 + s·32 + j.
* IQ4_XS: byte k·16 + j (j < 16), nibble s → weight k·32 + s·16 + j.
"""

from __future__ import annotations

import torch
from torch import Tensor

from coalora.quant.gguf_codecs import (
    Codec,
    exact,
    extreme,
    f16,
    f16_bytes,
    f16_read,
    fit_affine,
    fit_iq4,
    fit_sym,
    iq4_values,
    keep_best,
    pack,
    q_affine,
    q_iq4,
    q_sym,
    safe_inv,
    sse,
    unpack,
)


def _super_sym(s: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Signed sub-block scales s (nb, S) → fp16 d (nb, 1) and integers ls ∈ [lo, hi] with
    s ≈ d·ls; the sub-scale of largest magnitude lands exactly on ``lo``."""
    d = f16(extreme(s) / lo)
    return d, torch.round(s * safe_inv(d)).clamp_(lo, hi)


def _super_affine(d: Tensor, m: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sub-block scales d ≥ 0 and offsets m ≤ 0 (nb, S) → fp16 D, Dmin (nb, 1) and unsigned
    sc, mq ∈ [0, top] with d ≈ D·sc and -m ≈ Dmin·mq."""
    d, m = d.clamp(min=0.0), (-m).clamp(min=0.0)
    D, Dm = f16(d.amax(1, keepdim=True) / top), f16(m.amax(1, keepdim=True) / top)
    sc = torch.round(d * safe_inv(D)).clamp_(0, top)
    return D, Dm, sc, torch.round(m * safe_inv(Dm)).clamp_(0, top)


def _refine(Xs: Tensor, Ws: Tensor, ints: list[Tensor], lims, value) -> list[Tensor]:
    """Local search on a sub-block's stored integers (scale, and min): every ±1 step of each,
    kept where the sub-block's weighted error, with the weights re-rounded, drops.
    ``value(ints)`` → the sub-block's decoded weights (nb·S, sub); ints are (nb·S, 1) floats."""
    best = [sse(Ws, value(ints), Xs), *ints]
    steps = (
        [(a,) for a in (-1, 1)]
        if len(ints) == 1
        else [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    )
    for step in steps:
        cand = [(v + dv).clamp(lo, hi) for v, dv, (lo, hi) in zip(ints, step, lims)]
        keep_best(best, sse(Ws, value(cand), Xs), *cand)
    return best[1:]


def _affine_codes(X: Tensor, Wt: Tensor, sub: int, nmax: int, top: int, search: bool):
    """The affine K-types' shared encoder: (D, Dmin, sc, mq, codes (nb, 256) int32)."""
    nb, Xs, Ws = X.shape[0], X.view(-1, sub), Wt.view(-1, sub)
    d, m = fit_affine(Xs, Ws, nmax, search, exact, min_le_zero=True)
    D, Dm, sc, mq = _super_affine(d.view(nb, -1), m.view(nb, -1), top)
    Ds, Dms = D.expand_as(sc).reshape(-1, 1), Dm.expand_as(sc).reshape(-1, 1)

    def value(ints: list[Tensor]) -> Tensor:  # what the decoder computes
        de, me = Ds * ints[0], Dms * ints[1]
        return de * q_affine(Xs, de, -me, nmax) - me

    sc, mq = sc.reshape(-1, 1), mq.reshape(-1, 1)
    if search:
        sc, mq = _refine(Xs, Ws, [sc, mq], [(0, top), (0, top)], value)
    de, me = Ds * sc, Dms * mq
    q = q_affine(Xs, de, -me, nmax).view(nb, -1).to(torch.int32)
    return D, Dm, sc.view(nb, -1).to(torch.int32), mq.view(nb, -1).to(torch.int32), q


def _signed_codes(X: Tensor, Wt: Tensor, sub: int, lo: int, search: bool, fit, codes, levels):
    """The encoder of the K-types with signed sub-block scales (Q3_K, Q6_K, IQ4_XS):
    ``fit(Xs, Ws, search)`` → float sub-scales, ``codes(Xs, s)`` → each weight's level index,
    ``levels(q)`` → its value in scale units. Returns (d (nb, 1), ls (nb, S) int32, codes (nb, 256))."""
    nb, Xs, Ws = X.shape[0], X.view(-1, sub), Wt.view(-1, sub)
    d, ls = _super_sym(fit(Xs, Ws, search).view(nb, -1), lo, -lo - 1)
    ds = d.expand_as(ls).reshape(-1, 1)

    def value(ints: list[Tensor]) -> Tensor:  # what the decoder computes
        se = ds * ints[0]
        return se * levels(codes(Xs, se))

    ls = ls.reshape(-1, 1)
    if search:
        (ls,) = _refine(Xs, Ws, [ls], [(lo, -lo - 1)], value)
    q = codes(Xs, ds * ls).view(nb, -1)
    return d, ls.view(nb, -1).to(torch.int32), q


def _sym_codes(X: Tensor, Wt: Tensor, sub: int, qmin: int, qmax: int, lo: int, search: bool):
    """Q3_K and Q6_K: (d, ls, codes - qmin (nb, 256) int32)."""
    d, ls, q = _signed_codes(
        X,
        Wt,
        sub,
        lo,
        search,
        lambda Xs, Ws, search: fit_sym(Xs, Ws, qmin, qmax, search, exact),
        lambda Xs, s: q_sym(Xs, s, qmin, qmax),
        lambda q: q,
    )
    return d, ls, (q - qmin).to(torch.int32)


def _two_bit(u: Tensor) -> Tensor:
    return pack(u.reshape(-1, 2, 4, 32), 2).view(u.shape[0], 64)


def _from_two_bit(b: Tensor) -> Tensor:
    return unpack(b.reshape(-1, 2, 32), 2, 4).reshape(b.shape[0], 256)


def _one_bit(u: Tensor) -> Tensor:
    return pack(u.reshape(-1, 8, 32), 1)  # (nb, 32)


def _from_one_bit(b: Tensor) -> Tensor:
    return unpack(b, 1, 8).reshape(b.shape[0], 256)


def _nibbles(u: Tensor) -> Tensor:
    return pack(u.reshape(-1, 4, 2, 32), 4).view(u.shape[0], 128)


def _from_nibbles(b: Tensor) -> Tensor:
    return unpack(b.reshape(-1, 4, 32), 4, 2).reshape(b.shape[0], 256)


# ---- block_q2_K: scales[16] (low nibble scale, high nibble min) | qs[64] | d | dmin ----------


def _enc_q2_k(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
    D, Dm, sc, mq, q = _affine_codes(X, Wt, 16, 3, 15, search)
    return torch.cat([(sc | mq << 4).to(torch.uint8), _two_bit(q), f16_bytes(D), f16_bytes(Dm)], 1)


def _dec_q2_k(raw: Tensor) -> Tensor:
    nb, sc = raw.shape[0], raw[:, :16].to(torch.int32)
    dl = f16_read(raw, 80) * (sc & 15).float()  # (nb, 16)
    ml = f16_read(raw, 82) * (sc >> 4).float()
    q = _from_two_bit(raw[:, 16:80]).view(nb, 16, 16).float()
    return (dl[..., None] * q - ml[..., None]).view(nb, 256)


# ---- block_q3_K: hmask[32] | qs[64] | scales[12] (16 × 6-bit, biased by 32) | d ----------------


def _enc_q3_k(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
    d, ls, u = _sym_codes(X, Wt, 16, -4, 3, -32, search)  # u = q + 4 ∈ [0, 7]
    nb, uu = X.shape[0], ls + 32
    # scale k: low nibble in byte k % 8 (nibble k // 8), top two bits in byte 8 + k % 4, bits 2(k // 4)
    scales = torch.cat([pack((uu & 15).view(nb, 2, 8), 4), pack((uu >> 4).view(nb, 4, 4), 2)], 1)
    return torch.cat([_one_bit(u >> 2), _two_bit(u & 3), scales, f16_bytes(d)], 1)


def _dec_q3_k(raw: Tensor) -> Tensor:
    nb, sc = raw.shape[0], raw[:, 96:108]
    uu = unpack(sc[:, :8], 4, 2).reshape(nb, 16) | unpack(sc[:, 8:], 2, 4).reshape(nb, 16) << 4
    dl = f16_read(raw, 108) * (uu - 32).float()  # (nb, 16)
    q = _from_two_bit(raw[:, 32:96]) - 4 * (1 - _from_one_bit(raw[:, :32]))  # hmask 1: no offset
    return (dl[..., None] * q.view(nb, 16, 16).float()).view(nb, 256)


# ---- block_q4_K / block_q5_K: d | dmin | scales[12] (8 × 6-bit scale and min) | [qh[32]] | qs[128]


def _pack_scales(sc: Tensor, mq: Tensor) -> Tensor:
    """get_scale_min_k4's layout: bytes 0–3 and 4–7 hold scales/mins 0–3 and, in their top two
    bits, bits 4–5 of scales/mins 4–7; bytes 8–11 hold the low nibbles of scales/mins 4–7."""
    b0 = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    b1 = mq[:, :4] | (mq[:, 4:] >> 4) << 6
    return torch.cat([b0, b1, (sc[:, 4:] & 15) | (mq[:, 4:] & 15) << 4], 1).to(torch.uint8)


def _unpack_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    b = b.to(torch.int32)
    b0, b1, b2 = b[:, :4], b[:, 4:8], b[:, 8:]
    sc = torch.cat([b0 & 63, (b2 & 15) | (b0 >> 6) << 4], 1)
    return sc, torch.cat([b1 & 63, (b2 >> 4) | (b1 >> 6) << 4], 1)


def _enc_q45_k(nmax: int):
    def enc(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
        D, Dm, sc, mq, q = _affine_codes(X, Wt, 32, nmax, 63, search)
        high = [_one_bit(q >> 4)] if nmax == 31 else []
        return torch.cat(
            [f16_bytes(D), f16_bytes(Dm), _pack_scales(sc, mq), *high, _nibbles(q & 15)], 1
        )

    return enc


def _dec_q45_k(raw: Tensor) -> Tensor:
    nb = raw.shape[0]
    sc, m = _unpack_scales(raw[:, 4:16])
    dl = f16_read(raw, 0) * sc.float()  # (nb, 8)
    ml = f16_read(raw, 2) * m.float()
    q = _from_nibbles(raw[:, -128:])
    if raw.shape[1] == 176:  # Q5_K: bit 4 of every code in qh
        q = q | _from_one_bit(raw[:, 16:48]) << 4
    return (dl[..., None] * q.view(nb, 8, 32).float() - ml[..., None]).view(nb, 256)


# ---- block_q6_K: ql[128] | qh[64] | scales[16] (int8) | d -------------------------------------


def _enc_q6_k(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
    d, ls, u = _sym_codes(X, Wt, 16, -32, 31, -128, search)  # u = q + 32 ∈ [0, 63]
    nb = X.shape[0]
    ql = pack((u & 15).view(nb, 2, 2, 64), 4).view(nb, 128)
    qh = pack((u >> 4).view(nb, 2, 4, 32), 2).view(nb, 64)
    return torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), f16_bytes(d)], 1)


def _dec_q6_k(raw: Tensor) -> Tensor:
    nb = raw.shape[0]
    dl = f16_read(raw, 208) * raw[:, 192:208].contiguous().view(torch.int8).float()  # (nb, 16)
    lo = unpack(raw[:, :128].reshape(nb, 2, 64), 4, 2).reshape(nb, 256)
    hi = unpack(raw[:, 128:192].reshape(nb, 2, 32), 2, 4).reshape(nb, 256)
    q = ((lo | hi << 4) - 32).view(nb, 16, 16).float()
    return (dl[..., None] * q).view(nb, 256)


# ---- block_iq4_xs: d | scales_h (uint16: 2 bits per sub-block) | scales_l[4] (nibbles) | qs[128]


def _fit_iq4_sub(Xs: Tensor, Ws: Tensor, search: bool) -> Tensor:
    return fit_iq4(Xs, Ws, search, exact)


def _enc_iq4_xs(X: Tensor, Wt: Tensor, search: bool) -> Tensor:
    nb = X.shape[0]
    d, ls, q = _signed_codes(X, Wt, 32, -32, search, _fit_iq4_sub, q_iq4, iq4_values)
    uu = ls + 32
    high = pack((uu >> 4).view(nb, 2, 4).transpose(1, 2), 2)  # sub-block k at bits 2k
    low = pack((uu & 15).view(nb, 4, 2).transpose(1, 2), 4)  # byte k // 2, nibble k % 2
    return torch.cat([f16_bytes(d), high, low, pack(q.view(nb, 8, 2, 16), 4).view(nb, 128)], 1)


def _dec_iq4_xs(raw: Tensor) -> Tensor:
    nb = raw.shape[0]
    high = unpack(raw[:, 2:4], 2, 4).transpose(1, 2).reshape(nb, 8)
    low = unpack(raw[:, 4:8], 4, 2).transpose(1, 2).reshape(nb, 8)
    dl = f16_read(raw, 0) * ((low | high << 4) - 32).float()  # (nb, 8)
    q = unpack(raw[:, 8:].reshape(nb, 8, 16), 4, 2).reshape(nb, 8, 32)
    return (dl[..., None] * iq4_values(q)).view(nb, 256)


K_CODECS: dict[str, Codec] = {
    "Q2_K": (_enc_q2_k, _dec_q2_k),
    "Q3_K": (_enc_q3_k, _dec_q3_k),
    "Q4_K": (_enc_q45_k(15), _dec_q45_k),
    "Q5_K": (_enc_q45_k(31), _dec_q45_k),
    "Q6_K": (_enc_q6_k, _dec_q6_k),
    "IQ4_XS": (_enc_iq4_xs, _dec_iq4_xs),
}
