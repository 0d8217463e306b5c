"""Shared fixtures: offline, CPU, W&B disabled, tiny models, a tiny GLUE fixture folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (``make test`` runs two workers) every worker and the entry points it starts
# get one intra-op thread, so two workers never oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture()
def cli():
    """``cli(script, args, cache_dir, extra_env=None)`` -> CompletedProcess."""
    from support import run_entry

    return run_entry


@pytest.fixture(scope="session")
def fixture_data_dir() -> Path:
    """A data_dir holding tiny GLUE TSV files (glue/<TASK>/{train,dev}.tsv)."""
    return FIXTURES


@pytest.fixture()
def compose():
    """``compose(overrides, config_name="train")`` -> DictConfig via Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides: list[str] | None = None, config_name: str = "train"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(
                config_name=config_name, overrides=overrides or [], return_hydra_config=True
            )

    return _compose


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip (with the reason) where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: scripts/gpu_check.sh)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
