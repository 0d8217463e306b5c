"""Test-suite helpers (tests only): run an entry point of this repository in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # tests/ -> the repository
FIXTURES = REPO_ROOT / "tests" / "fixtures"
# tiny_llama on the fixture WikiText-2: short blocks, a few batches (decoder stage tests)
TINY_LM = [
    "model=tiny_llama",
    "task=wikitext2",
    f"paths.data_dir={FIXTURES}",
    "data.allow_hub=false",
    "task.block_length=32",
    "task.max_train_blocks=16",
    "task.eval_blocks=4",
    "data.batch_size=2",
    "data.eval_batch_size=4",
]


def run_entry(
    script: str,
    args: list[str],
    cache_dir: str | Path,
    extra_env: dict | None = None,
    timeout: int = 400,
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from the repository root with W&B disabled, the hub offline and
    derived artifacts cached in ``cache_dir``."""
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "COALORA_CACHE_DIR": str(cache_dir),
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
