"""scripts/gpu_check.sh: its arguments, and (slow) the whole check as a CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip


def test_help_and_bad_arguments_are_one_line():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    h = run("--help")
    assert h.returncode == 0 and "--dry-run" in h.stdout and "pytest -m gpu" in h.stdout
    for args, needle in (
        (["--bogus"], "unknown argument --bogus"),
        (["--steps", "x"], "--steps=x"),
    ):
        r = run(*args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.slow
def test_dry_run_passes_every_step_on_the_cpu(tmp_path):
    r = run("--dry-run", "--out", str(tmp_path / "out"), env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["passed"] and res["dry_run"] and res["model"] == "tiny_llama"
    assert [s["step"] for s in res["steps"]] == [
        "env", "torch", "deps", "tests", "qlora", "coalora", "logits"]  # fmt: skip
    assert res["logits"]["max_abs_diff_fp32"] <= 1e-4 * max(
        1.0, res["logits"]["max_abs_logit_fp32"]
    )
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what a device run sends back
