"""Paired comparison of two ``bench_decoder_quant.py`` result files (e.g. quant.sensitivity=none
vs =fisher): per budget, the perplexity of each allocation, the difference B − A with a 95%
paired block-bootstrap interval (both resampled with the same evaluation blocks) and the fraction
of resamples in which B is not lower, written as a markdown table.

    python scripts/sensitivity_report.py docs/results/sensitivity/smollm2_none.json \\
        docs/results/sensitivity/smollm2_fisher.json --out docs/results/sensitivity/smollm2.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from coalora.data.metrics import paired_bootstrap_perplexity
from coalora.io import atomic_write_text

BUDGET = re.compile(r"^allocation@([0-9.]+)")


def by_budget(result: dict) -> dict[float, dict]:
    out = {}
    for row in result["rows"]:
        m = BUDGET.match(row["config"])
        if m and "block_nll" in row:
            out[float(m.group(1))] = row
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", help="reference result JSON (e.g. sensitivity none)")
    ap.add_argument("b", help="compared result JSON (e.g. sensitivity fisher)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ra, rb = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    la = (ra.get("sensitivity") or {}).get("kind", Path(args.a).stem)
    lb = (rb.get("sensitivity") or {}).get("kind", Path(args.b).stem)
    a, b = by_budget(ra), by_budget(rb)
    budgets = sorted(set(a) & set(b))
    if not budgets:
        raise SystemExit("error: the two files share no allocation@<budget> rows with block NLLs")
    lines = [
        f"# Allocation sensitivity: {lb} vs {la} ({ra['model']}, {ra['task']})",
        "",
        f"{ra['eval_blocks']} blocks × {ra['block_length']} tokens, no adapter; "
        f"{len(a[budgets[0]]['block_nll'])} blocks scored. Differences are ppl({lb}) − ppl({la}) "
        "with a 95% paired bootstrap interval over blocks (2000 resamples).",
        "",
        f"Files: `{args.a}` ({la}), `{args.b}` ({lb}).",
        "",
        f"| budget | ppl ({la}) | ppl ({lb}) | {lb} − {la} | 95% interval | P({lb} not lower) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for budget in budgets:
        x, y = a[budget], b[budget]
        if x["block_tokens"] != y["block_tokens"]:
            raise SystemExit(f"error: budget {budget:g}: the files scored different blocks")
        d = paired_bootstrap_perplexity(
            torch.tensor(y["block_nll"], dtype=torch.float64),
            torch.tensor(x["block_nll"], dtype=torch.float64),
            torch.tensor(x["block_tokens"]),
        )
        lines.append(
            f"| {budget:g} | {x['ppl']:,.2f} | {y['ppl']:,.2f} | {d['diff']:,.2f} | "
            f"[{d['low']:,.2f}, {d['high']:,.2f}] | {d['p_not_lower']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text)
    return text


if __name__ == "__main__":
    main()
