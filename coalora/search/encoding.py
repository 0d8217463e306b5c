"""Integer vector encoding of a model configuration for the surrogate (docs/search.md).

A configuration over N target layers becomes x in Z^{k N}: per layer, in layer order, the ordinal
index of each encoded field's value in the space's option list (layer-major:
``[l0.bits, l0.bits0, l0.dtype1, l0.block0, l0.block1, l1.bits, ...]``). Fields whose option list
has a single value carry no information and are dropped automatically (their value is fixed on
decode); ``fields`` restricts the encoding further (e.g. ``["bits"]``), in which case the other
fields are taken from a ``template`` configuration on decode.

Bounds are ``[0, len(options) - 1]`` per dimension, from the option lists and never from the data
(the reference code's data min/max gave 0/0 on constant dimensions).

The fields are the space's (``space.fields``): the five NF fields, or ``gguf`` (one ordinal per
layer, types ordered by bits per weight) in a GGUF space. There a decoded type a layer's rows
cannot hold (docs/gguf.md, the row rule) is replaced by the allowed type nearest in bits per
weight (the heavier one on a tie), given the layers' ``in_features``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from coalora.errors import ConfigError
from coalora.quant.config import ModelQuantConfig, QuantConfig, QuantSpace

FIELDS: tuple[str, ...] = ("bits", "bits0", "dtype1", "block0", "block1")


def space_options(space: QuantSpace) -> dict[str, list]:
    """The option list of every field, in the space's field order."""
    return {f: list(getattr(space, f)) for f in space.fields}


def active_fields(space: QuantSpace, fields: Sequence[str] | None = None) -> tuple[str, ...]:
    """The encoded fields: ``fields`` (default all) minus single-option fields, in field order."""
    if fields is None:
        fields = space.fields
    unknown = [f for f in fields if f not in space.fields]
    if unknown:
        raise ConfigError(f"unknown search field(s) {unknown}; allowed: {list(space.fields)}")
    return tuple(f for f in space.fields if f in fields and len(getattr(space, f)) > 1)


def cardinalities(space: QuantSpace, n_layers: int, fields: Sequence[str] | None = None) -> Tensor:
    """Number of options per dimension, (n_layers * k,) long."""
    per_layer = [len(getattr(space, f)) for f in active_fields(space, fields)]
    return torch.tensor(per_layer * n_layers, dtype=torch.long)


def bounds(space: QuantSpace, n_layers: int, fields: Sequence[str] | None = None) -> Tensor:
    """(2, n_layers * k) long tensor: row 0 = 0, row 1 = len(options) - 1, from the option lists."""
    hi = cardinalities(space, n_layers, fields) - 1
    return torch.stack([torch.zeros_like(hi), hi])


def normalize(X: Tensor, bounds: Tensor) -> Tensor:
    """Map integer indices to [0, 1] float64 with the fixed option bounds (2, d)."""
    lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
    return (X.to(torch.float64) - lo) / (hi - lo).clamp_min(1.0)


def unnormalize(X: Tensor, bounds: Tensor) -> Tensor:
    """Inverse of `normalize`, rounded to the nearest valid index (long)."""
    lo, hi = bounds[0].to(torch.float64), bounds[1].to(torch.float64)
    x = X.to(torch.float64) * (hi - lo).clamp_min(1.0) + lo
    return torch.minimum(torch.maximum(x.round(), lo), hi).long()


def _field_positions(fields: tuple[str, ...], space: QuantSpace) -> list[int]:
    return [space.fields.index(f) for f in fields]


def encode(
    config: ModelQuantConfig, space: QuantSpace, fields: Sequence[str] | None = None
) -> Tensor:
    """(n_layers * k,) long vector of option indices, layer-major, in the config's layer order."""
    pos = _field_positions(active_fields(space, fields), space)
    rows = []
    for name, qc in config.items():
        try:
            idx = space.index(qc)
        except ValueError as e:
            raise ConfigError(f"layer {name!r}: {e}") from e
        rows.extend(idx[p] for p in pos)
    return torch.tensor(rows, dtype=torch.long)


