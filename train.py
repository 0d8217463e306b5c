"""Train an adapter on a (quantized) transformer: ``python train.py [group=option ...]``."""

import hydra
from omegaconf import DictConfig

from coalora.stages.entry import guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from coalora.stages.train import run

    guarded(run, cfg)


if __name__ == "__main__":
    main()
