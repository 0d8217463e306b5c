"""Task metrics as a torchmetrics collection, named ``<split>/<key>`` (``val/acc``, ``val/ppl``).

Causal-LM tasks (``task.kind: causal_lm``) log perplexity ``ppl`` and mean token NLL ``nll``
from per-block sums (:func:`block_nll`); every task's direction is
:func:`higher_is_better`, every metric key's :func:`metric_higher_is_better` (what tables that
read results back, such as ``coalora.report.compare``, rank by).

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

import math
import warnings

import torch
import torch.nn.functional as F
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
from coalora.errors import ConfigError

__all__ = [
    "BlockNLL",
    "block_nll",
    "corpus_nll",
    "bootstrap_perplexity",
    "build_lm_metrics",
    "build_metrics",
    "higher_is_better",
    "lm_metric_keys",
    "LOG_SCALE_METRICS",
    "METRIC_HIGHER_IS_BETTER",
    "metric_higher_is_better",
    "paired_bootstrap_perplexity",
    "perplexity",
    "is_causal_lm",
    "logits_to_preds",
    "monitor_key",
    "primary_metric_key",
]


def is_causal_lm(task: DictConfig) -> bool:
    return str(task.get("kind") or "sequence_classification") == "causal_lm"


def higher_is_better(task: DictConfig) -> bool:
    """The direction of the task's primary metric: ``task.higher_is_better`` when declared,
    else ``task.mode == "max"``. Both declared and disagreeing is a ConfigError."""

    mode = task.get("mode")
    by_mode = None if mode is None else str(mode) == "max"
    declared = task.get("higher_is_better")
    if declared is None:
        if by_mode is None:
            raise ConfigError(f"task '{task.get('name')}': declare task.higher_is_better")
        return by_mode
    if by_mode is not None and bool(declared) != by_mode:
        raise ConfigError(
            f"task '{task.get('name')}': task.higher_is_better={bool(declared)} contradicts "
            f"task.mode={mode!r} (max = higher is better)"
        )
    return bool(declared)


# The direction of every metric key coalora writes into results.json (``val/<key>``, evaluate's
# rows): the task metrics, the LM metrics and the losses. Kept in line with the task configs'
# ``higher_is_better``/``mode`` by tests/report/test_compare.py.
METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "acc": True,
    "mcc": True,
    "f1": True,
    "pearson": True,
    "spearman": True,
    "ppl": False,
    "nll": False,
    "loss": False,
    "mse": False,
}
# Keys compared on a log scale: perplexity is exp(mean token NLL), so one collapsed configuration
# (ppl 1e8 at 2.5 bits, docs/decoder_lms.md) dwarfs every other difference on a linear scale;
# log ppl is the mean token NLL.
LOG_SCALE_METRICS = frozenset({"ppl"})


def metric_higher_is_better(key: str) -> bool:
    """The direction of the metric key ``key`` (``acc``, ``ppl``, ...; no ``val/`` prefix)."""
    if key not in METRIC_HIGHER_IS_BETTER:
        raise ConfigError(
            f"metric {key!r}: its direction is unknown; known: {list(METRIC_HIGHER_IS_BETTER)}"
        )
    return METRIC_HIGHER_IS_BETTER[key]


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
    if is_causal_lm(task):
        return build_lm_metrics(task, prefix)
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


def update_metrics(
    metrics: MetricCollection, task: DictConfig, logits: torch.Tensor, batch: dict
) -> list[tuple]:
    """Feed one batch's logits to ``metrics`` (built by :func:`build_metrics` for ``task``) and
    return one record per example: (label, prediction) for GLUE tasks, (scored tokens, summed
    NLL) per block for causal-LM tasks (what paired tests resample)."""
    if is_causal_lm(task):
        nll, tokens = block_nll(logits, batch["labels"], batch.get("attention_mask"))
        metrics.update(nll, tokens)
        return list(zip(tokens.tolist(), nll.tolist(), strict=True))
    preds = logits_to_preds(logits, task)
    metrics.update(preds, batch["labels"])
    return list(zip(batch["labels"].tolist(), preds.tolist(), strict=True))


def monitor_key(task: DictConfig, prefix: str = "val/") -> str:
    """``<prefix><primary key>``, e.g. ``val/acc`` (what ``task.monitor`` resolves to)."""
    if is_causal_lm(task):
        return f"{prefix}{lm_metric_keys(task)[0]}"
    return f"{prefix}{primary_metric_key(task)}"


# --------------------------------------------------------------------------- causal-LM metrics
LM_METRIC_KEYS = ("ppl", "nll")


def block_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and number of scored tokens per block: ``(B,)`` float, ``(B,)`` long.

    Position t predicts token t+1 (the shift ``*ForCausalLM`` applies to ``labels``), so a block
    of T tokens scores T-1 of them; labels equal to ``ignore_index`` and padded positions
    (``attention_mask == 0``) are not scored.
    """
    pred = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    keep = target != ignore_index
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].bool()
    nll = F.cross_entropy(
        pred.reshape(-1, pred.shape[-1]),
        target.masked_fill(~keep, 0).reshape(-1),
        reduction="none",
    ).view_as(target)  # (B, T-1)
    return (nll * keep).sum(-1), keep.sum(-1)


