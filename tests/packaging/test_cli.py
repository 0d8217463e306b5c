"""``coalora <stage>`` composes the same configuration as the root scripts from any directory;
bad stage names are one line."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["train", "evaluate", "export", "search", "compare"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -S <args>`` on this checkout, then this interpreter's site-packages: no .pth
    files, so an editable install of another checkout cannot supply a missing module."""
    path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("PROJECT_ROOT", None)
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_coalora_train_from_another_directory_composes_what_train_py_does(tmp_path):
    ours = run(["-m", "coalora.cli", "train", "method=qlora", "--cfg", "job"], tmp_path)
    assert ours.returncode == 0, ours.stderr[-2000:]
    theirs = run(["train.py", "method=qlora", "--cfg", "job"], ROOT)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert ours.stdout == theirs.stdout
    assert "name: qlora" in ours.stdout


@pytest.mark.parametrize("stage", STAGES[1:])
def test_every_stage_is_a_hydra_app_named_after_itself(stage, tmp_path):
    out = run(["-m", "coalora.cli", stage, "--cfg", "hydra", "--package", "hydra.job"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"name: {stage}\n" in out.stdout


def test_unknown_or_missing_stage_is_one_line(tmp_path):
    bad = run(["-m", "coalora.cli", "trian"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: unknown stage 'trian'; allowed: {STAGES}"
    assert run(["-m", "coalora.cli"], tmp_path).returncode == 2
    usage = run(["-m", "coalora.cli", "--help"], tmp_path)
    assert usage.returncode == 0 and all(s in usage.stdout for s in STAGES)
