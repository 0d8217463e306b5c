"""What a method may use to build itself, and the one owner of "the configurations of this run".

:class:`MethodContext` is assembled by ``coalora.stages.build.method_context``. Besides the target
names, layer structure, seed and data it answers two questions for every caller (the methods'
bases, pools and evaluation sets, evaluate.py, export.py, search.py, the scripts):

* :meth:`MethodContext.sensitivity` — the run's loss-aware sensitivity (``quant.sensitivity``;
  ``coalora.quant.sensitivity``), computed once per context and cached on disk;
* :meth:`MethodContext.allocations` — the configuration at each budget: the one the run recorded
  in its ``allocations.json`` (``coalora.quant.record``) when it recorded that budget, else the
  allocation recomputed with the run's own space, solver and sensitivity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from coalora.errors import ConfigError
from coalora.quant import QuantSettings, QuantSpace, model_weights
from coalora.quant.build import Allocation, solve_allocations
from coalora.quant.record import RunRecord
from coalora.quant.sensitivity import Sensitivity, fisher_sensitivity, is_full_precision

log = logging.getLogger(__name__)

Batch = dict[str, Tensor]


@dataclass
class MethodContext:
    """What a method may use to build itself (assembled by ``coalora.stages.build``)."""

    names: list[str]  # target module names, named_modules() order
    quant: QuantSettings
    seed: int = 0
    model_name: str = "model"
    task_name: str = "task"
    positions: list[int] = field(default_factory=list)  # block index of each target layer
    module_types: list[str] = field(default_factory=list)  # module type of each target layer
    num_layers: int = 0  # blocks of the model (the mapper's position vocabulary)
    head_modules: list[str] = field(default_factory=lambda: ["classifier", "score"])
    batch_size: int = 32  # training batch size (Fisher example counts)
    # (n_batches, seed, batch_size | None) -> fixed training-split batches; None without data
    calibration: Callable[..., list[Batch]] | None = None
    cache_dir: Path | None = None
    run_dir: Path | None = None
    # a fresh full-precision backbone: the Fisher of a run whose targets are already quantized
    fp_model: Callable[[], nn.Module] | None = None
    # the configurations the run recorded (allocations.json), when restoring or resuming it
    record: RunRecord | None = None
    _sensitivities: dict[tuple[str, int], Sensitivity] = field(default_factory=dict, repr=False)

    def calibration_batches(self, n: int, seed: int, batch_size: int | None = None) -> list[Batch]:
        if self.calibration is None:
            raise ConfigError("this step needs the task's training data (calibration batches)")
        return self.calibration(n, seed=seed, batch_size=batch_size)

    @property
    def table_cache_dir(self) -> Path | None:
        """Where error tables, sensitivities and allocations are cached (``quant.table_cache``)."""
        return self.cache_dir if self.quant.table_cache else None

    # ---------------------------------------------------------------- sensitivity
    def sensitivity(
        self,
        model: nn.Module | None = None,
        kind: str | None = None,
        examples: int | None = None,
    ) -> Sensitivity | None:
        """The ``kind`` (default ``quant.sensitivity``) sensitivity of the target weights on
        ``examples`` (default ``quant.sensitivity_examples``) training examples; None for
        ``none``. Once per context; on disk once per (model, task, examples, seed, weights, data).

        ``model`` is the run's model: its full-precision weights key the cache; the Fisher itself
        is computed on it while it is still full precision, else on ``fp_model()``.
        """
        kind = kind or self.quant.sensitivity
        if kind == "none":
            return None
        n = int(examples or self.quant.sensitivity_examples)
        if (kind, n) in self._sensitivities:
            return self._sensitivities[(kind, n)]
        if model is None and self.fp_model is None:
            raise ConfigError(f"quant.sensitivity={kind} needs the run's model; none was given")
        weights = None if model is None else model_weights(model, self.names)
        if model is not None and is_full_precision(model, self.names):
            source: nn.Module | Callable[[], nn.Module] = model
        elif self.fp_model is not None:
            source = self.fp_model
        else:
            raise ConfigError(
                f"quant.sensitivity={kind}: the model's targets are quantized and no "
                "full-precision model can be built to compute the Fisher from"
            )
        sens = fisher_sensitivity(
            source, self.names, examples=n, seed=self.quant.fisher_seed(self.seed),
            model_name=self.model_name, task_name=self.task_name, calibration=self.calibration,
            cache_dir=self.table_cache_dir, weights=weights,
        )  # fmt: skip
        self._sensitivities[(kind, n)] = sens
        return sens

    def sensitivity_record(self) -> dict:
        """What the run records about its sensitivity (kind, examples, seed, key digest)."""
        q = self.quant
        if q.sensitivity == "none":
            return {"kind": "none"}
        out = {
            "kind": q.sensitivity,
            "examples": q.sensitivity_examples,
            "seed": q.fisher_seed(self.seed),
        }
        sens = self._sensitivities.get((q.sensitivity, q.sensitivity_examples))
        if sens is not None:
            out.update(sens.describe())
        elif self.record is not None:
            out.update({k: v for k, v in self.record.sensitivity.items() if k in ("digest", "key")})
        return out

    # ---------------------------------------------------------------- configurations
    def allocations(
        self, model: nn.Module, budgets: Iterable[float], space: QuantSpace | None = None
    ) -> dict[float, Allocation]:
        """The configuration at each budget for this run (budget -> :class:`Allocation`).

        A budget the run recorded is read from its record (``source="recorded"``); any other is
        allocated with the run's ``quant.solver`` and sensitivity over ``space`` (default
        ``quant.space``; a narrower space never reads the record) through the disk cache.
        """
        budgets = [float(b) for b in budgets]
        space = space or self.quant.space
        recorded = self.record.allocations if (self.record and space == self.quant.space) else {}
        out = {b: recorded[b] for b in budgets if b in recorded}
        missing = [b for b in budgets if b not in out]
        if out:
            where = self.record.path if self.record else ""
            log.info("allocations at %s bits: recorded in %s", [f"{b:g}" for b in out], where)
        if missing:
            weights = model_weights(model, self.names)
            solved = solve_allocations(
                weights, missing, space, self.table_cache_dir, self.model_name,
                self.quant.solver, self.sensitivity(model),
            )  # fmt: skip
            out.update(solved)
        return {b: out[b] for b in budgets}


__all__ = ["Batch", "MethodContext"]
