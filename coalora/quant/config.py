"""Quantization configurations: one layer's ``QuantConfig``, the option space, a model's assignment.

A layer configuration is LQ-LoRA's NF-b + double-quantization tuple (arXiv 2311.12023 §3.2;
docs/quantization.md): ``(bits, bits0, dtype1, block0, block1)``. Its storage in bits per parameter is
``bits + bits0/block0 + w1/(block0*block1)`` with ``w1 = 32`` for fp32 second-level scales and 16
for bf16/fp16 (the per-matrix fp32 offset and the codebook are not counted).
``QuantSpace`` is the per-layer option grid (default: the 432-option grid, enumerated
bits → bits0 → dtype1 → block0 → block1). ``ModelQuantConfig`` maps target module names to
configurations and knows the parameter count of each layer, hence the model's average bits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coalora.errors import ConfigError
from coalora.io import atomic_write_json
from coalora.quant.gguf_space import GGUFOption, GGUFSpace

DTYPE1: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
FIELDS: tuple[str, ...] = ("bits", "bits0", "dtype1", "block0", "block1")
SCHEMA_VERSION = 1


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None


@dataclass(frozen=True, order=True)
class QuantConfig:
    """One layer's configuration (docs/quantization.md): NF ``bits`` weights, absmax scales over
    ``block0`` weights quantized to unsigned ``bits0`` bits in super-blocks of ``block1`` scales,
    whose second-level constants are stored in ``dtype1``."""

    bits: int
    bits0: int
    dtype1: str
    block0: int
    block1: int

    def __post_init__(self) -> None:
        for name in ("bits", "bits0", "block0", "block1"):
            object.__setattr__(self, name, _as_int(getattr(self, name), name))
        # codes and first-level scales are stored one per uint8 before packing
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"bits={self.bits} is not allowed; allowed: 1..8")
        if not 1 <= self.bits0 <= 8:
            raise ConfigError(f"bits0={self.bits0} is not allowed; allowed: 1..8")
        if self.dtype1 not in DTYPE1:
            raise ConfigError(f"dtype1={self.dtype1!r} is not allowed; allowed: {list(DTYPE1)}")
        for name in ("block0", "block1"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")

    def storage_bits(self) -> float:
        """Bits per parameter, docs/quantization.md ("Storage")."""
        w1 = 32 if self.dtype1 == "fp32" else 16
        return self.bits + self.bits0 / self.block0 + w1 / (self.block0 * self.block1)

    @property
    def key(self) -> str:
        """Short file-name-safe identifier, e.g. ``b4-b08-fp32-B064-B1256``."""
        return f"b{self.bits}-b0{self.bits0}-{self.dtype1}-B0{self.block0}-B1{self.block1}"

    @classmethod
    def from_key(cls, key: str) -> QuantConfig:
        try:
            b, b0, t1, B0, B1 = key.split("-")
            assert b[0] == "b" and b0[:2] == "b0" and B0[:2] == "B0" and B1[:2] == "B1"
            return cls(int(b[1:]), int(b0[2:]), t1, int(B0[2:]), int(B1[2:]))
        except (ValueError, AssertionError, IndexError):
            raise ConfigError(f"not a QuantConfig key: {key!r}") from None

    @property
    def dtype(self) -> torch.dtype:
        return DTYPE1[self.dtype1]

    def as_tuple(self) -> tuple[int, int, str, int, int]:
        return (self.bits, self.bits0, self.dtype1, self.block0, self.block1)

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(FIELDS, self.as_tuple()))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "") -> QuantConfig:
        """Build from a mapping with the five fields (a DictConfig works); errors name ``prefix``."""
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise ConfigError(f"{prefix}: missing field(s) {missing}; expected {list(FIELDS)}")
        try:
            return cls(*(d[f] for f in FIELDS))
        except ConfigError as e:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{e}") from None


NF4 = QuantConfig(4, 8, "fp32", 64, 256)  # QLoRA's NF4 with double quantization, 4.127 bits
NF3 = QuantConfig(3, 8, "fp32", 64, 256)


def _option_list(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]  # a fixed value, e.g. quant.space.block0=64
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{name}={value!r} must be a list of {kind.__name__}") from None
    if not items:
        raise ConfigError(f"{name} must not be empty")
    if kind is str:
        bad = [v for v in items if v not in DTYPE1]
        if bad:
            raise ConfigError(f"{name}={items} has {bad} not allowed; allowed: {list(DTYPE1)}")
        order = list(DTYPE1)
        out = tuple(sorted(set(items), key=order.index))
    else:
        out = tuple(sorted({_as_int(v, name) for v in items}))
    if len(out) != len(items):
        raise ConfigError(f"{name}={items} has duplicate values")
    return out


@dataclass(frozen=True)
class QuantSpace:
    """The per-layer option lists; defaults are the 432-option grid (docs/quantization.md).

    Numeric lists are kept sorted ascending and dtype1 in the order bf16, fp16, fp32, so ordinals
    (``index``) are monotone in the value. ``kind``/``fields`` are what code generic over spaces
    reads (``coalora.quant.gguf_space.GGUFSpace`` is the other kind).
    """

    kind = "nf"
    fields = FIELDS

    bits: tuple[int, ...] = (2, 3, 4, 8)
    bits0: tuple[int, ...] = (2, 3, 4, 8)
    dtype1: tuple[str, ...] = ("bf16", "fp16", "fp32")
    block0: tuple[int, ...] = (16, 32, 64)
    block1: tuple[int, ...] = (16, 64, 256)
    _options: tuple[QuantConfig, ...] = field(init=False, repr=False, compare=False)
    _position: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in FIELDS:
            kind = str if name == "dtype1" else int
            object.__setattr__(self, name, _option_list(getattr(self, name), name, kind))
        opts = tuple(
            QuantConfig(*t)
            for t in itertools.product(self.bits, self.bits0, self.dtype1, self.block0, self.block1)
        )
        object.__setattr__(self, "_options", opts)
        object.__setattr__(self, "_position", {qc: i for i, qc in enumerate(opts)})

    def __hash__(self) -> int:
        return hash(self.lists())

    def __len__(self) -> int:
        return len(self._options)

    def __contains__(self, qc: object) -> bool:
        return qc in self._position

    def lists(self) -> tuple[tuple, ...]:
        return tuple(getattr(self, f) for f in FIELDS)

    def options(self) -> list[QuantConfig]:
        """All configurations, nested in the order bits → bits0 → dtype1 → block0 → block1."""
        return list(self._options)

    def position(self, qc: QuantConfig) -> int:
        """Column of ``qc`` in ``options()``."""
        self.validate(qc)
        return self._position[qc]

    def validate(self, qc: QuantConfig, prefix: str = "") -> QuantConfig:
        """Raise ``ValueError`` naming the first field of ``qc`` outside this space."""
        for name in FIELDS:
            value, allowed = getattr(qc, name), getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"{prefix}{name}={value!r} is not allowed; allowed: {list(allowed)}"
                )
        return qc

    def index(self, qc: QuantConfig) -> tuple[int, ...]:
        """Ordinal of each field's value in its option list."""
        self.validate(qc)
        return tuple(getattr(self, f).index(getattr(qc, f)) for f in FIELDS)

    def from_index(self, idx: Iterable[int]) -> QuantConfig:
        idx = tuple(int(i) for i in idx)
        if len(idx) != len(FIELDS):
            raise ValueError(f"expected {len(FIELDS)} ordinals {FIELDS}, got {idx}")
        vals = []
        for name, i in zip(FIELDS, idx):
            allowed = getattr(self, name)
            if not 0 <= i < len(allowed):
                raise ValueError(f"ordinal {i} for {name} out of range [0, {len(allowed) - 1}]")
            vals.append(allowed[i])
        return QuantConfig(*vals)

    def allowed_for(self, in_features: int) -> list[QuantConfig]:
        """Every option: NF blocks run over the flattened weight, any row length works."""
        return list(self._options)

    def min_bits(self) -> float:
        return min(qc.storage_bits() for qc in self._options)

    def max_bits(self) -> float:
        return max(qc.storage_bits() for qc in self._options)

    def digest(self) -> str:
        """Stable short hash of the option lists (cache keys)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, list]:
        return {f: list(getattr(self, f)) for f in FIELDS}

    @classmethod
    def from_cfg(cls, cfg: Any, prefix: str = "quant.space") -> QuantSpace | GGUFSpace:
        """From a mapping / DictConfig with any of the five option lists (missing = default).

        ``kind: gguf`` returns a ``GGUFSpace`` of the types listed under ``gguf`` (default: all
        supported); ``kind: nf`` (default) reads the NF lists and ignores ``gguf``.
        """
        if cfg is None:
            return cls()
        unknown = [k for k in cfg if k not in (*FIELDS, "kind", "gguf")]
        if unknown:
            raise ConfigError(
                f"{prefix} has unknown key(s) {unknown}; allowed: {[*FIELDS, 'kind', 'gguf']}"
            )
        kind = cfg.get("kind") or "nf"
        if kind not in SPACE_KINDS:
            raise ConfigError(f"{prefix}.kind={kind!r} is not allowed; allowed: {SPACE_KINDS}")
        if kind == "gguf":
            types = cfg.get("gguf")
            try:
                return GGUFSpace() if types is None else GGUFSpace(tuple(types))
            except ConfigError as e:
                raise ConfigError(str(e).replace("quant.space", prefix)) from None
        kwargs = {}
        for name in FIELDS:
            if name in cfg and cfg[name] is not None:
                value_type = str if name == "dtype1" else int
                try:
                    kwargs[name] = _option_list(cfg[name], name, value_type)
                    if value_type is int:
                        for v in kwargs[name]:  # validate through QuantConfig's field ranges
                            QuantConfig(**{**NF4.to_dict(), name: v})
                except ConfigError as e:
                    raise ConfigError(f"{prefix}.{e}") from None
        return cls(**kwargs)


SPACE_KINDS = ["nf", "gguf"]
LayerOption = QuantConfig | GGUFOption  # what a configuration assigns to one layer


def option_from_dict(d: Mapping[str, Any], prefix: str = "") -> LayerOption:
    """A layer option from its dict form: ``{"gguf": "Q4_K"}`` or the five NF fields."""
    if "gguf" in d:
        try:
            return GGUFOption(d["gguf"])
        except ConfigError as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None
    return QuantConfig.from_dict(d, prefix=prefix)


def option_from_key(key: str) -> LayerOption:
    """Inverse of ``option.key`` for both kinds (``b4-b08-…`` or ``gguf-Q4_K``)."""
    return GGUFOption.from_key(key) if key.startswith("gguf-") else QuantConfig.from_key(key)


class ModelQuantConfig(Mapping):
    """Ordered mapping target module name → QuantConfig, plus each layer's parameter count."""

    def __init__(self, configs: Mapping[str, QuantConfig], numels: Mapping[str, int]):
        self.configs: dict[str, QuantConfig] = dict(configs)
        if set(numels) != set(self.configs):
            extra = sorted(set(numels) - set(self.configs))
            missing = sorted(set(self.configs) - set(numels))
            raise ValueError(
                f"numels and configs disagree: no config for {extra}, no numel for {missing}"
            )
        self.numels: dict[str, int] = {
            n: _as_int(numels[n], f"numels[{n!r}]") for n in self.configs
        }
        for name, qc in self.configs.items():
            if not isinstance(qc, (QuantConfig, GGUFOption)):
                raise TypeError(
                    f"config for {name!r} is {type(qc).__name__}, not QuantConfig or GGUFOption"
                )
            if self.numels[name] <= 0:
                raise ValueError(f"numels[{name!r}]={self.numels[name]} must be positive")

    @classmethod
    def uniform(cls, numels: Mapping[str, int], qc: QuantConfig) -> ModelQuantConfig:
        return cls({n: qc for n in numels}, numels)

    def __getitem__(self, name: str) -> QuantConfig:
        return self.configs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.configs)

    def __len__(self) -> int:
        return len(self.configs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelQuantConfig):
            return NotImplemented
        return (
            list(self.configs.items()) == list(other.configs.items())
            and self.numels == other.numels
        )

    __hash__ = None  # mutable container

    def __repr__(self) -> str:
        return f"ModelQuantConfig({len(self)} layers, average_bits={self.average_bits():.4f})"

    def total_bits(self) -> float:
        return sum(qc.storage_bits() * self.numels[n] for n, qc in self.configs.items())

    def average_bits(self) -> float:
        """Parameter-weighted mean storage bits over the layers (docs/quantization.md, "Storage")."""
        return self.total_bits() / sum(self.numels.values())

    def validate_names(self, names: Iterable[str]) -> None:
        """Raise ``ValueError`` listing layers unknown to the model and model layers not covered."""
        names = list(names)
        unknown = [n for n in self.configs if n not in set(names)]
        missing = [n for n in names if n not in self.configs]
        if unknown or missing:
            raise ValueError(
                f"quant config does not match the model's target layers: "
                f"unknown layers {unknown}; missing layers {missing}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "average_bits": self.average_bits(),
            "layers": {
                n: {**qc.to_dict(), "numel": self.numels[n]} for n, qc in self.configs.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "quant config") -> ModelQuantConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: top level must be an object, got {type(d).__name__}")
        version = d.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{source}: key 'version' is {version!r}; expected {SCHEMA_VERSION}")
        layers = d.get("layers")
        if not isinstance(layers, Mapping):
            raise ValueError(f"{source}: key 'layers' must be an object name -> config")
        configs, numels = {}, {}
        for name, entry in layers.items():
            key = f"layers[{name!r}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{source}: key {key} must be an object")
            if "numel" not in entry:
                raise ValueError(f"{source}: key {key}.numel is missing")
            try:
                configs[name] = option_from_dict(entry, prefix=key)
                numels[name] = _as_int(entry["numel"], f"{key}.numel")
            except ConfigError as e:
                raise ValueError(f"{source}: {e}") from None
        return cls(configs, numels)

    def to_json(self, path: str | Path) -> Path:
        """Write atomically (temporary file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> ModelQuantConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"quant config file not found: {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: malformed JSON (line {e.lineno}, column {e.colno}): {e.msg}"
            ) from None
        return cls.from_dict(data, source=str(path))


__all__ = [
    "DTYPE1",
    "FIELDS",
    "NF3",
    "NF4",
    "SPACE_KINDS",
    "GGUFOption",
    "GGUFSpace",
    "LayerOption",
    "ModelQuantConfig",
    "QuantConfig",
    "QuantSpace",
    "option_from_dict",
    "option_from_key",
]
