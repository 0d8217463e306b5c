"""One process per run directory: a second train.py / evaluate.py aimed at a folder that a live
process holds stops with one line and writes nothing there (docs/reliability.md)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from coalora.errors import ConfigError
from coalora.stages.common import RUN_LOCK, run_dir_lock
from tests.reliability.chaos import ROOT, compose_run

FAST = ["method=lora", "trainer.max_steps=1", "trainer.val_check_interval=1", "callbacks=minimal",
        "data.batch_size=8", "data.eval_batch_size=16"]  # fmt: skip


def hold(run_dir: Path) -> int:
    """Lock ``run_dir`` the way a live run does (another open file description: a separate
    holder, as another process would be); returns the descriptor to close."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"train (pid 4242)")
    return fd


def test_a_second_train_into_a_held_run_dir_is_refused(tmp_path):
    from coalora.stages.train import run

    run_dir = tmp_path / "run"
    fd = hold(run_dir)
    try:
        with pytest.raises(ConfigError, match=r"is in use by train \(pid 4242\)") as e:
            run(compose_run(run_dir, tmp_path / "cache", FAST))
    finally:
        os.close(fd)
    assert "hydra.run.dir" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_LOCK]  # nothing of the run's
    # released: the same folder trains now, and the lock does not count as another run's file
    assert run(compose_run(run_dir, tmp_path / "cache", FAST))["global_step"] == 1


def test_a_second_evaluate_into_a_held_folder_is_refused(tmp_path):
    from hydra import compose, initialize_config_dir

    from coalora.stages.evaluate import run as evaluate
    from coalora.stages.train import run as train

    train(compose_run(tmp_path / "run", tmp_path / "cache", FAST))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt={tmp_path / 'run'}",
                                             f"paths.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    out = tmp_path / "eval"
    cfg.paths.output_dir = str(out)
    fd = hold(out)
    try:
        with pytest.raises(ConfigError, match="is in use by"):
            evaluate(cfg)
    finally:
        os.close(fd)
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK]
    assert evaluate(cfg)["rows"]


def test_the_lock_is_released_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError), run_dir_lock(tmp_path, "train"):
        raise RuntimeError("boom")
    os.close(hold(tmp_path))  # free again
