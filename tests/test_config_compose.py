"""Every option of every config group composes, for each entry config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "model",
    "task",
    "method",
    "quant",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
]
# launchers are registered by Hydra and its plugins (no yaml of ours: Hydra would warn that our
# file shadows the plugin's schema)
LAUNCHERS = ["basic", "joblib", "submitit_slurm"]
ENTRY_CONFIGS = [p.stem for p in CONF.glob("*.yaml")]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), f"conf/{g} has no options"


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_resolves(compose, group, option):
    overrides = [f"{group}={option}"]
    if group == "method" and option in ("lora",):
        overrides.append("quant=none")
    cfg = compose(overrides)
    # everything except Hydra's runtime-only values resolves
    cfg.paths.output_dir = "/tmp/coalora-compose"
    if group != "experiment":  # experiments are @package _global_ bundles of overrides
        assert cfg[group] is not None
    for key in ("model", "task", "method", "quant", "trainer", "optim", "data"):
        OmegaConf.to_container(cfg[key], resolve=True)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launchers_compose(compose, launcher):
    cfg = compose([f"hydra/launcher={launcher}"])
    assert launcher.split("_")[0] in cfg.hydra.launcher._target_.lower()


@pytest.mark.parametrize("name", ENTRY_CONFIGS)
def test_entry_configs_compose(compose, name):
    cfg = compose([], config_name=name)
    assert "paths" in cfg


def test_default_job_is_minilm_sst2(compose):
    cfg = compose([])
    assert cfg.model.name == "minilm_l6" and cfg.task.name == "sst2"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"


def test_method_defaults_override_trainer_and_quant_but_cli_wins(compose):
    cfg = compose(["method=coalora"])
    assert cfg.trainer.max_steps == 1000 and cfg.method.name == "coalora"
    cfg = compose(["method=coalora", "trainer.max_steps=7"])
    assert cfg.trainer.max_steps == 7
    cfg = compose(["method=qlora"])
    assert cfg.quant.mode == "nf4" and cfg.trainer.max_steps == 2000
    cfg = compose(["method=qlora", "quant=budget", "quant.budget=2.5"])
    assert cfg.quant.mode == "budget" and cfg.quant.budget == 2.5


@pytest.mark.parametrize("model", options("model"))
def test_each_model_declares_its_quant_storage_and_the_command_line_wins(compose, model):
    cfg = compose([f"model={model}", "method=qlora"])
    # packed for the large models and decoders (measured on SmolLM2), dense copies for the small
    # encoders and the test models (docs/packed.md, "Default storage")
    small = model in ("minilm_l6", "tiny_bert", "tiny_llama")
    assert cfg.quant.storage == ("dequantized" if small else "packed")
    other = "packed" if small else "dequantized"
    assert compose([f"model={model}", f"quant.storage={other}"]).quant.storage == other


@pytest.mark.parametrize("model", options("model"))
def test_each_model_declares_its_quant_sensitivity_and_the_command_line_wins(compose, model):
    cfg = compose([f"model={model}", "method=coalora"])
    # Fisher-weighted allocations for the decoders (measured on SmolLM2), the squared error for
    # the encoders and the test models (docs/quantization.md, "Sensitivity")
    decoder = cfg.model.get("kind") == "decoder" and not model.startswith("tiny")
    assert cfg.quant.sensitivity == ("fisher" if decoder else "none")
    assert cfg.quant.fisher is None and cfg.quant.sensitivity_examples == 64
    other = "none" if decoder else "fisher"
    assert compose([f"model={model}", f"quant.sensitivity={other}"]).quant.sensitivity == other


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("method", ["coalora", "shared_lora"])
def test_each_model_family_has_its_shared_init_and_the_command_line_wins(compose, model, method):
    cfg = compose([f"model={model}", f"method={method}"])
    # lq for the decoders (SmolLM2 CoA-LoRA screen), zero for the encoders and the test models
    # (MiniLM-L6 + SST-2; docs/methods.md, "Quantization-aware initialisation")
    decoder = cfg.model.get("kind") == "decoder" and not model.startswith("tiny")
    assert cfg.method.init == ("lq" if decoder else "zero")
    assert compose([f"model={model}", f"method={method}", "method.init=lpq"]).method.init == "lpq"