@torch.no_grad()
def corpus_nll(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block summed NLL and scored tokens of a causal LM over an LM loader's blocks (the
    numbers ``val/ppl`` is computed from), for models outside a LightningModule (a deployed
    export, a bare quantized base)."""
    nll, tokens = [], []
    for batch in loader:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        n, t = block_nll(out.logits, batch["labels"], batch["attention_mask"])
        nll.append(n)
        tokens.append(t)
    return torch.cat(nll), torch.cat(tokens)


def perplexity(nll_sum: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp(total NLL / total scored tokens): every token weighs the same, whatever its block."""
    total = float(tokens.sum())
    if total <= 0:
        raise ValueError("perplexity: no scored tokens")
    return math.exp(float(nll_sum.double().sum()) / total)


def _resample_index(n: int, n_resamples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (int(n_resamples), n), generator=g)  # (R, n)


def _resampled_ppl(nll: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.exp(nll.double()[idx].sum(-1) / tokens.double()[idx].sum(-1))  # (R,)


def bootstrap_perplexity(
    nll_sum: torch.Tensor,
    tokens: torch.Tensor,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the perplexity, resampling evaluation blocks (tokens
    inside a block are not independent, blocks roughly are)."""
    ppl = _resampled_ppl(nll_sum, tokens, _resample_index(len(nll_sum), n_resamples, seed))
    a = (1 - level) / 2
    return float(ppl.quantile(a)), float(ppl.quantile(1 - a))


def paired_bootstrap_perplexity(
    nll_a: torch.Tensor,
    nll_b: torch.Tensor,
    tokens: torch.Tensor,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """ppl(a) - ppl(b) on the same evaluation blocks, with a paired percentile bootstrap
    interval (both resampled with the same block indices) and the fraction of resamples in
    which a is not better (lower) than b."""
    if nll_a.shape != nll_b.shape or nll_a.shape != tokens.shape:
        raise ValueError("paired_bootstrap_perplexity: a, b and tokens must cover the same blocks")
    idx = _resample_index(len(tokens), n_resamples, seed)
    diff = _resampled_ppl(nll_a, tokens, idx) - _resampled_ppl(nll_b, tokens, idx)  # (R,)
    a = (1 - level) / 2
    return {
        "diff": perplexity(nll_a, tokens) - perplexity(nll_b, tokens),
        "low": float(diff.quantile(a)),
        "high": float(diff.quantile(1 - a)),
        "p_not_lower": float((diff >= 0).double().mean()),
    }


class BlockNLL(Metric):
    """Per-block NLL sums and token counts; computes ``ppl`` (perplexity) or ``nll`` (mean token
    NLL). ``update(nll_sum, tokens)`` takes :func:`block_nll`'s output, so one cross-entropy
    feeds both keys; :meth:`blocks` returns the per-block arrays for bootstrap tests."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, key: str = "ppl", **kwargs):
        super().__init__(**kwargs)
        if key not in LM_METRIC_KEYS:
            raise ValueError(f"BlockNLL key {key!r}; allowed: {list(LM_METRIC_KEYS)}")
        self.key = key
        self.add_state("nll", default=[], dist_reduce_fx="cat")
        self.add_state("tokens", default=[], dist_reduce_fx="cat")

    def update(self, nll_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.nll.append(nll_sum.detach().double().reshape(-1))
        self.tokens.append(tokens.detach().reshape(-1).long())

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        return cat(self.nll), cat(self.tokens)

    def compute(self) -> torch.Tensor:
        nll, tokens = self.blocks()
        mean = nll.sum() / tokens.sum().clamp_min(1)
        return torch.exp(mean).float() if self.key == "ppl" else mean.float()


def lm_metric_keys(task: DictConfig) -> list[str]:
    """Keys logged for a causal-LM task (``task.metrics``, default ``[ppl, nll]``); first = primary."""

    keys = [str(k) for k in (task.get("metrics") or LM_METRIC_KEYS)]
    bad = [k for k in keys if k not in LM_METRIC_KEYS]
    if bad or keys[0] != "ppl":
        raise ConfigError(
            f"task '{task.get('name')}': task.metrics={keys} must start with ppl; "
            f"allowed: {list(LM_METRIC_KEYS)}"
        )
    return keys


def build_lm_metrics(task: DictConfig, prefix: str = "val/") -> MetricCollection:
    """``<prefix>ppl`` and ``<prefix>nll``; update with ``*block_nll(logits, labels)``."""
    return MetricCollection({k: BlockNLL(k) for k in lm_metric_keys(task)}, prefix=prefix)
