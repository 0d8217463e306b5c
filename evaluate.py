"""Evaluate a trained run at any budget (zero-cost adaptation): see conf/evaluate.yaml."""

import hydra
from omegaconf import DictConfig

from coalora.stages.entry import guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from coalora.stages.evaluate import run

    guarded(run, cfg)


if __name__ == "__main__":
    main()
