"""Paired significance test between runs scored on the same dev examples (or evaluation blocks).

    python scripts/paired.py <eval dir A> <eval dir B> [<eval dir C> ...] [--out FILE]

Every other run (B) is compared with the first (A, the reference) on each ``predictions.csv``
column both have. What is tested and how (McNemar + paired bootstrap for GLUE, the paired block
bootstrap of perplexity for language modelling): ``coalora.report.paired``.
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
