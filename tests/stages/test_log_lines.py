"""What a run prints: the run directory first and last, each setup line once, no W&B
deprecation warning, no Lightning logging-interval warning under debug=limit."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf
from support import FIXTURES, REPO_ROOT

from coalora.data.lm import LMDataModule
from coalora.models import build_tokenizer
from tests.reliability.chaos import compose_run


def test_the_run_directory_is_the_first_and_the_last_thing_said(tmp_path, caplog):
    from coalora.stages.train import run

    run_dir = tmp_path / "run"
    cfg = compose_run(run_dir, tmp_path / "cache", ["method=lora", "trainer.max_steps=1",
                                                    "callbacks=minimal"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="coalora"):
        run(cfg)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("coalora")]
    assert ours[0] == f"run directory: {run_dir}"
    assert f"run directory: {run_dir}" in ours[-1] and "val/acc" in ours[-1]
    assert sum("steps in" in m for m in ours) <= 1  # one line carries the training time


def test_the_lm_task_line_is_logged_once(caplog):
    task = OmegaConf.load(REPO_ROOT / "conf" / "task" / "wikitext2.yaml")
    task.block_length, task.max_train_blocks, task.eval_blocks = 32, 8, 4
    tok = build_tokenizer(OmegaConf.load(REPO_ROOT / "conf" / "model" / "tiny_llama.yaml"))
    dm = LMDataModule(task, tok, str(FIXTURES), allow_hub=False)
    with caplog.at_level(logging.INFO, logger="coalora.data.lm"):
        dm.setup("fit")
        dm.setup("validate")  # Lightning's validate after fit
    assert sum("LM task" in r.getMessage() for r in caplog.records) == 1


def test_the_wandb_logger_passes_no_anonymous_setting(tmp_path, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "logger" / "wandb.yaml").wandb
    cfg = OmegaConf.create({**OmegaConf.to_container(cfg), "group": "g", "job_type": "j",
                            "tags": [], "save_dir": str(tmp_path)})  # fmt: skip
    logger = instantiate(cfg)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "coalora"


def test_debug_limit_logs_within_its_steps(compose):
    cfg = compose(["debug=limit"])
    assert cfg.trainer.log_every_n_steps <= cfg.trainer.val_check_interval
