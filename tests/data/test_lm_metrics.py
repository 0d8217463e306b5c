"""Perplexity = exp(mean token NLL) over blocks, per-block sums, bootstrap, metric direction."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from coalora.data.metrics import (
    BlockNLL,
    block_nll,
    bootstrap_perplexity,
    build_metrics,
    corpus_nll,
    higher_is_better,
    monitor_key,
    paired_bootstrap_perplexity,
    perplexity,
)
from coalora.errors import ConfigError
from coalora.models import build_causal_lm

ROOT = Path(__file__).resolve().parents[2]


def load(group, name):
    return OmegaConf.load(ROOT / "conf" / group / f"{name}.yaml")


def test_block_nll_and_perplexity_match_a_hand_computation():
    # one block of 3 tokens [0, 1, 1] over a vocabulary of 2: positions 0 and 1 are scored
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[0, 1, 1]])
    nll, n = block_nll(logits, labels)
    # p(1 | pos 0) = 3 / (1 + 3); p(1 | pos 1) = 1 / (4 + 1)
    hand = -math.log(3 / 4) - math.log(1 / 5)
    assert n.tolist() == [2]
    assert nll.item() == pytest.approx(hand, rel=1e-6)
    assert perplexity(nll, n) == pytest.approx(math.exp(hand / 2), rel=1e-6)


def test_ignored_and_padded_positions_are_not_scored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    full, n_full = block_nll(logits, labels)
    masked = labels.clone()
    masked[0, 3] = -100
    mask = torch.ones_like(labels)
    mask[1, 4] = 0
    part, n_part = block_nll(logits, masked, mask)
    assert n_full.tolist() == [4, 4] and n_part.tolist() == [3, 3]
    lp = torch.log_softmax(logits, -1)
    assert part[0].item() == pytest.approx(full[0].item() + lp[0, 2, labels[0, 3]].item(), rel=1e-5)
    assert part[1].item() == pytest.approx(full[1].item() + lp[1, 3, labels[1, 4]].item(), rel=1e-5)


def test_perplexity_weighs_tokens_not_blocks():
    nll, n = torch.tensor([2.0, 9.0]), torch.tensor([1, 3])
    assert perplexity(nll, n) == pytest.approx(math.exp(11 / 4))


def test_equals_the_model_loss_on_full_blocks():
    model = build_causal_lm(load("model", "tiny_llama"), seed=0).eval()
    ids = torch.randint(5, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    nll, n = block_nll(out.logits, ids)
    assert perplexity(nll, n) == pytest.approx(math.exp(out.loss.item()), rel=1e-5)


def test_corpus_nll_over_a_loader_equals_the_model_loss():
    model = build_causal_lm(load("model", "tiny_llama"), seed=0).eval()
    ids = torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    loader = [
        {"input_ids": ids[:3], "attention_mask": mask[:3], "labels": ids[:3]},
        {"input_ids": ids[3:], "attention_mask": mask[3:], "labels": ids[3:]},
    ]
    nll, tokens = corpus_nll(model, loader)
    assert nll.shape == (4,) and tokens.tolist() == [11] * 4
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(nll, tokens) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_metric_collection_accumulates_blocks():
    task = load("task", "wikitext2")
    metrics = build_metrics(task, prefix="val/")
    parts = [
        (torch.tensor([3.0, 4.0]), torch.tensor([2, 2])),
        (torch.tensor([1.0]), torch.tensor([1])),
    ]
    for nll, n in parts:
        metrics.update(nll, n)
    got = metrics.compute()
    assert set(got) == {"val/ppl", "val/nll"}
    assert got["val/nll"].item() == pytest.approx(8 / 5)
    assert got["val/ppl"].item() == pytest.approx(math.exp(8 / 5), rel=1e-6)
    m = BlockNLL()
    for nll, n in parts:
        m.update(nll, n)
    blocks, tokens = m.blocks()
    assert blocks.tolist() == [3.0, 4.0, 1.0] and tokens.tolist() == [2, 2, 1]
    assert monitor_key(task) == "val/ppl" == task.monitor


def test_bootstrap_intervals():
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((40,), 255)
    nll = (3.0 + 0.3 * torch.randn(40, generator=g)) * 255
    lo, hi = bootstrap_perplexity(nll, tokens, seed=1)
    assert lo < perplexity(nll, tokens) < hi
    assert (lo, hi) == bootstrap_perplexity(nll, tokens, seed=1)
    same = paired_bootstrap_perplexity(nll, nll.clone(), tokens)
    assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0
    worse = paired_bootstrap_perplexity(nll + 0.05 * 255, nll, tokens)
    assert worse["diff"] > 0 and worse["low"] > 0 and worse["p_not_lower"] == 1.0
    with pytest.raises(ValueError, match="same blocks"):
        paired_bootstrap_perplexity(nll, nll[:3], tokens)


def test_direction_is_declared_per_task():
    assert higher_is_better(load("task", "wikitext2")) is False
    assert higher_is_better(load("task", "c4")) is False
    assert higher_is_better(load("task", "sst2")) is True  # GLUE: falls back to mode: max
    bad = load("task", "wikitext2")
    bad.higher_is_better = True
    with pytest.raises(ConfigError, match="contradicts task.mode='min'"):
        higher_is_better(bad)
