"""Paired significance tests between evaluation runs scored on the same dev examples (or
evaluation blocks), behind ``scripts/paired.py``.

Each run is an ``evaluate.py`` run directory with ``predictions.csv`` (``eval.save_predictions=true``,
the default). Every other run (B) is compared with the first (A, the reference) on every
``predictions.csv`` column both have: ``<budget>`` (the allocation) and ``<budget>-random<i>``
(a held-out random configuration near the budget).

Classification (GLUE): accuracy of each, the difference, McNemar's exact test on the discordant
examples (the two-sided binomial test of ``b`` vs ``c``), and a 95% paired-bootstrap interval of
the difference.

Language modelling (a run whose results rows report ``ppl``, or whose training run's config has
``task.kind: causal_lm``; docs/decoder_lms.md): ``predictions.csv`` holds per evaluation block its
scored tokens (``label``) and summed NLL. Perplexity of each, ppl(B) − ppl(A) with a 95% paired
bootstrap interval over blocks (``coalora.data.metrics.paired_bootstrap_perplexity``: both runs
resampled with the same blocks) and the fraction of resamples in which B is not lower than A. Two
runs must have scored the same blocks with the same token counts.

A difference whose interval contains 0 is within what the dev set can resolve. The ``verdict``
column adds a practical-equivalence reading: a 95% interval inside ±0.1% of the reference's
metric is "no practical difference" even when it excludes 0 (float noise between machines). Bad input raises
:class:`coalora.errors.ConfigError` naming the run.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.stats import binomtest, bootstrap

from coalora.data.metrics import is_causal_lm, paired_bootstrap_perplexity, perplexity
from coalora.errors import ConfigError
from coalora.report.runs import trained_run_dir

REPS = 10000
SEED = 0


def is_lm_run(res: dict) -> bool:
    """Whether an evaluation scored a causal-LM task: its rows report ``ppl``, else its
    training run's ``config.yaml`` (when on this machine) says ``task.kind: causal_lm``."""
    rows = res.get("rows") or []
    if rows:
        return any("ppl" in r for r in rows)
    run = trained_run_dir(res)
    if run is not None and (run / "config.yaml").is_file():
        task = OmegaConf.load(run / "config.yaml").get("task")
        return task is not None and is_causal_lm(task)
    return False


def load_predictions(run: Path) -> tuple[str, bool, dict[int, float], dict[str, dict[int, float]]]:
    """(label, is LM, example -> label column, column -> {example: value}).

    The label column is the gold label (classification) or the block's scored tokens (LM);
    values are predictions or the block's summed NLL."""
    path = run / "predictions.csv"
    if not path.is_file():
        raise ConfigError(
            f"{run} has no predictions.csv (run evaluate.py with eval.save_predictions=true)"
        )
    res = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    label = f"{res.get('method', '?')} ({run.name})"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or [] if c not in ("example", "label")]
        gold: dict[int, float] = {}
        out: dict[str, dict[int, float]] = {c: {} for c in columns}
        for row in reader:
            i = int(row["example"])
            gold[i] = float(row["label"])
            for c in columns:
                out[c][i] = float(row[c])
    return label, is_lm_run(res), gold, out


def paired_stats(a: np.ndarray, b: np.ndarray, reps: int = REPS, seed: int = SEED) -> dict:
    """``a``, ``b``: per-example correctness (bool arrays on the same examples)."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    if only_a + only_b == 0:  # identical predictions: every resample's difference is 0
        lo = hi = 0.0
    else:  # paired: one resample draws the same examples for both runs
        ci = bootstrap(
            (a.astype(float), b.astype(float)),
            lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=reps,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        lo, hi = ci.low, ci.high
    return {
        "acc_a": float(a.mean()),
        "acc_b": float(b.mean()),
        "diff": float(a.mean() - b.mean()),
        "only_a": only_a,
        "only_b": only_b,
        "p_mcnemar": float(p),
        "ci_low": float(lo),
        "ci_high": float(hi),
    }


def lm_stats(
    nll_ref: np.ndarray,
    nll_other: np.ndarray,
    tokens: np.ndarray,
    reps: int = REPS,
    seed: int = SEED,
) -> dict:
    """Per-block summed NLL of the reference and the other run on the same blocks (``tokens``
    scored tokens each): perplexities, ppl(other) − ppl(reference), its 95% paired bootstrap
    interval over blocks and the fraction of resamples where the other run is not lower."""
    ref, other = torch.as_tensor(nll_ref), torch.as_tensor(nll_other)
    tok = torch.as_tensor(tokens)
    s = paired_bootstrap_perplexity(other, ref, tok, n_resamples=reps, seed=seed)
    return {
        "ppl_ref": perplexity(ref, tok),
        "ppl_other": perplexity(other, tok),
        "diff": s["diff"],
        "ci_low": s["low"],
        "ci_high": s["high"],
        "p_not_lower": s["p_not_lower"],
        "blocks": len(tok),
        "tokens": int(tok.sum()),
    }


def _num(x: float, sign: bool = False) -> str:
    """Perplexities span 10 to 1e8 (a collapsed configuration): fixed point, then scientific."""
    spec = "+" if sign else ""
    return f"{x:{spec}.4f}" if abs(x) < 1e6 else f"{x:{spec}.4e}"


def check_same_blocks(run: str, ref_run: str, gold: dict, ref_gold: dict) -> None:
    """LM: both runs scored the same blocks, each with the same number of tokens."""
    if set(gold) != set(ref_gold):
        raise ConfigError(
            f"{run} scored other evaluation blocks than {ref_run} "
            f"({len(gold)} vs {len(ref_gold)} blocks, {len(set(gold) ^ set(ref_gold))} not shared)"
        )
    differ = sorted(i for i in gold if int(gold[i]) != int(ref_gold[i]))
    if differ:
        raise ConfigError(
            f"{run} scored other evaluation blocks than {ref_run} (the token counts "
            f"differ in {len(differ)} blocks, first block {differ[0]}: "
            f"{int(gold[differ[0]])} vs {int(ref_gold[differ[0]])} tokens)"
        )


CLS_HEADER = [
    "| other | column | acc ref | acc other | diff | only ref right | only other right "
    "| McNemar p | 95% CI of diff | verdict |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
]
LM_HEADER = [
    "| other | column | ppl ref | ppl other | diff | 95% CI of diff | P(other not lower) "
    "| blocks | tokens | verdict |",
    "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
]
# A difference smaller than this share of the reference's metric is no practical difference,
# whatever its interval says (a re-run on another machine differs by float noise: 88.7227 vs
# 88.7228 ppl gave an interval of [-0.0003, -0.0000]).
MARGIN = 0.001


def verdict(low: float, high: float, reference: float, margin: float = MARGIN) -> str:
    """How to read a paired interval ``[low, high]`` of (other − reference), given the
    practical-equivalence margin ``margin × |reference|`` (an equivalence test by interval
    inclusion: the whole 95% interval inside ±margin means no difference that matters)."""
    m = margin * abs(reference)
    if -m <= low and high <= m:
        return f"no practical difference (|Δ| < {100 * margin:g}%)"
    if low > 0:
        return "other higher"
    if high < 0:
        return "other lower"
    return "not resolved"


def paired_table(runs: Sequence[str | Path]) -> list[str]:
    """The markdown lines comparing every run of ``runs`` with the first (the reference)."""
    if len(runs) < 2:
        raise ConfigError("give at least two evaluate.py run directories")
    ref_label, lm, ref_gold, ref = load_predictions(Path(runs[0]))
    if lm:
        lines = [
            f"Reference: {ref_label}. diff = ppl(other) − ppl(reference) (lower is better); "
            f"95% CI from a paired bootstrap over evaluation blocks ({REPS} resamples).",
            "",
            *LM_HEADER,
        ]
    else:
        lines = [
            f"Reference: {ref_label}. diff = other − reference (accuracy points).",
            "",
            *CLS_HEADER,
        ]
    for run in runs[1:]:
        label, other_lm, gold, other = load_predictions(Path(run))
        if other_lm != lm:
            kinds = {True: "a language-modelling", False: "a classification"}
            raise ConfigError(
                f"{run} is {kinds[other_lm]} evaluation but {runs[0]} is "
                f"{kinds[lm]} one; compare runs of one task"
            )
        common = [c for c in ref if c in other]
        if not common:
            raise ConfigError(f"{run} shares no predictions.csv column with {runs[0]}")
        if lm:
            check_same_blocks(run, runs[0], gold, ref_gold)
            lines += lm_lines(label, common, ref, other, ref_gold)
        else:
            lines += classification_lines(label, common, ref, other, ref_gold, gold, run)
    return lines


def lm_lines(label: str, columns: list[str], ref: dict, other: dict, gold: dict) -> list[str]:
    """One table row per shared column of two LM runs on the same blocks."""
    blocks = sorted(gold)
    tokens = np.array([int(gold[i]) for i in blocks])
    lines = []
    for c in columns:
        s = lm_stats(
            np.array([ref[c][i] for i in blocks]),
            np.array([other[c][i] for i in blocks]),
            tokens,
        )
        lines.append(
            f"| {label} | {c} | {_num(s['ppl_ref'])} | {_num(s['ppl_other'])} "
            f"| {_num(s['diff'], True)} "
            f"| [{_num(s['ci_low'], True)}, {_num(s['ci_high'], True)}] "
            f"| {s['p_not_lower']:.4f} | {s['blocks']} | {s['tokens']} "
            f"| {verdict(s['ci_low'], s['ci_high'], s['ppl_ref'])} |"
        )
    return lines


def classification_lines(
    label: str, columns: list[str], ref: dict, other: dict, ref_gold: dict, gold: dict, run
) -> list[str]:
    """One table row per shared column of two classification runs on the same examples."""
    lines = []
    for c in columns:
        examples = sorted(set(ref[c]) & set(other[c]))
        if len(examples) != len(ref[c]):
            raise ConfigError(f"{run} was scored on other dev examples than the reference")
        a = np.array([other[c][i] == gold[i] for i in examples])
        r = np.array([ref[c][i] == ref_gold[i] for i in examples])
        s = paired_stats(a, r)
        lines.append(
            f"| {label} | {c} | {s['acc_b']:.4f} | {s['acc_a']:.4f} | {100 * s['diff']:+.2f} "
            f"| {s['only_b']} | {s['only_a']} | {s['p_mcnemar']:.3f} "
            f"| [{100 * s['ci_low']:+.2f}, {100 * s['ci_high']:+.2f}] "
            f"| {verdict(s['ci_low'], s['ci_high'], s['acc_b'])} |"
        )
    return lines
