"""Test-suite helpers (tests only): run an entry point of this repository in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # tests/ -> the repository


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
