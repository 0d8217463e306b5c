"""Paper mode: re-run the Pareto search between epochs with the live model and train on its
selection (CoA-LoRA, arXiv 2509.25214 §4.3; docs/search.md).

Every ``every_n_epochs`` epochs the callback scores configurations with the model being trained
(its current adapters, mapper and head, on fixed calibration batches), runs the same search
session as ``search.py`` (:func:`coalora.search.session.run_session`), and swaps the method's
training set for the segmented Pareto selection (``method.set_training_set``). The search starts from the method's initial pool
(``method.pool``) plus the current training set, all scored afresh with the current weights, so
no loss in one search comes from an earlier adapter state.

Logged: ``search/hypervolume`` and ``search/train_set_size``. Written (rank 0):
``<run dir>/configset_epoch{N}.json``. The selected set is part of the callback's checkpoint state,
so a resumed run trains on what the interrupted one selected. Every rank runs the (deterministic)
search so all ranks train on the same set.

Enable with ``method.search_refresh_every_n_epochs=1``; search settings: ``method.search_refresh.*``
(the ``search`` group; its ``pool`` is not used — the refresh starts from ``method.pool``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from coalora.errors import ConfigError
from coalora.quant.model import model_weights
from coalora.search.configset import ConfigSet
from coalora.search.objectives import CalibrationObjective, require_switching
from coalora.search.pool import PoolGrid, initial_pool
from coalora.search.session import pool_with_training_set, run_session
from coalora.search.settings import SearchSettings

log = logging.getLogger(__name__)


class SearchRefreshCallback(Callback):
    def __init__(self, every_n_epochs: int, search_cfg: DictConfig | dict[str, Any]) -> None:
        if (
            not isinstance(every_n_epochs, int)
            or isinstance(every_n_epochs, bool)
            or (every_n_epochs < 1)
        ):
            raise ConfigError(
                f"method.search_refresh_every_n_epochs={every_n_epochs!r} must be an integer >= 1 "
                "(or null to disable)"
            )
        self.every = every_n_epochs
        self.search_cfg = (
            OmegaConf.create(search_cfg) if isinstance(search_cfg, dict) else search_cfg
        )
        self.history: list[dict[str, Any]] = []
        self.last_configset: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self.settings: SearchSettings | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_switching(pl_module.method, "method.search_refresh_every_n_epochs")
        self.settings = SearchSettings.from_cfg(
            self.search_cfg, pl_module.method.space, check_pool=False
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:  # resumed: train on what the interrupted run selected
            method = pl_module.method
            cs = ConfigSet.from_dict(
                self._pending,
                expected_names=method.names,
                space=method.space,
                where="search refresh state",
            )
            method.set_training_set(cs.to_model_configs())
            self._pending = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # epochs completed
        if epoch % self.every == 0 and not _last_epoch(trainer, epoch):
            self.refresh(pl_module, epoch, trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "configset": self.last_configset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.last_configset = state.get("configset")
        self._pending = self.last_configset

    # ------------------------------------------------------------------ the refresh
    def refresh(self, lit: L.LightningModule, epoch: int, trainer: L.Trainer | None = None):
        """Search with the live model; swap the training set; log and save. Returns the result."""
        method, ctx = lit.method, lit.ctx
        if self.settings is None:
            self.setup(trainer, lit, "fit")
        s = self.settings
        seed = int(ctx.seed)
        batches = ctx.calibration_batches(s.calib_batches, seed, s.calib_batch_size)
        objective = CalibrationObjective(lit.model, method, batches)
        weights = model_weights(lit.model, method.names)
        pool, _ = initial_pool(
            weights,
            method.space,
            PoolGrid.from_cfg(method.cfg.pool, "method.pool"),
            ctx.table_cache_dir,
            ctx.model_name,
            ctx.quant.solver,
            sensitivity=ctx.sensitivity(lit.model),  # the run's: the pool it trained on
        )
        initial, sources = pool_with_training_set(pool, method.train_set)
        rank_zero = trainer is None or trainer.is_global_zero
        session = run_session(
            objective, initial, sources, method.space, s, seed=seed, search_seed=seed + epoch,
            provenance=dict(
                model=ctx.model_name, task=ctx.task_name, kind="search refresh", epoch=epoch,
                init=method.init.mode,
                search=OmegaConf.to_container(self.search_cfg, resolve=True),
            ),
            record_reference=False,
            run_dir=Path(ctx.run_dir) if ctx.run_dir and rank_zero else None,
            configset_name=f"configset_epoch{epoch}.json",
        )  # fmt: skip
        result, selected = session.result, session.selected
        if selected:
            method.set_training_set(selected)
            self.last_configset = session.selection().to_dict()
        else:
            log.warning(
                "search refresh at epoch %d selected nothing in bits %s; training set kept",
                epoch,
                s.bits_range,
            )
        record = {
            "epoch": epoch,
            "hypervolume": result.hypervolume[-1],
            "train_set_size": len(method.train_set),
            "observations": len(result.observations),
        }
        self.history.append(record)
        if trainer is not None:
            lit.log_dict(
                {
                    "search/hypervolume": float(record["hypervolume"]),
                    "search/train_set_size": float(record["train_set_size"]),
                },
                on_step=False,
                on_epoch=True,
            )
        log.info(
            "search refresh (epoch %d): %d observations, hypervolume %.5g, training set %d",
            epoch,
            record["observations"],
            record["hypervolume"],
            record["train_set_size"],
        )
        return result


def _last_epoch(trainer: L.Trainer, epoch: int) -> bool:
    """No training follows this epoch (a refresh would select a set nothing trains on)."""
    if trainer.should_stop:
        return True
    if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
        return True
    return trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch
