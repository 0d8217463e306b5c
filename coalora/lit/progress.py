"""Progress display: a Rich bar on a terminal, plain log lines everywhere else.

Off a terminal (``tee``, ``nohup``, SLURM/submitit) a Rich bar never refreshes, so nothing shows
between start-up and the end. :func:`progress_bar` picks the Rich bar when the stream is a TTY and
:class:`LineProgressBar` otherwise; the latter logs one line every ``every_n_steps`` optimizer
steps (step/total, loss, s/step, ETA) and one line per validation pass, through ``logging`` so
that the run's ``train.log`` records them too.

:class:`StepAwareRichProgressBar`: Lightning's bar prints ``Epoch 0/-2`` when ``max_epochs=-1``
(our default: training is bounded by ``trainer.max_steps``); this one prints ``Epoch 0`` then, and
``Epoch 0/2`` when epochs bound it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, TextIO

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from coalora.errors import ConfigError

log = logging.getLogger("coalora.progress")


class StepAwareRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        width = len(self.validation_description)
        return f"{description:{width}}" if width > len(description) else description


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m15s`` or ``42s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _number(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.4g}"


class LineProgressBar(ProgressBar):
    """One log line every ``every_n_steps`` optimizer steps, one per validation pass.

    ``train step 50/300 (17%) | train/loss 0.6931 | 0.84 s/step | ETA 3m30s``; the wall-clock
    numbers are for display only and never enter a result.
    """

    def __init__(self, every_n_steps: int = 50, logger: logging.Logger | None = None) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise ValueError(f"progress every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = int(every_n_steps)
        self._logger = logger or log
        self._enabled = True
        self._t_fit: float | None = None
        self._step_fit0 = 0
        self._last_step = -1
        self._t_val: float | None = None

    # -------------------------------------------------------------- ProgressBar API
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._logger.info(" ".join(str(a) for a in args))

    # -------------------------------------------------------------- helpers
    def _emit(self, trainer, message: str) -> None:
        if self._enabled and trainer.is_global_zero:
            self._logger.info(message)

    def _total_steps(self, trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    # -------------------------------------------------------------- training
    def on_train_start(self, trainer, pl_module) -> None:
        self._t_fit = time.perf_counter()
        self._step_fit0 = int(trainer.global_step)
        self._last_step = int(trainer.global_step)
        total = self._total_steps(trainer)
        self._emit(trainer, f"training: {total if total else '?'} steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        total = self._total_steps(trainer)
        if step == self._last_step or not (step % self.every_n_steps == 0 or step == total):
            return
        self._last_step = step
        elapsed = time.perf_counter() - (self._t_fit or time.perf_counter())
        done = max(1, step - self._step_fit0)
        per_step = elapsed / done
        parts = [f"train step {step}/{total}" if total else f"train step {step}"]
        if total:
            parts[0] += f" ({100 * step / total:.0f}%)"
        metrics = self.get_metrics(trainer, pl_module)
        parts += [f"{k} {_number(v)}" for k, v in metrics.items() if k.startswith("train/")]
        parts.append(f"{per_step:.2f} s/step")
        if total:
            parts.append(f"ETA {_duration(per_step * (total - step))}")
        self._emit(trainer, " | ".join(parts))

    def on_train_end(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - (self._t_fit or time.perf_counter())
        self._emit(trainer, f"training done: {trainer.global_step} steps in {_duration(elapsed)}")

    # -------------------------------------------------------------- validation
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._t_val = time.perf_counter()
        batches = self.trainer.num_val_batches
        n = sum(batches) if isinstance(batches, list) else batches
        self._emit(trainer, f"validation at step {trainer.global_step}: {n} batches")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        elapsed = time.perf_counter() - (self._t_val or time.perf_counter())
        values = {k: v for k, v in trainer.callback_metrics.items() if str(k).startswith("val/")}
        shown = ", ".join(f"{k} {_number(v)}" for k, v in sorted(values.items()))
        self._emit(
            trainer,
            f"validation at step {trainer.global_step} ({_duration(elapsed)}): {shown or '-'}",
        )


def is_terminal(stream: TextIO | None) -> bool:
    """True when ``stream`` (default ``sys.stdout``) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    leave: bool = True,
    every_n_steps: int = 50,
    line_mode: str = "auto",
    stream: TextIO | None = None,
) -> ProgressBar:
    """The progress callback for ``conf/callbacks``: Rich on a terminal, log lines otherwise.

    ``line_mode``: ``auto`` (decide from ``stream``, default stdout), ``always`` or ``never``.
    """
    if line_mode not in ("auto", "always", "never"):
        raise ConfigError(
            f"callbacks.progress_bar.line_mode={line_mode!r} is not allowed; "
            "allowed: ['auto', 'always', 'never']"
        )
    lines = line_mode == "always" or (line_mode == "auto" and not is_terminal(stream))
    if lines:
        return LineProgressBar(every_n_steps=every_n_steps)
    return StepAwareRichProgressBar(leave=leave)
