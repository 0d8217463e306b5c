"""Pareto search over quantization configurations -> configset.json: see conf/search.yaml."""

import hydra
from omegaconf import DictConfig

from coalora.stages.entry import guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    from coalora.stages.search import run

    guarded(run, cfg)


if __name__ == "__main__":
    main()
