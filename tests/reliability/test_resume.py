"""Chaos test: kill -9 at a random step, resume from last.ckpt, get the uninterrupted run.

tiny_bert on the 64-row SST-2 fixture and tiny_llama on 64 WikiText-2 blocks, batch 8 (8 batches
per epoch), 20 steps: the kill lands
mid-epoch in epoch 0, 1 or 2. Dropout is active (BERT's hidden dropout 0.1). Tolerance: final
trainable weights within 1e-6 (absolute) and equal validation metrics; on one CPU thread they
come out bit-identical.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability.chaos import ROOT, compose_run

STEPS = 20
COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "callbacks=minimal",
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.group_by_length=true",
]


def train(run_dir: Path, cache: Path, extra: list[str]) -> dict:
    from coalora.stages.train import run

    return run(compose_run(run_dir, cache, [*COMMON, *extra]))


def trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for path in run_dir.glob("csv/**/metrics.csv"):
        for row in csv.DictReader(open(path)):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def kill_at(
    step: int, run_dir: Path, cache: Path, extra: list[str], sig: str = "SIGKILL"
) -> subprocess.CompletedProcess:
    kill = [
        "+callbacks.kill._target_=tests.reliability.chaos.KillAtStep",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.signal={sig}",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/reliability/chaos.py"),
            str(run_dir),
            str(cache),
            json.dumps([*COMMON, *extra, *kill]),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


SEED = int(os.environ.get("COALORA_CHAOS_SEED", "0"))


@pytest.mark.parametrize(
    "seed,method",
    [
        (SEED, ["method=lora", "method.dropout=0.1"]),
        pytest.param(  # a decoder: 64 WikiText-2 blocks, 8 batches per epoch like tiny_bert
            SEED,
            [
                "model=tiny_llama",
                "task=wikitext2",
                "task.block_length=32",
                "task.max_train_blocks=64",
                "task.eval_blocks=4",
                "method=lora",
                "method.dropout=0.1",
            ],
            id="tiny_llama",
        ),  # fmt: skip
        pytest.param(
            SEED,
            [
                "method=coalora",
                "method.dropout=0.1",
                "method.pool.step=0.5",
                "method.eval_budgets=[3.0]",
            ],
            marks=pytest.mark.slow,
            id="coalora",
        ),
    ],
)
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, seed, method):
    k = random.Random(seed).choice([s for s in range(3, STEPS - 2) if s % 8])  # mid-epoch
    cache = tmp_path / "cache"
    full = train(tmp_path / "full", cache, method)
    assert full["global_step"] == STEPS

    killed = kill_at(k, tmp_path / "killed", cache, method)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == k

    resumed = train(tmp_path / "resumed", cache, [*method, f"ckpt_path={last}"])
    assert resumed["global_step"] == STEPS

    a = trainable(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = trainable(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and a
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= 1e-6, f"killed at step {k}: weights differ by up to {worst}"
    assert resumed["metrics"] == pytest.approx(full["metrics"], abs=1e-6)
    before, after = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert {s: after[s] for s in after if s > k} == pytest.approx(
        {s: before[s] for s in before if s > k}, abs=1e-6
    )


def test_finished_run_last_ckpt_is_the_last_step(tmp_path):
    """last.ckpt = the final step even when it is not a multiple of every_n_train_steps, and the
    best-on-dev checkpoint is a separate file."""
    out = train(
        tmp_path / "run",
        tmp_path / "cache",
        [
            "method=lora",
            "trainer.max_steps=7",
            "callbacks=default",
            "~callbacks.progress_bar",
            "callbacks.last_checkpoint.every_n_train_steps=5",
            "trainer.val_check_interval=2",
        ],
    )
    ckpts = tmp_path / "run" / "checkpoints"
    assert out["global_step"] == 7
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 7
    best = torch.load(ckpts / "best.ckpt", weights_only=True)["global_step"]
    assert best in (2, 4, 6)  # written at a validation, never confused with last.ckpt
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_sigterm_leaves_a_resumable_last_ckpt(tmp_path):
    """SIGTERM during step k+1: Lightning finishes that batch and stops; last.ckpt holds step
    k+1 although no periodic save was due, and resuming from it gives the uninterrupted run."""
    k, cache, method = 6, tmp_path / "cache", ["method=lora", "method.dropout=0.1"]
    rare = ["callbacks.last_checkpoint.every_n_train_steps=100"]
    stopped = kill_at(k, tmp_path / "stopped", cache, [*method, *rare], sig="SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]  # not success: 128 + SIGTERM
    assert "stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == k + 1
    full = train(tmp_path / "full", cache, [*method, *rare])
    resumed = train(tmp_path / "resumed", cache, [*method, *rare, f"ckpt_path={last}"])
    a = trainable(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = trainable(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6
    assert resumed["metrics"] == pytest.approx(full["metrics"], abs=1e-6)
