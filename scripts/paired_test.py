"""Paired significance test between runs scored on the same dev examples.

    python scripts/paired_test.py <eval dir A> <eval dir B> [<eval dir C> ...] [--out FILE]

Each directory is an ``evaluate.py`` run with ``predictions.csv`` (``eval.save_predictions=true``,
the default). Every other run is compared with the first (the reference) at every budget both
scored: accuracy of each, the difference, McNemar's exact test on the discordant examples (the
two-sided binomial test of ``b`` vs ``c``), and a 95% paired-bootstrap interval of the difference.
A difference whose interval contains 0 is within what the dev set can resolve.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, bootstrap

from coalora.report.bench import emit_markdown


def load(run: Path) -> tuple[str, dict[str, dict[int, bool]]]:
    """(label, budget -> {example: correct})."""
    path = run / "predictions.csv"
    if not path.is_file():
        raise SystemExit(
            f"error: {run} has no predictions.csv (run evaluate.py with eval.save_predictions=true)"
        )
    res = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    label = f"{res.get('method', '?')} ({run.name})"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        budgets = [c for c in reader.fieldnames or [] if c not in ("example", "label")]
        out: dict[str, dict[int, bool]] = {b: {} for b in budgets}
        for row in reader:
            for b in budgets:
                out[b][int(row["example"])] = float(row[b]) == float(row["label"])
    return label, out


def paired_stats(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> dict:
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


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "runs", nargs="+", help="evaluate.py run directories; the first is the reference"
    )
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        raise SystemExit("error: give at least two evaluate.py run directories")
    ref_label, ref = load(Path(args.runs[0]))
    lines = [
        f"Reference: {ref_label}. diff = other − reference (accuracy points).",
        "",
        "| other | budget | acc ref | acc other | diff | only ref right | only other right "
        "| McNemar p | 95% CI of diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in args.runs[1:]:
        label, other = load(Path(run))
        common = [b for b in ref if b in other]
        if not common:
            raise SystemExit(f"error: {run} shares no budget with {args.runs[0]}")
        for b in common:
            examples = sorted(set(ref[b]) & set(other[b]))
            if len(examples) != len(ref[b]):
                raise SystemExit(
                    f"error: {run} was scored on other dev examples than the reference"
                )
            a = np.array([other[b][i] for i in examples])
            r = np.array([ref[b][i] for i in examples])
            s = paired_stats(a, r)
            lines.append(
                f"| {label} | {b} | {s['acc_b']:.4f} | {s['acc_a']:.4f} | {100 * s['diff']:+.2f} "
                f"| {s['only_b']} | {s['only_a']} | {s['p_mcnemar']:.3f} "
                f"| [{100 * s['ci_low']:+.2f}, {100 * s['ci_high']:+.2f}] |"
            )
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
