"""Configuration encoding: round-trips, field subsets, bounds from the option lists."""

from __future__ import annotations

import pytest
import torch

from coalora.errors import ConfigError
from coalora.quant.config import ModelQuantConfig, QuantConfig, QuantSpace
from coalora.search.encoding import Encoder, bounds, decode, encode, normalize, unnormalize


def test_round_trip_all_fields(space, layout):
    NAMES, NUMELS = layout.names, layout.numels
    for config in layout.random_configs(space, 20):
        x = encode(config, space)
        assert x.dtype == torch.long and x.shape == (5 * len(NAMES),)
        assert decode(x, NAMES, space, numels=NUMELS) == config


def test_layer_major_order(space, layout):
    NAMES, NUMELS = layout.names, layout.numels
    qcs = [QuantConfig(2, 3, "bf16", 16, 64), QuantConfig(8, 8, "fp32", 64, 256)]
    config = ModelQuantConfig(dict(zip(NAMES[:2], qcs)), {n: NUMELS[n] for n in NAMES[:2]})
    assert encode(config, space).tolist() == [0, 1, 0, 0, 1, 3, 3, 2, 2, 2]


def test_bits_only_fields_restricted_space(layout):
    NAMES, NUMELS = layout.names, layout.numels
    space = QuantSpace(block0=[64], block1=[256], dtype1=["fp32"], bits0=[8])
    config = layout.random_configs(space, 1, seed=3)[0]
    x = encode(config, space)  # single-option fields are dropped automatically
    assert x.shape == (len(NAMES),)
    assert encode(config, space, fields=["bits"]).tolist() == x.tolist()
    assert decode(x, NAMES, space, fields=["bits"], numels=NUMELS) == config


def test_bits_only_with_template_on_full_space(space, layout):
    NAMES, NUMELS = layout.names, layout.numels
    template, other = layout.random_configs(space, 2, seed=4)
    x = encode(other, space, fields=["bits"])
    assert x.shape == (len(NAMES),)
    out = decode(x, NAMES, space, fields=["bits"], template=template)
    for n in NAMES:
        assert out[n].bits == other[n].bits
        assert (out[n].bits0, out[n].block0) == (template[n].bits0, template[n].block0)
    with pytest.raises(ConfigError, match="template"):
        decode(x, NAMES, space, fields=["bits"], numels=NUMELS)


def test_bounds_from_options_not_data():
    space = QuantSpace(bits=[2, 3, 4], block1=[256])  # block1 fixed -> 4 fields per layer
    b = bounds(space, 3)
    assert b.shape == (2, 12)
    assert b[0].tolist() == [0] * 12
    assert b[1].tolist() == [2, 3, 2, 2] * 3  # len(options) - 1 for bits, bits0, dtype1, block0
    X = torch.tensor([[0, 0, 0, 0] * 3, [2, 3, 2, 2] * 3])
    Xn = normalize(X, b)
    assert Xn.min() == 0 and Xn.max() == 1  # constant columns in data never give 0/0
    assert torch.equal(unnormalize(Xn, b), X)
    assert torch.isfinite(normalize(X[:1], b)).all()


def test_errors_name_the_problem(space, layout):
    NAMES, NUMELS = layout.names, layout.numels
    with pytest.raises(ConfigError, match="unknown search field"):
        encode(layout.random_configs(space, 1)[0], space, fields=["bitz"])
    with pytest.raises(ConfigError, match="expected 4 layers x 5 fields"):
        decode(torch.zeros(3, dtype=torch.long), NAMES, space, numels=NUMELS)
    bad = torch.zeros(20, dtype=torch.long)
    bad[0] = 4
    with pytest.raises(ConfigError, match="field 'bits': index 4 outside"):
        decode(bad, NAMES, space, numels=NUMELS)


def test_encoder_reorders_to_its_names(space, layout):
    NAMES, NUMELS = layout.names, layout.numels
    config = layout.random_configs(space, 1)[0]
    enc = Encoder.create(list(reversed(NAMES)), NUMELS, space)
    x = enc.encode(config)
    assert enc.decode(x) == ModelQuantConfig({n: config[n] for n in reversed(NAMES)}, NUMELS)
    assert enc.dim == 20 and enc.bounds().shape == (2, 20)
