"""GGUF tensor types as a per-layer configuration space (docs/gguf.md, "GGUF types as a space").

``quant.space.kind=gguf`` makes every layer option one llama.cpp tensor type instead of an NF-b
tuple: ``GGUFOption("Q4_K")``. An option stores ``bits_per_weight`` of its type (scales included,
the number llama.cpp's file sizes follow), quantizes with our own encoder and decodes with the
type's standard formula (``coalora.quant.gguf_types``), so what training, evaluation and the
allocation see is exactly what a GGUF file written from the same weight holds.

``GGUFSpace`` has the ``QuantSpace`` interface the engine uses (``options``, ``position``,
``index``/``from_index``, ``fields``, ``digest``): its one field ``gguf`` lists the types. The row
rule (a row holds whole blocks: 256 weights for the K-types and IQ4_XS, 32 for the others) makes
some types unusable for some layers; ``allowed_for(in_features)`` says which, error tables score a
disallowed (layer, type) as +inf and every chooser of options (allocation, random configurations,
search decoding) keeps to the allowed ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from coalora.errors import CoaloraError, ConfigError
from coalora.quant.gguf_types import (
    GGUF_TYPES,
    allowed,
    decode,
    encode,
    fake_quantize_gguf,
    gguf_type,
)

FIELDS: tuple[str, ...] = ("gguf",)
KEY_PREFIX = "gguf-"


@dataclass(frozen=True, order=True)
class GGUFOption:
    """One layer's configuration in a GGUF space: the ggml tensor type ``type`` (e.g. ``Q4_K``)."""

    type: str

    def __post_init__(self) -> None:
        gguf_type(self.type)  # raises one line listing the supported types

    def storage_bits(self) -> float:
        """Bits per weight of the type, block scales included (8 · type_size / block)."""
        return GGUF_TYPES[self.type].bits_per_weight

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.type

    @classmethod
    def from_key(cls, key: str) -> GGUFOption:
        if not key.startswith(KEY_PREFIX):
            raise ConfigError(f"not a GGUF option key: {key!r}")
        return cls(key[len(KEY_PREFIX) :])

    def as_tuple(self) -> tuple[str]:
        return (self.type,)

    def to_dict(self) -> dict[str, Any]:
        return {"gguf": self.type}

    def allows(self, in_features: int) -> bool:
        return allowed(self.type, in_features)

    def fake_quantize(self, W: Tensor) -> Tensor:
        """decode(encode(W)) as a GGUF file holds it; same shape, dtype and device as ``W``."""
        return fake_quantize_gguf(W, self.type)

    def pack(self, W: Tensor) -> GGUFPacked:
        """The packed storage of ``W`` under this type: its GGUF blocks (``quant.storage=packed``)."""
        return GGUFPacked(encode(W, self.type), tuple(W.shape), self)


@dataclass
class GGUFPacked:
    """A weight stored as its GGUF blocks, the packed cache entry of a GGUF option: exactly the
    bytes a GGUF file holds for the tensor, decoded per forward (``dequantize``) into the values
    ``GGUFOption.fake_quantize`` gives (same encoder, same decoder)."""

    FIELDS = ("codes",)

    codes: Tensor  # uint8 (d_out, d_in / block * type_size): the blocks, row-major
    shape: tuple[int, ...]
    qc: GGUFOption

    def nbytes(self) -> int:
        return self.codes.numel()

    payload_nbytes = nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> GGUFPacked:
        device = torch.device(device)
        if self.codes.device == device:
            return self
        return GGUFPacked(self.codes.to(device), self.shape, self.qc)

    def validate(self, what: str = "packed entry") -> None:
        t = GGUF_TYPES[self.qc.type]
        want = (self.shape[0], t.row_bytes(self.shape[1])) if len(self.shape) == 2 else None
        if want is None or tuple(self.codes.shape) != want or self.codes.dtype != torch.uint8:
            raise CoaloraError(
                f"{what} has blocks {tuple(self.codes.shape)} {self.codes.dtype}, expected uint8 "
                f"{want} for weight shape {tuple(self.shape)} under {self.qc.key}"
            )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = decode(self.codes, self.qc.type, self.shape)
        return w if dtype == torch.float32 else w.to(dtype)

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        return {f"{prefix}codes": self.codes.contiguous()}


