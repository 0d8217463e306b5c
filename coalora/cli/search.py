"""Pareto search over quantization configurations -> configset.json: see conf/search.yaml."""

from __future__ import annotations

from typing import TYPE_CHECKING

from coalora.cli import stage_app
from coalora.stages.entry import guarded

if TYPE_CHECKING:
    from omegaconf import DictConfig


@stage_app("search")
def main(cfg: DictConfig) -> None:
    from coalora.stages.search import run

    guarded(run, cfg)


if __name__ == "__main__":
    main()
