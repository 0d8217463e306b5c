"""The search's loss objective: task loss of a configuration on fixed calibration batches
(CoA-LoRA, arXiv 2509.25214 §4.3: the second objective next to average bits; docs/search.md).

Every configuration of one search is scored on the *same* batches with the *same* weights, so
losses are comparable across candidates and belong to the adapter being trained:

* with a trained CoA-LoRA / Shared-LoRA run: its adapters, mapper and head,
* without one: the quantized base with freshly built adapters (B = 0: identity) and a seeded fresh
  head — the paper's starting point, useful before anything is trained,
* in training (``coalora.lit.search_refresh``): the live model.

(``coalora.stages.search`` builds the first two.) Scoring switches the base through the method's
dequantization cache (``method.configured``: a lookup after first use, plus the mapper call for
CoA-LoRA); the model is never rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from coalora.errors import ConfigError
from coalora.quant import ModelQuantConfig


def require_switching(method: Any, where: str) -> None:
    """The objective needs a method whose adapter serves any configuration."""
    if not getattr(method, "switches_configs", False):
        name = getattr(method, "name", type(method).__name__)
        raise ConfigError(
            f"{where}: method {name} trains one fixed configuration; the search objective needs "
            "a method that switches configurations (method=coalora or method=shared_lora)"
        )


class CalibrationObjective:
    """``objective(config) -> loss``: mean task loss over fixed batches, eval mode, no grad.

    ``seconds`` records the wall time of every call (base switch + mapper + forwards).
    """

    def __init__(self, model: nn.Module, method: Any, batches: Sequence[dict[str, torch.Tensor]]):
        if not batches:
            raise ConfigError("the calibration objective needs at least one batch")
        require_switching(method, "search objective")
        self.model = model
        self.method = method
        device = next(model.parameters()).device
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self.seconds: list[float] = []

    @property
    def names(self) -> list[str]:
        return list(self.method.names)

    @property
    def numels(self) -> dict[str, int]:
        return dict(self.method.numels)

    @property
    def in_features(self) -> dict[str, int] | None:
        """Each target layer's input width (the GGUF row rule), when the base is quantized."""
        layers = getattr(self.method, "qlayers", None) or {}
        return {n: layer.in_features for n, layer in layers.items()} or None

    @torch.no_grad()
    def __call__(self, config: ModelQuantConfig) -> float:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            with self.method.configured(self.model, config):
                for batch in self.batches:
                    total += float(self.model(**batch).loss)
        finally:
            self.model.train(was_training)
        self.seconds.append(time.perf_counter() - t0)
        return total / len(self.batches)


def calibration_batches(dm: Any, search: Any, seed: int) -> list[dict[str, torch.Tensor]]:
    """``search.calib_batches`` fixed training batches drawn with the run's seed."""
    return dm.calibration_batches(
        int(search.calib_batches), seed=int(seed), batch_size=int(search.calib_batch_size)
    )
