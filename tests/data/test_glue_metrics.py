"""GLUE metrics per task against scikit-learn / scipy reference values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from coalora.data.metrics import build_metrics, logits_to_preds, monitor_key

KEYS = {
    "sst2": ["acc"],
    "qnli": ["acc"],
    "rte": ["acc"],
    "mnli": ["acc"],
    "cola": ["acc", "mcc"],
    "mrpc": ["acc", "f1"],
    "qqp": ["acc", "f1"],
    "stsb": ["pearson", "spearman"],
}


@pytest.mark.parametrize("name", list(KEYS))
def test_metric_keys(name, task_cfg):
    task = task_cfg(name)
    metrics = build_metrics(task)
    assert sorted(metrics.keys()) == [f"val/{k}" for k in KEYS[name]]
    assert monitor_key(task) == task.monitor
    assert sorted(build_metrics(task, prefix="eval/").keys()) == [f"eval/{k}" for k in KEYS[name]]


@pytest.mark.parametrize("name", ["sst2", "cola", "mrpc", "qqp", "mnli"])
def test_classification_metrics_match_sklearn(name, task_cfg):
    task = task_cfg(name)
    gen = torch.Generator().manual_seed(0)
    metrics = build_metrics(task)
    all_preds, all_labels = [], []
    for _ in range(3):  # several batches accumulate
        logits = torch.randn(20, task.num_labels, generator=gen)
        labels = torch.randint(0, task.num_labels, (20,), generator=gen)
        preds = logits_to_preds(logits, task)
        assert preds.shape == (20,)
        metrics.update(preds, labels)
        all_preds.append(preds)
        all_labels.append(labels)
    y_pred, y_true = torch.cat(all_preds).numpy(), torch.cat(all_labels).numpy()
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["val/acc"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    if "f1" in KEYS[name]:
        assert out["val/f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-6)
    if "mcc" in KEYS[name]:
        assert out["val/mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=1e-5)


def test_regression_metrics_match_scipy(task_cfg):
    task = task_cfg("stsb")
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(40, generator=gen) * 5
    logits = (target + torch.randn(40, generator=gen)).unsqueeze(-1)  # (B, 1) as a model returns
    metrics = build_metrics(task)
    preds = logits_to_preds(logits, task)
    assert preds.shape == (40,) and preds.dtype == torch.float32
    metrics.update(preds[:25], target[:25])
    metrics.update(preds[25:], target[25:])
    out = {k: float(v) for k, v in metrics.compute().items()}
    p, t = preds.numpy().astype(np.float64), target.numpy().astype(np.float64)
    assert out["val/pearson"] == pytest.approx(pearsonr(p, t)[0], abs=1e-5)
    assert out["val/spearman"] == pytest.approx(spearmanr(p, t)[0], abs=1e-5)


def test_perfect_predictions(task_cfg):
    labels = torch.tensor([0, 1, 1, 0, 1])
    for name in ("cola", "mrpc"):
        metrics = build_metrics(task_cfg(name))
        metrics.update(labels.clone(), labels)
        assert all(float(v) == pytest.approx(1.0) for v in metrics.compute().values())
