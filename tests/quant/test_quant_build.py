"""conf/quant/*.yaml resolve through build_model_config, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from coalora.quant import NF4, ModelQuantConfig, QuantConfig, build_cache, build_model_config
from coalora.quant.build import KEYS as QUANT_KEYS

CONF = Path(__file__).resolve().parents[2] / "conf"
KEYS = set(QUANT_KEYS)  # every option composes to exactly the keys QuantSettings accepts


def load(name: str, **overrides):
    """The quant group option ``name`` as Hydra composes it (shared keys + the option's own)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"quant={name}", "method=lora"]).quant
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"enc.{i}.q": torch.randn(16, 64, generator=g) * (i + 1) for i in range(3)}


@pytest.mark.parametrize("name", ["none", "nf4", "uniform", "budget", "file", "bnb_nf4"])
def test_every_option_has_the_same_keys(name):
    cfg = load(name)
    assert set(cfg) == KEYS and cfg.mode == name
    assert cfg.cache_limit_mb == 4096 and cfg.table_cache is True and cfg.solver == "exact"


def test_none_and_bnb_give_no_config(weights):
    assert build_model_config(load("none"), weights) is None
    assert build_model_config(load("bnb_nf4"), weights) is None
    assert build_cache(load("none")).limit_bytes == 4096 * 2**20


def test_nf4_and_uniform(weights):
    cfg = build_model_config(load("nf4"), weights)
    assert isinstance(cfg, ModelQuantConfig) and set(cfg.configs.values()) == {NF4}
    assert cfg.average_bits() == pytest.approx(4.127, abs=1e-3)
    cfg = build_model_config(
        load("uniform", **{"config.bits": 3, "config.dtype1": "bf16"}), weights
    )
    assert cfg["enc.0.q"] == QuantConfig(3, 8, "bf16", 64, 256)


def test_uniform_errors_name_key_and_allowed(weights):
    with pytest.raises(
        ValueError, match=r"^quant.config.bits=5 is not allowed; allowed: \[2, 3, 4, 8\]$"
    ):
        build_model_config(load("uniform", **{"config.bits": 5}), weights)
    cfg = load("uniform", **{"space.block0": [64]})
    with pytest.raises(ValueError, match=r"quant.config.block0=32 is not allowed; allowed: \[64\]"):
        build_model_config(load("uniform", **{"space.block0": [64], "config.block0": 32}), weights)
    assert build_model_config(cfg, weights) is not None
    with pytest.raises(ValueError, match=r"quant.mode='int4' is not allowed"):
        build_model_config(load("none", mode="int4"), weights)


def test_budget_mode_uses_the_disk_cache(tmp_path, weights):
    small = {
        "bits": [2, 3, 4],
        "bits0": [8],
        "dtype1": ["fp32"],
        "block0": [16, 64],
        "block1": [16],
    }
    cfg = load("budget", budget=2.8, space=small)
    config = build_model_config(cfg, weights, cache_dir=str(tmp_path), model_name="tiny")
    assert config.average_bits() <= 2.8 and list(config) == list(weights)
    assert len(list(tmp_path.glob("errors-tiny-mse-*.safetensors"))) == 1
    lag = build_model_config(load("budget", budget=2.8, space=small, solver="lagrangian"), weights)
    assert lag.average_bits() <= 2.8
    with pytest.raises(ValueError, match="min achievable 2.1562, max achievable 4.6250"):
        build_model_config(load("budget", budget=1.0, space=small), weights)
    with pytest.raises(ValueError, match="quant.budget=None must be a number"):
        build_model_config(load("budget", budget=None), weights)
    with pytest.raises(ValueError, match="quant.solver='cplex' is not allowed"):
        build_model_config(load("budget", solver="cplex"), weights)
    with pytest.raises(ValueError, match="quant.sensitivity=fisher needs a fisher sensitivity"):
        build_model_config(load("budget", sensitivity="fisher", space=small), weights)
    with pytest.raises(ValueError, match="quant.sensitivity=fisher needs"):  # deprecated alias
        build_model_config(load("budget", fisher=True, space=small), weights)


def test_file_mode(tmp_path, weights):
    numels = {n: w.numel() for n, w in weights.items()}
    saved = ModelQuantConfig(
        {
            n: NF4 if i else QuantConfig(2, 2, "bf16", 16, 16)
            for i, n in enumerate(reversed(list(numels)))
        },
        numels,
    )
    path = saved.to_json(tmp_path / "quant_config.json")
    config = build_model_config(load("file", file=str(path)), weights)
    assert list(config) == list(weights) and dict(config.configs) == dict(saved.configs)
    with pytest.raises(ValueError, match="quant.file must be set"):
        build_model_config(load("file"), weights)
    with pytest.raises(ValueError, match=r"missing layers \['enc.3.q'\]"):
        build_model_config(load("file", file=str(path)), {**weights, "enc.3.q": torch.ones(2, 2)})
