"""Search-test fixtures: a small model layout, random configurations, a synthetic objective."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from coalora.quant.config import ModelQuantConfig, QuantSpace

# botorch's fused qLogEHVI kernel is JIT-compiled on first use (~1 min); tests use the torch path
os.environ.setdefault("COALORA_LOGEI_FUSED", "0")


@dataclass(frozen=True)
class Layout:
    names: list[str]
    numels: dict[str, int]

    def random_configs(self, space: QuantSpace, n: int, seed: int = 0) -> list[ModelQuantConfig]:
        g = torch.Generator().manual_seed(seed)
        opts = space.options()
        out = []
        for _ in range(n):
            idx = torch.randint(len(opts), (len(self.names),), generator=g).tolist()
            out.append(ModelQuantConfig({m: opts[i] for m, i in zip(self.names, idx)}, self.numels))
        return out


@pytest.fixture()
def layout() -> Layout:
    names = [f"encoder.layer.{i}.dense" for i in range(4)]
    return Layout(names, {n: 1024 * (i + 1) for i, n in enumerate(names)})


@pytest.fixture()
def space() -> QuantSpace:
    return QuantSpace()
