"""End-to-end: tiny_bert on the tiny SST-2 fixture, through ``train.py`` and through ``run``."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from support import run_entry

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
FAST = [
    "model=tiny_bert",
    f"paths.data_dir={FIXTURES}",
    "data.allow_hub=false",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "callbacks=minimal",
    "data.batch_size=8",
    "data.eval_batch_size=16",
]


def run_cli_env(args: list[str], tmp: Path, extra_env: dict, script: str = "train.py"):
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args = [*args, f"hydra.run.dir={tmp / 'run'}"]
    return run_entry(script, args, tmp / "cache", extra_env, timeout=300)


def run_cli(args: list[str], tmp: Path, script: str = "train.py") -> subprocess.CompletedProcess:
    return run_cli_env(args, tmp, {}, script)


def test_train_py_fast_run_logs_metrics(tmp_path):
    r = run_cli([*FAST, "method=lora"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 4
    assert 0.0 <= results["metrics"]["val/acc"] <= 1.0
    rows = list(csv.DictReader(open(next(run.glob("csv/**/metrics.csv")))))
    assert any(row.get("train/loss") for row in rows) and any(row.get("val/acc") for row in rows)
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 42 and "torch" in info["versions"] and "git_sha" in info
    assert (run / "config.yaml").is_file() and (run / "curves.png").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["task=nope"], "task"),
        (["method=lora", "quant=nf4"], "method=lora does not support quant=nf4"),
        (["model.source=ftp"], "model.source"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    r = run_cli([*FAST, *args], tmp_path)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    run = tmp_path / "run"
    ours = [p for p in run.glob("*") if p.name != ".hydra" and not p.name.endswith(".log")]
    assert ours == [], f"half-written artifacts: {ours}"


def test_missing_data_is_one_clear_line(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    r = run_cli([*FAST, f"paths.data_dir={empty}"], tmp_path)
    assert r.returncode == 2
    assert "paths.data_dir" in r.stderr and "Traceback" not in r.stderr


def test_resume_continues_step_count(tmp_path):
    first = run_cli([*FAST, "method=lora", "trainer.max_steps=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = tmp_path / "resumed"
    r = run_cli_env(
        [
            *FAST,
            "method=lora",
            "trainer.max_steps=4",
            f"ckpt_path={ckpt}",
            f"hydra.run.dir={resumed}",
        ],
        tmp_path,
        {},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((resumed / "results.json").read_text())
    assert results["global_step"] == 4


def test_multirun_with_joblib_runs_both_jobs(tmp_path):
    args = [a for a in FAST if not a.startswith("trainer.max_steps")]
    r = run_cli_env(
        [
            "-m",
            *args,
            "method=lora",
            "trainer.max_steps=2,3",
            "hydra/launcher=joblib",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.run.dir=unused",
        ],
        tmp_path,
        {},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    steps = sorted(
        json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text())["global_step"]
        for i in (0, 1)
    )
    assert steps == [2, 3]


def test_wandb_offline_run_carries_config_table_and_plot(tmp_path):
    """``logger=wandb`` (offline): the resolved config, the per-budget average bits and final
    metrics, a results table and the curves plot are in the run's W&B record."""
    r = run_entry(
        "train.py",
        ["model=tiny_bert", f"paths.data_dir={FIXTURES}", "data.allow_hub=false",
         "method=coalora", "method.pool.start=3.0", "method.pool.stop=4.0",
         "method.pool.step=0.5", "trainer.max_steps=4", "trainer.val_check_interval=2",
         "data.batch_size=8", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path / "cache",
        extra_env={"WANDB_MODE": "offline"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    record = next(offline.glob("*.wandb")).read_bytes()
    for key in (b"optim.lr", b"method.name", b"quant.space.bits", b"avg_bits@3", b"val/acc@mean"):
        assert key in record, key
    media = offline / "files" / "media"
    table = json.loads(next((media / "table").glob("results_*.table.json")).read_text())
    assert table["columns"] == ["metric", "value"] and any(
        "val/acc@" in row[0] for row in table["data"]
    )
    assert list((media / "images" / "plots").glob("curves_*.png"))


def test_only_global_rank_zero_writes_run_metadata(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from coalora.stages.common import write_run_info

    cfg = OmegaConf.create({"seed": 1})
    monkeypatch.setenv("RANK", "1")
    write_run_info(cfg, tmp_path / "r1", "train")
    assert not (tmp_path / "r1").exists()  # rank 1 of a DDP job leaves rank 0's files alone
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    write_run_info(cfg, tmp_path / "r0", "train")
    assert (tmp_path / "r0" / "config.yaml").is_file() and (
        tmp_path / "r0" / "run_info.json"
    ).is_file()
