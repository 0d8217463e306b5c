"""Build a method on tiny_bert with the tiny SST-2 fixture (no Trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache dir for the session: error tables and allocations are built once."""
    return tmp_path_factory.mktemp("coalora-cache")


@pytest.fixture()
def tiny_cfg(tmp_path, shared_cache):
    def _cfg(overrides: list[str]):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    "model=tiny_bert",
                    f"paths.data_dir={ROOT / 'tests' / 'fixtures'}",
                    f"paths.cache_dir={shared_cache}",
                    f"paths.log_dir={tmp_path / 'out'}",
                    "data.allow_hub=false",
                    "data.batch_size=8",
                    "callbacks=minimal",
                    "logger=csv",
                    *overrides,
                ],
            )
        cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    return _cfg


@pytest.fixture()
def built(tiny_cfg):
    """(cfg, lit) for a method, set up but untrained."""
    from coalora.stages.build import build_module, prepare

    def _built(overrides: list[str]):
        cfg = tiny_cfg(overrides)
        dm, model, method, ctx = prepare(cfg)
        method.setup(model, ctx)
        return cfg, build_module(cfg, model, method, ctx), dm

    return _built
