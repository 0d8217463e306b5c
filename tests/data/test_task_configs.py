"""Every conf/task/*.yaml has the full schema, validates, and reads its fixture files."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from coalora.data.glue_tsv import LABEL, find_task_files, read_glue_columns
from coalora.data.task import REQUIRED_KEYS, metric_keys, primary_metric_key, validate_task
from coalora.errors import ConfigError

TASKS = ("sst2", "qnli", "rte", "mrpc", "cola", "stsb", "mnli", "qqp")
PRIMARY = {"sst2": "acc", "qnli": "acc", "rte": "acc", "mnli": "acc", "cola": "mcc"}
PRIMARY |= {"mrpc": "f1", "qqp": "f1", "stsb": "pearson"}
SCHEMA = set(REQUIRED_KEYS) | {"header", "columns", "metrics", "skip_malformed"}


def test_every_task_has_a_config(task_cfg):
    from pathlib import Path

    task_dir = Path(__file__).resolve().parents[2] / "conf" / "task"
    assert {p.stem for p in task_dir.glob("*.yaml")} >= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_task_config_schema(name, task_cfg):
    task = task_cfg(name)
    assert SCHEMA <= set(task.keys())
    assert task.name == name
    validate_task(task)
    assert primary_metric_key(task) == PRIMARY[name]
    assert task.monitor == f"val/{PRIMARY[name]}"
    assert task.mode == "max"
    assert task.max_length == (64 if len(task.text_fields) == 1 else 128)
    assert task.num_labels == (1 if name == "stsb" else 3 if name == "mnli" else 2)
    assert bool(task.is_regression) == (name == "stsb")
    assert metric_keys(task)[0] == PRIMARY[name]


@pytest.mark.parametrize("name", TASKS)
def test_task_reads_its_fixture(name, task_cfg, glue_dir):
    task = task_cfg(name)
    files = find_task_files(glue_dir.parent, task)
    assert files is not None, f"no fixture files for {name}"
    for path in files.values():
        data = read_glue_columns(path, task)
        n = len(data[LABEL])
        assert n >= 6
        assert all(len(data[f]) == n for f in task.text_fields)
        assert all(isinstance(s, str) and s.strip() for f in task.text_fields for s in data[f])


def test_monitor_interpolates_inside_a_composed_config(task_cfg):
    cfg = OmegaConf.create({"task": task_cfg("mrpc")})
    assert cfg.task.monitor == "val/f1"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"metric": "bleu"}, r"task.metric='bleu' is not allowed"),
        ({"num_labels": 3}, r"label_names has 2 entries but task.num_labels=3"),
        ({"text_fields": ["a", "b", "c"]}, r"text_fields must list 1 or 2"),
        ({"metrics": ["acc", "f1"], "metric": "f1"}, r"must start with the primary metric 'f1'"),
        ({"mode": "up"}, r"task.mode='up' is not allowed"),
    ],
)
def test_bad_task_values_name_the_key(overrides, match, task_cfg):
    with pytest.raises(ConfigError, match=match):
        validate_task(task_cfg("rte", **overrides))


def test_missing_keys_are_listed(task_cfg):
    task = task_cfg("sst2")
    del task["hub_name"]
    with pytest.raises(ConfigError, match=r"missing config keys \['hub_name'\]"):
        validate_task(task)
