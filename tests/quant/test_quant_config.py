"""QuantConfig, QuantSpace and ModelQuantConfig: storage accounting, validation, JSON."""

from __future__ import annotations

import json

import pytest

from coalora.quant import NF3, NF4, ModelQuantConfig, QuantConfig, QuantSpace


def test_storage_bits_examples():
    assert NF4.storage_bits() == pytest.approx(4.1270, abs=1e-4)
    assert NF3.storage_bits() == pytest.approx(3.1270, abs=1e-4)
    space = QuantSpace()
    assert space.min_bits() == pytest.approx(2.0322, abs=1e-4)
    assert space.max_bits() == pytest.approx(8.625)
    assert (
        QuantConfig(2, 2, "bf16", 64, 256).storage_bits()
        == QuantConfig(2, 2, "fp16", 64, 256).storage_bits()
    )


def test_key_hash_frozen():
    assert NF4.key == "b4-b08-fp32-B064-B1256"
    assert QuantConfig.from_key(NF4.key) == NF4
    assert len({NF4, QuantConfig(4, 8, "fp32", 64, 256)}) == 1
    with pytest.raises(AttributeError):
        NF4.bits = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 9}, "bits"),
        ({"bits0": 0}, "bits0"),
        ({"dtype1": "fp8"}, "dtype1"),
        ({"block0": 0}, "block0"),
        ({"bits": True}, "bits"),
        ({"block1": 2.5}, "block1"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{**NF4.to_dict(), **kwargs})


def test_space_enumeration_order_and_index():
    space = QuantSpace()
    opts = space.options()
    assert len(opts) == 432 == len(space)
    assert opts[0] == QuantConfig(2, 2, "bf16", 16, 16)
    assert opts[1] == QuantConfig(2, 2, "bf16", 16, 64)  # block1 varies fastest
    assert opts[3] == QuantConfig(2, 2, "bf16", 32, 16)
    assert opts[9] == QuantConfig(2, 2, "fp16", 16, 16)
    assert opts[27] == QuantConfig(2, 3, "bf16", 16, 16)
    assert opts[108] == QuantConfig(3, 2, "bf16", 16, 16)  # bits varies slowest
    for k, qc in enumerate(opts):
        assert space.from_index(space.index(qc)) == qc
        assert space.position(qc) == k
    assert space.index(NF4) == (2, 3, 2, 2, 2)


def test_space_validate_message():
    with pytest.raises(ValueError, match=r"bits=5 is not allowed; allowed: \[2, 3, 4, 8\]"):
        QuantSpace().validate(QuantConfig(5, 8, "fp32", 64, 256))
    small = QuantSpace(bits=[2, 3], block0=64)
    with pytest.raises(ValueError, match=r"block0=32 is not allowed; allowed: \[64\]"):
        small.validate(QuantConfig(2, 8, "fp32", 32, 256))


def test_space_from_cfg():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"bits": [4, 2], "bits0": [8], "dtype1": ["fp32", "bf16"], "block0": 64})
    space = QuantSpace.from_cfg(cfg)
    assert space.bits == (2, 4) and space.dtype1 == ("bf16", "fp32") and space.block0 == (64,)
    assert space.block1 == (16, 64, 256) and len(space) == 2 * 1 * 2 * 1 * 3
    assert QuantSpace.from_cfg(None) == QuantSpace()
    assert QuantSpace.from_cfg({"bits": [2]}).digest() != QuantSpace().digest()
    with pytest.raises(ValueError, match=r"quant.space has unknown key\(s\) \['bitz'\]"):
        QuantSpace.from_cfg({"bitz": [2]})
    with pytest.raises(ValueError, match="quant.space.dtype1"):
        QuantSpace.from_cfg({"dtype1": ["fp8"]})
    with pytest.raises(ValueError, match="quant.space.bits"):
        QuantSpace.from_cfg({"bits": [12]})


def _config() -> ModelQuantConfig:
    return ModelQuantConfig(
        {"a.q": NF4, "a.k": QuantConfig(2, 2, "bf16", 64, 256)}, {"a.q": 300, "a.k": 100}
    )


def test_average_bits_parameter_weighted():
    cfg = _config()
    expected = (
        300 * NF4.storage_bits() + 100 * QuantConfig(2, 2, "bf16", 64, 256).storage_bits()
    ) / 400
    assert cfg.average_bits() == pytest.approx(expected)
    assert list(cfg) == ["a.q", "a.k"] and cfg["a.q"] == NF4
    assert ModelQuantConfig.uniform({"x": 5, "y": 7}, NF4).average_bits() == pytest.approx(
        NF4.storage_bits()
    )


def test_json_round_trip_is_atomic(tmp_path):
    cfg = _config()
    path = cfg.to_json(tmp_path / "sub" / "quant_config.json")
    assert [p.name for p in path.parent.iterdir()] == ["quant_config.json"]  # no temp file left
    back = ModelQuantConfig.from_json(path)
    assert back == cfg and list(back) == list(cfg)


def test_json_errors_name_the_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"version": 1, "layers": {')
    with pytest.raises(ValueError, match="malformed JSON"):
        ModelQuantConfig.from_json(path)
    data = _config().to_dict()
    del data["layers"]["a.k"]["bits"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layers\['a.k'\].*bits"):
        ModelQuantConfig.from_json(path)
    data = _config().to_dict()
    data["layers"]["a.q"]["dtype1"] = "fp8"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layers\['a.q'\].dtype1='fp8' is not allowed"):
        ModelQuantConfig.from_json(path)
    data = _config().to_dict()
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'version'"):
        ModelQuantConfig.from_json(path)
    with pytest.raises(FileNotFoundError):
        ModelQuantConfig.from_json(tmp_path / "missing.json")


def test_validate_names_lists_unknown_and_missing():
    cfg = _config()
    cfg.validate_names(["a.q", "a.k"])
    with pytest.raises(ValueError, match=r"unknown layers \['a.k'\]; missing layers \['a.v'\]"):
        cfg.validate_names(["a.q", "a.v"])
