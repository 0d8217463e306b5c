"""GGUF tensor types (llama.cpp's ggml block formats) as quantization options, with our own torch
codecs (docs/gguf.md; repository issue #22).

* ``GGUF_TYPES``: the registry of the supported types, each a ``GGUFType`` with its ggml type id,
  block size, bytes per block and exact bits per weight (scales included).
* ``allowed`` / ``check_row``: the row-length rule (a row must hold whole blocks: 32 weights for
  Q4_0 … Q8_0 and IQ4_NL, 256 for the K-types and IQ4_XS).
* ``encode``: a weight (out, in) to bytes in exactly the GGUF block layout of the type (what
  ``gguf.quants.dequantize`` and llama.cpp read). Scales: the type's standard round-to-nearest rule,
  then (``search=True``) a small per-block search of the scale (and offset) minimising the block's
  squared error, optionally weighted by a per-weight importance (e.g. the diagonal Fisher); per block
  the better of the two is kept, so the search never loses to plain RTN.
* ``decode``: bytes to float32 by the type's standard formula, vectorised over blocks, bit for bit
  equal to gguf-py's ``dequantize`` (tests/quant/test_gguf_types.py).
* ``fake_quantize_gguf`` = decode(encode(W)); ``gguf_errors``: Σ weight ⊙ (W - Ŵ)² per type, the
  numbers an error table holds.

This file holds the registry and the public functions; the block codecs are in
``coalora.quant.gguf_codecs`` (the 32-weight types and the shared scale fits) and
``coalora.quant.gguf_kquants`` (the K-types and IQ4_XS).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from coalora.errors import ConfigError
from coalora.quant.gguf_codecs import CODECS, Codec, sse
from coalora.quant.gguf_kquants import K_CODECS

_CHUNK = 1 << 18  # weights per encode/decode step: 1 MB temporaries (faster on CPU than 4 MB)


@dataclass(frozen=True)
class GGUFType:
    """One GGUF tensor type: ``block`` weights are stored in ``type_size`` bytes (ggml's
    GGML_QUANT_SIZES); ``ggml_type`` is the id a GGUF file records for the tensor."""

    name: str
    ggml_type: int
    block: int
    type_size: int
    layout: str  # what a block stores, for docs and error messages

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def row_bytes(self, in_features: int) -> int:
        return in_features // self.block * self.type_size


_T = GGUFType
# Ordered by bits per weight; ids from ggml.h's enum ggml_type.
GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        _T("Q2_K", 10, 256, 84, "16×16: 4-bit scale and min; fp16 d, dmin; 2-bit codes"),
        _T("Q3_K", 11, 256, 110, "16×16: 6-bit signed scale; fp16 d; 3-bit codes"),
        _T("IQ4_XS", 23, 256, 136, "8×32: 6-bit signed scale; fp16 d; 4-bit IQ4 levels"),
        _T("Q4_0", 2, 32, 18, "fp16 scale; 4-bit codes"),
        _T("IQ4_NL", 20, 32, 18, "fp16 scale; 4-bit IQ4 levels"),
        _T("Q4_K", 12, 256, 144, "8×32: 6-bit scale and min; fp16 d, dmin; 4-bit codes"),
        _T("Q4_1", 3, 32, 20, "fp16 scale and min; 4-bit codes"),
        _T("Q5_0", 6, 32, 22, "fp16 scale; 5-bit codes"),
        _T("Q5_K", 13, 256, 176, "8×32: 6-bit scale and min; fp16 d, dmin; 5-bit codes"),
        _T("Q5_1", 7, 32, 24, "fp16 scale and min; 5-bit codes"),
        _T("Q6_K", 14, 256, 210, "16×16: 8-bit signed scale; fp16 d; 6-bit codes"),
        _T("Q8_0", 8, 32, 34, "fp16 scale; 8-bit codes"),
    )
}


def gguf_type(name: str) -> GGUFType:
    if name not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {name!r} is not supported; allowed: {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name]


def allowed(name: str, in_features: int) -> bool:
    """Whether a row of ``in_features`` weights can be stored in type ``name`` (whole blocks)."""
    block = gguf_type(name).block
    return in_features > 0 and in_features % block == 0


def allowed_types(in_features: int) -> list[str]:
    return [n for n in GGUF_TYPES if allowed(n, in_features)]


def check_row(name: str, in_features: int) -> None:
    """Raise one clear ConfigError (a ValueError) when ``name`` cannot store such rows."""
    if not allowed(name, in_features):
        t = GGUF_TYPES[name]
        raise ConfigError(
            f"GGUF type {name} needs rows whose length is a multiple of {t.block}; these rows have "
            f"{in_features} weights (types allowed for them: {', '.join(allowed_types(in_features)) or 'none'})"
        )


def _codec(name: str) -> Codec:
    return CODECS[name] if name in CODECS else K_CODECS[name]


# ---- public functions --------------------------------------------------------------------------


def _check(W: Tensor, name: str, weight: Tensor | None) -> GGUFType:
    t = gguf_type(name)
    if W.dim() != 2 or not W.is_floating_point():
        raise ConfigError(
            f"GGUF {name}: expected a 2-D float weight (out, in); got {W.dtype} {tuple(W.shape)}"
        )
    check_row(name, W.shape[1])
    if not bool(torch.isfinite(W).all()):
        raise ConfigError(f"GGUF {name}: the weight holds inf or NaN")
    if weight is not None and tuple(weight.shape) != tuple(W.shape):
        raise ConfigError(
            f"GGUF {name}: weight has shape {tuple(weight.shape)}; W has {tuple(W.shape)}"
        )
    return t


def _encoded_chunks(
    W: Tensor, t: GGUFType, weight: Tensor | None, search: bool
) -> Iterator[tuple[slice, Tensor, Tensor, Tensor, Tensor]]:
    """Yields (blocks, X, Wt, raw, X̂) chunk by chunk; per block the better of RTN and the search."""
    enc, dec = _codec(t.name)
    X_all = W.detach().float().reshape(-1, t.block)  # (nb, block)
    W_all = None if weight is None else weight.detach().float().reshape(-1, t.block)
    step = max(1, _CHUNK // t.block)
    for i in range(0, X_all.shape[0], step):
        sl = slice(i, i + step)
        X = X_all[sl]
        Wt = torch.ones_like(X) if W_all is None else W_all[sl]
        raw = enc(X, Wt, False)
        Xh = dec(raw)
        if search:
            raw_s = enc(X, Wt, True)
            Xh_s = dec(raw_s)
            better = sse(Wt, Xh_s, X) < sse(Wt, Xh, X)  # (nb, 1)
            raw, Xh = torch.where(better, raw_s, raw), torch.where(better, Xh_s, Xh)
        yield sl, X, Wt, raw, Xh


def encode(W: Tensor, name: str, weight: Tensor | None = None, search: bool = True) -> Tensor:
    """W (out, in) → uint8 (out, in / block · type_size): GGUF type ``name``'s blocks, row-major.

    ``weight`` (W's shape, ≥ 0, e.g. a diagonal Fisher) weights the squared error the search
    minimises; ``search=False`` is the type's plain round-to-nearest rule (docs/gguf.md).
    """
    t = _check(W, name, weight)
    out = torch.empty(W.numel() // t.block, t.type_size, dtype=torch.uint8, device=W.device)
    for sl, _, _, raw, _ in _encoded_chunks(W, t, weight, search):
        out[sl] = raw
    return out.view(W.shape[0], t.row_bytes(W.shape[1]))


def _as_uint8(raw: Any) -> Tensor:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    t = raw if isinstance(raw, Tensor) else torch.as_tensor(raw)  # e.g. gguf-py's numpy array
    if t.dtype != torch.uint8:
        raise ConfigError(f"GGUF blocks must be uint8 bytes; got {t.dtype}")
    return t.reshape(-1)


def decode(raw: Any, name: str, shape: Sequence[int]) -> Tensor:
    """GGUF type ``name``'s blocks (bytes, uint8 tensor or numpy array) → float32 ``shape``."""
    t = gguf_type(name)
    rows, cols = (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)
    check_row(name, cols)
    flat = _as_uint8(raw)
    if flat.numel() != rows * t.row_bytes(cols):
        raise ConfigError(
            f"GGUF {name}: {flat.numel()} bytes do not hold shape {tuple(shape)} "
            f"({rows * t.row_bytes(cols)} bytes)"
        )
    blocks, dec = flat.view(-1, t.type_size), _codec(name)[1]
    out = torch.empty(blocks.shape[0], t.block, dtype=torch.float32, device=flat.device)
    step = max(1, _CHUNK // t.block)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = dec(blocks[i : i + step])
    return out.view(tuple(shape))


def fake_quantize_gguf(
    W: Tensor, name: str, weight: Tensor | None = None, search: bool = True
) -> Tensor:
    """decode(encode(W)): W as llama.cpp will see it; same shape, dtype and device as W."""
    t = _check(W, name, weight)
    out = torch.empty(W.numel() // t.block, t.block, dtype=torch.float32, device=W.device)
    for sl, _, _, _, Xh in _encoded_chunks(W, t, weight, search):
        out[sl] = Xh
    return out.view(W.shape).to(W.dtype)


def gguf_errors(
    W: Tensor,
    names: Sequence[str],
    weight: Tensor | None = None,
    search: bool = True,
    disallowed: float | None = None,
) -> Tensor:
    """Σ weight ⊙ (W - fake_quantize_gguf(W, name))² per type, float64 (K,) on the CPU.

    A type whose row rule W's rows break raises (the default), or scores ``disallowed`` (pass
    ``math.inf`` so an allocation never picks it).
    """
    out = torch.empty(len(names), dtype=torch.float64)
    for k, name in enumerate(names):
        if disallowed is not None and not allowed(name, W.shape[-1]):
            out[k] = disallowed
            continue
        t = _check(W, name, weight)
        total = torch.zeros((), dtype=torch.float64, device=W.device)
        for _, X, Wt, _, Xh in _encoded_chunks(W, t, weight, search):
            total += sse(Wt, Xh, X).sum(dtype=torch.float64)
        out[k] = total.item()
    return out


__all__ = [
    "GGUF_TYPES",
    "GGUFType",
    "allowed",
    "allowed_types",
    "check_row",
    "decode",
    "encode",
    "fake_quantize_gguf",
    "gguf_errors",
    "gguf_type",
]