@dataclass(frozen=True)
class GGUFSpace:
    """The GGUF types a layer may take (default: every supported type, by bits per weight)."""

    gguf: tuple[str, ...] = tuple(GGUF_TYPES)
    # (min, max) average bits one model reaches under the row rule (``for_layers``); None = the
    # types' own range. Not part of the digest: it follows from the model, not the settings.
    reach: tuple[float, float] | None = field(default=None, compare=False)
    kind = "gguf"
    fields = FIELDS
    _options: tuple[GGUFOption, ...] = field(init=False, repr=False, compare=False)
    _position: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        items = [self.gguf] if isinstance(self.gguf, str) else list(self.gguf)
        if not items:
            raise ConfigError("quant.space.gguf must not be empty")
        bad = [t for t in items if t not in GGUF_TYPES]
        if bad:
            raise ConfigError(
                f"quant.space.gguf={items} has {bad} not supported; allowed: {list(GGUF_TYPES)}"
            )
        if len(set(items)) != len(items):
            raise ConfigError(f"quant.space.gguf={items} has duplicate values")
        order = list(GGUF_TYPES)  # ascending bits per weight: ordinals are monotone in bits
        types = tuple(sorted(items, key=order.index))
        object.__setattr__(self, "gguf", types)
        opts = tuple(GGUFOption(t) for t in types)
        object.__setattr__(self, "_options", opts)
        object.__setattr__(self, "_position", {o: i for i, o in enumerate(opts)})

    def __hash__(self) -> int:
        return hash(self.gguf)

    def __len__(self) -> int:
        return len(self._options)

    def __contains__(self, qc: object) -> bool:
        return qc in self._position

    def lists(self) -> tuple[tuple, ...]:
        return (self.gguf,)

    def options(self) -> list[GGUFOption]:
        return list(self._options)

    def position(self, qc: GGUFOption) -> int:
        self.validate(qc)
        return self._position[qc]

    def validate(self, qc: Any, prefix: str = "") -> GGUFOption:
        if qc not in self._position:
            got = qc.key if hasattr(qc, "key") else repr(qc)
            raise ConfigError(f"{prefix}gguf={got} is not allowed; allowed: {list(self.gguf)}")
        return qc

    def index(self, qc: GGUFOption) -> tuple[int]:
        return (self.position(qc),)

    def from_index(self, idx: Iterable[int]) -> GGUFOption:
        idx = tuple(int(i) for i in idx)
        if len(idx) != 1 or not 0 <= idx[0] < len(self._options):
            raise ValueError(f"GGUF option ordinal {idx} out of range [0, {len(self) - 1}]")
        return self._options[idx[0]]

    def allowed_for(self, in_features: int) -> list[GGUFOption]:
        """The options whose row rule a layer with ``in_features`` inputs satisfies."""
        return [o for o in self._options if o.allows(in_features)]

    def check_layers(self, in_features: dict[str, int]) -> None:
        """Raise one line when some layer can take none of the space's types."""
        for name, d_in in in_features.items():
            if not self.allowed_for(d_in):
                raise ConfigError(
                    f"quant.space.gguf={list(self.gguf)}: layer {name} has rows of {d_in} weights, "
                    f"which none of these types can store (blocks of 32 or 256)"
                )

    def for_layers(self, in_features: dict[str, int], numels: dict[str, int]) -> GGUFSpace:
        """This space with ``min_bits``/``max_bits`` = the average bits a model with these layers
        reaches when every layer takes its lightest / heaviest allowed type."""
        self.check_layers(in_features)
        total = sum(numels[n] for n in in_features)
        bits = [[o.storage_bits() for o in self.allowed_for(d)] for d in in_features.values()]
        lo = sum(min(b) * numels[n] for n, b in zip(in_features, bits)) / total
        hi = sum(max(b) * numels[n] for n, b in zip(in_features, bits)) / total
        return GGUFSpace(self.gguf, reach=(lo, hi))

    def min_bits(self) -> float:
        if self.reach is not None:
            return self.reach[0]
        return min(o.storage_bits() for o in self._options)

    def max_bits(self) -> float:
        if self.reach is not None:
            return self.reach[1]
        return max(o.storage_bits() for o in self._options)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gguf", "gguf": list(self.gguf)}

    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


__all__ = ["FIELDS", "GGUFOption", "GGUFPacked", "GGUFSpace"]
