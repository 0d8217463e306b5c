"""Train an adapter on a (quantized) transformer: ``coalora-train [group=option ...]``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from coalora.cli import stage_app
from coalora.stages.entry import guarded

if TYPE_CHECKING:
    from omegaconf import DictConfig


@stage_app("train")
def main(cfg: DictConfig) -> None:
    from coalora.stages.train import run

    guarded(run, cfg)


if __name__ == "__main__":
    main()