def decode(
    x: Tensor | Sequence[int],
    names: Sequence[str],
    space: QuantSpace,
    fields: Sequence[str] | None = None,
    numels: dict[str, int] | None = None,
    template: ModelQuantConfig | None = None,
    in_features: dict[str, int] | None = None,
) -> ModelQuantConfig:
    """Inverse of `encode`. Non-encoded fields come from their single option, else ``template``;
    with ``in_features`` every layer keeps to the options its rows allow (`nearest_allowed`)."""
    active = active_fields(space, fields)
    pos = _field_positions(active, space)
    k = len(active)
    x = torch.as_tensor(x, dtype=torch.long).flatten()
    if x.numel() != k * len(names):
        raise ConfigError(
            f"encoded vector has {x.numel()} entries, expected {len(names)} layers x {k} fields "
            f"{list(active)} = {k * len(names)}"
        )
    opts = space_options(space)
    fixed = [f for f in space.fields if f not in active and len(opts[f]) > 1]
    if fixed and template is None:
        raise ConfigError(
            f"fields {fixed} have several options but are not encoded (fields={list(active)}); "
            "pass a template configuration to fix them"
        )
    card = [len(opts[f]) for f in active]
    values = x.view(len(names), k).tolist() if k else [[] for _ in names]
    layers: dict[str, QuantConfig] = {}
    for name, row in zip(names, values):
        base = space.index(template[name]) if template is not None else (0,) * len(space.fields)
        full = list(base)
        for j, (p, v) in enumerate(zip(pos, row)):
            if not 0 <= v < card[j]:
                raise ConfigError(
                    f"layer {name!r} field {active[j]!r}: index {v} outside [0, {card[j] - 1}]"
                )
            full[p] = v
        layers[name] = space.from_index(tuple(full))
        if in_features is not None:
            layers[name] = nearest_allowed(layers[name], space, in_features[name])
    if numels is None:
        if template is None:
            raise ConfigError("decode needs the layers' numels (or a template configuration)")
        numels = dict(template.numels)
    return make_model_config(layers, numels)


def nearest_allowed(option, space: QuantSpace, in_features: int):
    """``option`` if a layer with ``in_features`` inputs can take it, else the allowed option
    nearest in storage bits (the heavier on a tie)."""
    allowed = space.allowed_for(in_features)
    if option in allowed or not allowed:
        return option
    bits = option.storage_bits()
    return min(allowed, key=lambda o: (abs(o.storage_bits() - bits), -o.storage_bits()))


def make_model_config(layers: dict[str, QuantConfig], numels: dict[str, int]) -> ModelQuantConfig:
    """Build a `ModelQuantConfig` (the one place that knows its constructor)."""
    return ModelQuantConfig(layers, {n: numels[n] for n in layers})


@dataclass(frozen=True)
class Encoder:
    """Encoding of one model's configurations: fixed layer names, numels, space and fields."""

    names: tuple[str, ...]
    numels: dict[str, int]
    space: QuantSpace
    fields: tuple[str, ...]
    template: ModelQuantConfig | None = None
    in_features: dict[str, int] | None = None  # the row rule of GGUF spaces (`nearest_allowed`)

    @classmethod
    def create(
        cls,
        names: Sequence[str],
        numels: dict[str, int],
        space: QuantSpace,
        fields: Sequence[str] | None = None,
        template: ModelQuantConfig | None = None,
        in_features: dict[str, int] | None = None,
    ) -> Encoder:
        missing = [n for n in names if n not in numels]
        if missing:
            raise ConfigError(f"numels missing for layers {missing}")
        active = active_fields(space, fields)
        return cls(tuple(names), dict(numels), space, active, template, in_features)

    @property
    def dim(self) -> int:
        return len(self.names) * len(self.fields)

    def bounds(self) -> Tensor:
        return bounds(self.space, len(self.names), self.fields)

    def encode(self, config: ModelQuantConfig) -> Tensor:
        if list(config.keys()) != list(self.names):
            config = make_model_config({n: config[n] for n in self.names}, self.numels)
        return encode(config, self.space, self.fields)

    def encode_many(self, configs: Sequence[ModelQuantConfig]) -> Tensor:
        """(n, d) long."""
        if not configs:
            return torch.zeros(0, self.dim, dtype=torch.long)
        return torch.stack([self.encode(c) for c in configs])

    def decode(self, x: Tensor | Sequence[int]) -> ModelQuantConfig:
        return decode(
            x, self.names, self.space, self.fields, self.numels, self.template, self.in_features
        )

    def normalize(self, X: Tensor) -> Tensor:
        return normalize(X, self.bounds())
