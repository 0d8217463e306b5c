"""GLUE metrics as a torchmetrics collection, named ``<split>/<key>`` (STYLE §8, DESIGN §6).

Per task (GLUE's official choice first = the primary metric, ``task.metrics``):
SST-2/QNLI/RTE/MNLI accuracy ``acc``; CoLA Matthews correlation ``mcc``; MRPC/QQP ``f1`` of
the positive class (and ``acc``); STS-B ``pearson`` (and ``spearman``).

Usage::

    metrics = build_metrics(task, prefix="val/")          # keys "val/acc", ...
    metrics.update(logits_to_preds(logits, task), labels)  # argmax ids, or squeezed scores
    metrics.compute()                                      # {"val/acc": tensor(...)}

Classification metrics take **predicted class ids** (``logits.argmax(-1)``), not logits: a
binary F1 given float inputs would threshold probabilities instead. Regression metrics take the
``(B,)`` scores (``logits.squeeze(-1)``) and float targets.
"""

from __future__ import annotations

import warnings

import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from coalora.data.task import metric_keys, primary_metric_key, validate_task

__all__ = ["build_metrics", "logits_to_preds", "primary_metric_key", "monitor_key"]


def _metric(key: str, num_labels: int) -> Metric:
    if key == "acc":
        return MulticlassAccuracy(num_classes=num_labels, average="micro")
    if key == "f1":  # GLUE's F1 (MRPC, QQP) is the positive class's F1
        if num_labels == 2:
            return BinaryF1Score()
        return MulticlassF1Score(num_classes=num_labels, average="macro")
    if key == "mcc":
        if num_labels == 2:
            return BinaryMatthewsCorrCoef()
        return MulticlassMatthewsCorrCoef(num_classes=num_labels)
    if key == "pearson":
        return PearsonCorrCoef()
    if key == "spearman":
        with warnings.catch_warnings():  # "keeps all predictions in a buffer": fine for GLUE dev
            warnings.simplefilter("ignore", UserWarning)
            return SpearmanCorrCoef()
    raise ValueError(f"unknown metric key {key!r}")  # validate_task rejects these first


def build_metrics(task: DictConfig, prefix: str = "val/") -> MetricCollection:
    """The task's metrics, keyed ``<prefix><key>`` (e.g. ``val/acc``, ``val/f1``)."""
    task = task if isinstance(task, DictConfig) else OmegaConf.create(task)
    validate_task(task)
    num_labels = int(task.num_labels)
    return MetricCollection({k: _metric(k, num_labels) for k in metric_keys(task)}, prefix=prefix)


def logits_to_preds(logits: torch.Tensor, task: DictConfig | bool) -> torch.Tensor:
    """What :func:`build_metrics` expects: ``(B,)`` class ids (argmax), or ``(B,)`` float scores
    for regression. ``task`` may be the task config or its ``is_regression`` flag."""
    regression = task if isinstance(task, bool) else bool(task.is_regression)
    if regression:
        return logits.reshape(logits.shape[0], -1)[:, 0].float()  # (B, 1) -> (B,)
    return logits.argmax(dim=-1)  # (B, C) -> (B,)


def monitor_key(task: DictConfig, prefix: str = "val/") -> str:
    """``<prefix><primary key>``, e.g. ``val/acc`` (what ``task.monitor`` resolves to)."""
    return f"{prefix}{primary_metric_key(task)}"
