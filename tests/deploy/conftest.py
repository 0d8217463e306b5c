"""A tiny packed export shared by the deploy tests (two configurations, each with an adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy.packed_helpers import lora_model

from coalora import deploy


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    model, names, configs, adapters, scaling = lora_model()
    out = tmp_path_factory.mktemp("export") / "packed"
    deploy.save_packed(model, names, configs, adapters, out, scaling=scaling)
    return out
