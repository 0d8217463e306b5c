"""Against the real GLUE files (env COALORA_DATA_DIR, else ../shared/data next to the repo).

Skipped when neither exists. Expected counts are GLUE's official split sizes (data/README.md).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from coalora.data.glue_tsv import LABEL, find_task_files, read_glue_columns


def _data_dir() -> Path | None:
    env = os.environ.get("COALORA_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data")
    for path in candidates:
        if (path / "glue").is_dir():
            return path
    return None


DATA_DIR = _data_dir()
pytestmark = pytest.mark.skipif(DATA_DIR is None, reason="no real GLUE data (COALORA_DATA_DIR)")

# task -> (dev rows, dev label counts)
EXPECTED = {
    "sst2": (872, {0: 428, 1: 444}),
    "cola": (1043, {0: 322, 1: 721}),
    "mrpc": (408, {0: 129, 1: 279}),
    "rte": (277, {0: 146, 1: 131}),  # entailment, not_entailment
    "qnli": (5463, {0: 2702, 1: 2761}),
    "stsb": (1500, None),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dev_row_counts_and_labels(name, task_cfg):
    task = task_cfg(name)
    files = find_task_files(DATA_DIR, task, ("validation",))
    if files is None:
        pytest.skip(f"{task.glue_dir} dev file not in {DATA_DIR}")
    data = read_glue_columns(files["validation"], task)
    rows, counts = EXPECTED[name]
    assert len(data[LABEL]) == rows
    if counts is not None:
        assert dict(Counter(data[LABEL])) == counts
    else:
        assert sum(data[LABEL]) / rows == pytest.approx(2.364, abs=1e-3)


@pytest.mark.parametrize("name, rows", [("cola", 8551), ("mrpc", 3668), ("rte", 2490)])
def test_train_row_counts(name, rows, task_cfg):
    files = find_task_files(DATA_DIR, task_cfg(name), ("train",))
    if files is None:
        pytest.skip("train file missing")
    assert len(read_glue_columns(files["train"], task_cfg(name))[LABEL]) == rows
