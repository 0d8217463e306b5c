"""Checkpoints that resume to the uninterrupted run (docs/reliability.md).

* :class:`LastCheckpoint` writes ``last.ckpt`` every N optimizer steps and after the final step,
  through the trainer's checkpoint I/O (atomic). ``last.ckpt`` is therefore always the latest
  step; a "best on dev" file, when wanted, is a separate ``ModelCheckpoint`` (``best.ckpt``).
* :class:`DeterministicResume` makes a run killed at any step and resumed from ``last.ckpt``
  continue exactly like the uninterrupted run: the checkpoint records how far into its epoch the
  training sampler was (the resumed epoch skips those batches instead of restarting the epoch's
  order), and the global torch generator (dropout masks) is re-seeded before every training
  batch from (seed, epoch, batch index, rank), so no random stream depends on what ran before
  the kill (validation, loader start-up, the process's history).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)

STATE_VERSION = 1


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """A well-mixed 63-bit seed for one training batch of one process."""
    ss = np.random.SeedSequence([int(seed) & (2**63 - 1), int(epoch), int(batch_idx), int(rank)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class DeterministicResume(L.Callback):
    """Sampler position in the checkpoint + per-batch seeding of the global torch generator.

    ``seed``: the run's seed (``${seed}``). ``reseed_every_batch``: seed the global generator
    before each training batch (needed for bit-identical resumes whenever anything random runs
    in the training step, e.g. dropout).
    """

    def __init__(self, seed: int, reseed_every_batch: bool = True) -> None:
        self.seed = int(seed)
        self.reseed_every_batch = bool(reseed_every_batch)
        self.epoch = 0
        self.batches = 0  # batches of ``epoch`` already trained on
        self._trainer: L.Trainer | None = None

    @property
    def state_key(self) -> str:
        return "DeterministicResume"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # setup runs before a checkpoint is restored

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.reseed_every_batch:
            torch.manual_seed(
                batch_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # runs before the checkpoint callbacks of this batch (Lightning calls those last)
        self.epoch, self.batches = trainer.current_epoch, batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            log.warning("checkpoint has no usable sampler position; the epoch restarts")
            return
        if int(state["seed"]) != self.seed:
            log.warning(
                "resuming with seed=%s from a checkpoint of seed=%s: the run will not match "
                "the uninterrupted one",
                self.seed,
                state["seed"],
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "resume_position"):
            log.warning("the datamodule cannot resume mid-epoch; epoch %d restarts", self.epoch)
            return
        if trainer.world_size > 1 and self.batches:
            log.warning(
                "mid-epoch resume with %d processes restarts epoch %d (the distributed sampler "
                "has no position)",
                trainer.world_size,
                self.epoch,
            )
            return
        dm.resume_position = (self.epoch, self.batches)


class LastCheckpoint(Checkpoint):
    """``<dirpath>/<filename>.ckpt`` every ``every_n_train_steps`` optimizer steps, after the
    last step (``trainer.max_steps``), when training ends for any other reason (epoch limit,
    early stopping) and on SIGTERM; always the latest step. Written through the trainer (atomic
    checkpoint I/O).
    """

    def __init__(
        self, dirpath: str | Path, filename: str = "last", every_n_train_steps: int = 50
    ) -> None:
        if int(every_n_train_steps) < 1:
            raise ValueError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps} must be >= 1"
            )
        self.dirpath = Path(dirpath)
        self.filename = str(filename)
        self.every_n_train_steps = int(every_n_train_steps)
        self.saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint[{self.filename}]"

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self.saved_step or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # full state: resumable
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if step % self.every_n_train_steps == 0 or final:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """On SIGTERM (Lightning stops between two training batches) save the step reached, so
        a scheduler's pre-emption leaves a resumable ``last.ckpt``. Other exceptions save
        nothing: the state may be half-way through a step."""
        from lightning.pytorch.trainer.states import RunningStage
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.stage == RunningStage.TRAINING:
            self._save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"saved_step": self.saved_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved_step = int(state.get("saved_step", -1))


__all__ = ["DeterministicResume", "LastCheckpoint", "batch_seed"]
