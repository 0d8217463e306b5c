"""Fixtures for the GLUE data tests: task configs and an offline word-level BERT tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "conf" / "task"
GLUE_FIXTURES = ROOT / "tests" / "fixtures" / "glue"
TASKS = ("sst2", "qnli", "rte", "mrpc", "cola", "stsb", "mnli", "qqp")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_task(name: str, **overrides) -> DictConfig:
    """``conf/task/<name>.yaml`` with optional key overrides."""
    task = OmegaConf.load(TASK_DIR / f"{name}.yaml")
    for key, value in overrides.items():
        task[key] = value
    return task


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """``tests/fixtures/glue``: tiny GLUE files, ``<TASK>/{train,dev}.tsv``."""
    return GLUE_FIXTURES


@pytest.fixture(scope="session")
def task_cfg():
    """``task_cfg(name, **overrides)`` -> the task config from ``conf/task``."""
    return load_task


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer whose vocab is every word of the GLUE fixtures (no hub)."""
    from transformers import BertTokenizerFast

    words: set[str] = set()
    for path in GLUE_FIXTURES.glob("*/*.tsv"):
        text = path.read_text(encoding="utf-8-sig").lower()
        words.update(re.findall(r"\w+|[^\w\s]", text))
    folder = tmp_path_factory.mktemp("word_tokenizer")
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + sorted(words)) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))
