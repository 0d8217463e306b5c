"""Export a trained run as a PEFT LoRA adapter for one configuration: see conf/export.yaml."""

import hydra
from omegaconf import DictConfig

from coalora.stages.entry import guarded


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from coalora.stages.export import run

    guarded(run, cfg)


if __name__ == "__main__":
    main()
