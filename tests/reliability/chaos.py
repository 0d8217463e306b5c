"""Helpers of the chaos tests: compose a tiny_bert run, and a callback that kill -9s its own
process at a given step (after that step's checkpoint is on disk)."""

from __future__ import annotations

import json
import os
import signal as signal_module
import sys
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[2]


class KillAtStep(L.Callback):
    """Send ``signal`` (default SIGKILL) to this process when training is about to run optimizer
    step ``step + 1``."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step = int(step)
        self.signal = getattr(signal_module, signal)
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signal)


def compose_run(run_dir: str | Path, cache_dir: str | Path, overrides: list[str]):
    """The train config of a run writing into ``run_dir`` (Hydra's compose API): tiny_bert unless
    ``overrides`` name another ``model=``."""
    from hydra import compose, initialize_config_dir

    model = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny_bert"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *model,
                f"paths.data_dir={ROOT / 'tests' / 'fixtures'}",
                f"paths.cache_dir={cache_dir}",
                f"paths.log_dir={Path(run_dir).parent / 'logs'}",
                "data.allow_hub=false",
                "logger=csv",
                *overrides,
            ],
        )
    cfg.paths.output_dir = str(run_dir)
    return cfg


def main() -> None:
    """``python chaos.py <run_dir> <cache_dir> <json overrides>``: one training run."""
    from coalora.stages.entry import guarded
    from coalora.stages.train import run

    guarded(run, compose_run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
