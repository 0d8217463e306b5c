"""Paired significance test between runs scored on the same dev examples (or evaluation blocks).

    python scripts/paired.py <eval dir A> <eval dir B> [<eval dir C> ...] [--out FILE]

Each directory is an ``evaluate.py`` run with ``predictions.csv`` (``eval.save_predictions=true``,
the default). Every other run (B) is compared with the first (A, the reference) on every
``predictions.csv`` column both have: ``<budget>`` (the allocation) and ``<budget>-random<i>``
(a held-out random configuration near the budget).

Classification (GLUE): accuracy of each, the difference, McNemar's exact test on the discordant
examples (the two-sided binomial test of ``b`` vs ``c``), and a 95% paired-bootstrap interval of
the difference.

Language modelling (a run whose results rows report ``ppl``, or whose training run's config has
``task.kind: causal_lm``): ``predictions.csv`` holds per evaluation block its scored tokens
(``label``) and summed NLL. Perplexity of each, ppl(B) − ppl(A) with a 95% paired bootstrap
interval over blocks (``coalora.data.metrics.paired_bootstrap_perplexity``: both runs resampled
with the same blocks) and the fraction of resamples in which B is not lower than A. Two runs must
have scored the same blocks with the same token counts.

A difference whose interval contains 0 is within what the dev set can resolve. The statistics:
``coalora.report.paired``. (Formerly ``scripts/paired_test.py``; same arguments and output.)
"""

from __future__ import annotations

import argparse

from coalora.errors import CoaloraError
from coalora.report.bench import emit_markdown
from coalora.report.paired import paired_table


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "runs", nargs="+", help="evaluate.py run directories; the first is the reference"
    )
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    try:
        lines = paired_table(args.runs)
    except CoaloraError as e:
        raise SystemExit(f"error: {e}") from None
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
