"""Test-suite helpers (tests only): run an entry point of this repository in a subprocess, offline.

Entry points run as separate processes (own exit code, stdout/stderr, environment, working
directory, nothing shared with the test), forked from a server that imported torch, Lightning,
transformers, Hydra and the stages once (``multiprocessing``'s forkserver), so each run skips the
~6 s of imports a fresh interpreter pays. ``COALORA_TEST_FRESH_PROCESS=1`` starts a fresh
interpreter per run instead.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

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


# what the forkserver imports once; every run forks from it with these already loaded
PRELOAD = ["torch", "lightning", "transformers", "hydra", "omegaconf", "coalora.stages.train",
           "coalora.stages.evaluate", "coalora.stages.export", "coalora.stages.search",
           "coalora.cli.train", "coalora.cli.evaluate", "coalora.cli.export", "coalora.cli.search"]  # fmt: skip
_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _run_script(script: str, args: list[str], env: dict, out: str, err: str) -> None:
    """The child: what ``python <script> <args>`` does, in a process forked from the server."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO_ROOT)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's stdout
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    import torch

    threads = env.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else (os.cpu_count() or 1))
    sys.argv = [script, *args]
    runpy.run_path(str(REPO_ROOT / script), run_name="__main__")


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
    # a Hydra launcher (joblib/loky) starts worker processes of its own: a fresh interpreter
    fresh = any(a.startswith("hydra/launcher=") for a in args)
    if fresh or os.environ.get("COALORA_TEST_FRESH_PROCESS") == "1":
        return subprocess.run([sys.executable, script, *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="coalora-entry-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _context().Process(target=_run_script, args=(script, list(args), env, out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        read = lambda p: open(p, encoding="utf-8", errors="replace").read()  # noqa: E731
        return subprocess.CompletedProcess(
            [sys.executable, script, *args], proc.exitcode, read(out), read(err)
        )


def tiny_bert_classifier(
    hidden: int = 128, layers: int = 2, seed: int = 0, num_labels: int = 3
) -> torch.nn.Module:
    """A random BERT sequence classifier (vocabulary 100, 2 heads, intermediate 2 × hidden,
    32 positions) in eval mode, seeded: the small model of the packed-format and deploy tests."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden,
                     max_position_embeddings=32, num_labels=num_labels)  # fmt: skip
    return BertForSequenceClassification(cfg).eval()
