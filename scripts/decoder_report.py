"""The SmolLM2 five-method comparison table (docs/decoder_lms.md) from the compact results that
``scripts/decoder_comparison.sh`` commits under ``docs/results/decoder_smollm2/<run>/``.

    python scripts/decoder_report.py [--results docs/results/decoder_smollm2]
        [--base docs/results/decoder_quantized_base.json] [--out <results>/report.md]
        [--figure docs/figures/decoder_smollm2_ppl_vs_bits.png]

Reads each run's ``results.json`` (perplexity per scored configuration), ``predictions.csv``
(per evaluation block: scored tokens and summed NLL, one column per configuration) and
``run.json`` (overrides, train/eval seconds). Writes one markdown report: perplexity at each
budget's allocation per method (mean over seeds, each seed listed), the held-out random
configurations, paired block-bootstrap intervals of CoA-LoRA − Shared-LoRA and CoA-LoRA −
QLoRA, the rank ablation, wall times; and a PNG of perplexity vs average bits (log scale).
Runs not present yet are listed as missing, so the report can be rebuilt after every sitting.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

import torch

from coalora.data.metrics import bootstrap_perplexity, paired_bootstrap_perplexity, perplexity
from coalora.report.bench import emit_markdown, header_lines
from coalora.report.plots import plot_metric_vs_bits

BUDGETS = (2.5, 3.0, 3.5, 4.0)
# (row label, run-name pattern); {b} is a budget, {s} a seed
SERIES = {
    "(b) LoRA, full-precision base": r"lora",
    "(c) QLoRA, one adapter per budget": r"qlora_b{b}",
    "(d) LQ-LoRA, one per budget": r"lq_lora_b{b}",
    "(d) QWHA, one per budget": r"qwha_b{b}",
    "(e) Shared-LoRA, trained on the pool": r"shared_lora_s{s}",
    "(e) Shared-LoRA, trained on the 4 budgets only (paper)": r"shared_lora_evalonly_s{s}",
    "(f) CoA-LoRA": r"coalora_s{s}",
    "(e) Shared-LoRA, pool, 4× steps": r"shared_lora_x4_s{s}",
    "(e) Shared-LoRA, 4 budgets only, 4× steps": r"shared_lora_evalonly_x4_s{s}",
    "(f) CoA-LoRA, 4× steps": r"coalora_x4_s{s}",
    "ablation: Shared-LoRA r=32": r"shared_lora_r32_s{s}",
    "ablation: CoA-LoRA r=32": r"coalora_r32_s{s}",
}
# runs named with their shared initialisation (scripts/decoder_comparison.sh: <method>_<init>_...)
for _init in ("zero", "lpq", "lq"):
    SERIES.update(
        {
            f"(e) Shared-LoRA, init={_init}, 4× steps": rf"shared_lora_{_init}_x4_s{{s}}",
            f"(f) CoA-LoRA, init={_init}, 4× steps": rf"coalora_{_init}_x4_s{{s}}",
            f"(e) Shared-LoRA, init={_init}": rf"shared_lora_{_init}_s{{s}}",
            f"(f) CoA-LoRA, init={_init}": rf"coalora_{_init}_s{{s}}",
            f"ablation: Shared-LoRA init={_init} r=32": rf"shared_lora_{_init}_r32_s{{s}}",
            f"ablation: CoA-LoRA init={_init} r=32": rf"coalora_{_init}_r32_s{{s}}",
        }
    )
    if _init != "zero":  # method.mapper.mix=learned (the same as full for init=zero)
        SERIES.update(
            {
                f"(f) CoA-LoRA, init={_init}, mix=learned, 4× steps": (
                    rf"coalora_{_init}_learned_x4_s{{s}}"
                ),
                f"(f) CoA-LoRA, init={_init}, mix=learned": rf"coalora_{_init}_learned_s{{s}}",
                f"ablation: CoA-LoRA init={_init}, mix=learned r=32": (
                    rf"coalora_{_init}_learned_r32_s{{s}}"
                ),
            }
        )
PER_BUDGET = ("qlora", "lq_lora", "qwha")  # the single-configuration methods, one run per budget
GOAL = 0.05  # CoA-LoRA within 5% of the best per-budget perplexity (repository issue #21)


class Run:
    """One run's compact results: ppl per configuration column, per-block NLL and tokens."""

    def __init__(self, path: Path):
        self.name = path.name
        self.results = json.loads((path / "results.json").read_text())
        info = path / "run.json"
        self.info = json.loads(info.read_text()) if info.is_file() else {}
        self.rows = {self.column(r): r for r in self.results["rows"]}
        # allocation column by budget (a per-budget run labels its column with its own average
        # bits, e.g. "2.9987"; every multi-configuration run uses the budget, e.g. "3")
        self.alloc = {
            round(float(r["budget"]), 1): c
            for c, r in self.rows.items()
            if r["kind"] == "allocation"
        }
        with open(path / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        self.blocks = [int(r["example"]) for r in rows]
        self.tokens = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float64)
        cols = [c for c in rows[0] if c not in ("example", "label")] if rows else []
        self.nll = {c: torch.tensor([float(r[c]) for r in rows], dtype=torch.float64) for c in cols}

    @staticmethod
    def column(row: dict) -> str:
        label = f"{float(row['budget']):g}"  # evaluate.py's column label ("32" for fp)
        return label if row["kind"] == "allocation" else f"{label}-{row['kind']}"

    def ppl(self, column: str) -> float | None:
        row = self.rows.get(column)
        return None if row is None else float(row["ppl"])

    def avg_bits(self, column: str) -> float | None:
        row = self.rows.get(column)
        return None if row is None else float(row["avg_bits"])


def load_runs(results: Path) -> dict[str, Run]:
    runs = {}
    for d in sorted(results.iterdir()):
        if (d / "results.json").is_file() and (d / "predictions.csv").is_file():
            runs[d.name] = Run(d)
    return runs


def series_runs(runs: dict[str, Run], pattern: str, budget: float) -> list[Run]:
    """Runs of one series that serve ``budget`` (every seed of a multi-configuration method)."""
    rx = re.compile(
        "^" + pattern.replace("{b}", re.escape(f"{budget:.1f}")).replace("{s}", r"\d+") + "$"
    )
    return [r for n, r in sorted(runs.items()) if rx.match(n)]


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 1e5:
        return f"{v:.2e}"
    return f"{v:,.1f}" if v >= 100 else f"{v:.2f}"


def ppls(runs: list[Run], column: str | float) -> list[float]:
    """Perplexity of ``column`` in each run that scored it; a float column is that budget's
    allocation."""
    vals = []
    for r in runs:
        col = r.alloc.get(round(column, 1)) if isinstance(column, float) else column
        p = r.ppl(col) if col else None
        if p is not None:
            vals.append(p)
    return vals


def mean_ppl(runs: list[Run], column: str | float) -> float | None:
    vals = ppls(runs, column)
    return statistics.mean(vals) if vals else None


def cell(runs: list[Run], column: str | float) -> str:
    """Perplexity of ``column`` over ``runs`` (seed mean, each seed listed)."""
    vals = ppls(runs, column)
    if not vals:
        return "—"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(statistics.mean(vals))} ({' / '.join(fmt(v) for v in vals)})"


def table_allocations(runs: dict[str, Run], base: dict | None) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"{b:g} bits" for b in BUDGETS) + " | runs |",
        "|---|" + "---:|" * len(BUDGETS) + "---|",
    ]
    if base:
        by_bits = {round(r["avg_bits"], 2): r["ppl"] for r in base["rows"]}
        lines.append(
            "| (a) quantized base, no adapter | "
            + " | ".join(fmt(by_bits.get(b)) for b in BUDGETS)
            + f" | fp32 base: {fmt(by_bits.get(32.0))} |"
        )
    missing: list[str] = []
    for label, pattern in SERIES.items():
        if pattern == "lora":
            run = runs.get("lora")
            if run is None:
                missing.append(label)
                continue
            val = fmt(run.ppl("32"))
            lines.append(f"| {label} | " + " | ".join([val] * len(BUDGETS)) + " | lora (32 bits) |")
            continue
        cells, names = [], set()
        for b in BUDGETS:
            rs = series_runs(runs, pattern, b)
            names.update(r.name for r in rs)
            cells.append(cell(rs, b))
        if names:
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(sorted(names))} |")
        elif not any(f"_{i}_" in pattern for i in ("zero", "lpq", "lq")):
            missing.append(label)
    if missing:  # the init-named series are listed only once they have a run
        lines += ["", "Not run yet: " + "; ".join(missing) + "."]
    return lines


def table_held_out(runs: dict[str, Run], base: dict | None = None) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"near {b:g}" for b in BUDGETS) + " |",
        "|---|" + "---:|" * len(BUDGETS),
    ]
    any_run = next((r for r in runs.values() if any("-random" in c for c in r.rows)), None)
    if any_run is not None:
        bits = [any_run.avg_bits(f"{b:g}-random0") for b in BUDGETS]
        lines.append(
            "| (average bits of the held-out configuration) | "
            + " | ".join("—" if x is None else f"{x:.3f}" for x in bits)
            + " |"
        )
    if base:  # scripts/bench_decoder_quant.py --configs <the held-out configurations>
        by_name = {r["config"]: r["ppl"] for r in base["rows"]}
        lines.append(
            "| (a) quantized base, no adapter | "
            + " | ".join(fmt(by_name.get(f"held-out {b:g}-random0")) for b in BUDGETS)
            + " |"
        )
    for label, pattern in SERIES.items():
        if "{s}" not in pattern:
            continue
        rs = series_runs(runs, pattern, BUDGETS[0])
        if rs:
            lines.append(
                f"| {label} | " + " | ".join(cell(rs, f"{b:g}-random0") for b in BUDGETS) + " |"
            )
    return lines


COALORA_RUN = re.compile(r"coalora(_zero|_lpq|_lq)?(?:_learned)?(_r32|_x4)?_s(\d+)")
SHARED_RUN = r"shared_lora(_evalonly)?(_zero|_lpq|_lq)?{variant}_s{seed}"


def paired_lines(runs: dict[str, Run], reps: int) -> list[str]:
    """CoA-LoRA − X on the same blocks, per seed and budget (allocation + held-out): X = every
    Shared-LoRA run of the same seed and steps (any init), and each per-budget method."""
    lines = [
        "| CoA-LoRA run | − other run | configuration | ppl CoA-LoRA | ppl other | difference | "
        "95% CI | P(CoA-LoRA not lower) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    pairs = []
    for name, run in sorted(runs.items()):
        m = COALORA_RUN.fullmatch(name)
        if not m:
            continue
        variant, seed = m.group(2) or "", m.group(3)
        rx = re.compile(SHARED_RUN.format(variant=re.escape(variant), seed=seed))
        for other in sorted(n for n in runs if rx.fullmatch(n)):
            pairs += [(run, runs[other], (c, c)) for c in run.nll if c in runs[other].nll]
        if variant == "_r32":
            continue  # the per-budget runs are rank 8
        for b in BUDGETS:
            for method in PER_BUDGET:
                q = runs.get(f"{method}_b{b:.1f}")
                if q is not None and q.alloc.get(b) in q.nll and f"{b:g}" in run.nll:
                    pairs.append((run, q, (f"{b:g}", q.alloc[b])))
    for a, b, (col, col_b) in pairs:
        if a.blocks != b.blocks or not torch.equal(a.tokens, b.tokens):
            raise SystemExit(f"error: {a.name} and {b.name} scored different blocks")
        d = paired_bootstrap_perplexity(a.nll[col], b.nll[col_b], a.tokens, n_resamples=reps)
        lines.append(
            f"| {a.name} | {b.name} | {col} | {fmt(perplexity(a.nll[col], a.tokens))} | "
            f"{fmt(perplexity(b.nll[col_b], b.tokens))} | {d['diff']:+.3g} | "
            f"[{d['low']:+.3g}, {d['high']:+.3g}] | {d['p_not_lower']:.3f} |"
        )
    return lines


def goal_lines(runs: dict[str, Run]) -> list[str]:
    """Per budget: the best per-budget method vs each 4×-steps CoA-LoRA series (seed mean), and
    the lowest Shared-LoRA 4×-steps series, at the allocation and at the held-out configuration."""
    coa = {n: p for n, p in SERIES.items() if p.startswith("coalora") and "_x4_" in p}
    shared = {n: p for n, p in SERIES.items() if p.startswith("shared_lora") and "_x4_" in p}
    lines = [
        "| budget | best per-budget (ppl) | CoA-LoRA series | ppl | vs best | within "
        f"{GOAL:.0%}? | lowest Shared-LoRA (ppl) | held-out: CoA-LoRA / lowest Shared-LoRA |",
        "|---:|---|---|---:|---:|---|---|---|",
    ]

    for b in BUDGETS:
        per = {m: mean_ppl(series_runs(runs, f"{m}_b{{b}}", b), b) for m in PER_BUDGET}
        per = {m: p for m, p in per.items() if p is not None}
        best = min(per.items(), key=lambda kv: kv[1]) if per else None
        sh = {
            label: (
                mean_ppl(series_runs(runs, p, b), b),
                mean_ppl(series_runs(runs, p, b), f"{b:g}-random0"),
            )
            for label, p in shared.items()
        }
        sh = {k: v for k, v in sh.items() if v[0] is not None}
        low = min(sh.items(), key=lambda kv: kv[1][0]) if sh else None
        low_h = min((v[1] for v in sh.values() if v[1] is not None), default=None)
        for label, pattern in coa.items():
            rs = series_runs(runs, pattern, b)
            p = mean_ppl(rs, b)
            if p is None:
                continue
            held = mean_ppl(rs, f"{b:g}-random0")
            rel = p / best[1] - 1 if best else None
            lines.append(
                f"| {b:g} | {f'{best[0]} {fmt(best[1])}' if best else '—'} | {label} | {fmt(p)} | "
                f"{'—' if rel is None else f'{rel:+.1%}'} | "
                f"{'—' if rel is None else ('yes' if rel <= GOAL else 'no')} | "
                f"{f'{low[0]}: {fmt(low[1][0])}' if low else '—'} | {fmt(held)} / {fmt(low_h)} |"
            )
    return lines


def ci_lines(runs: dict[str, Run], reps: int) -> list[str]:
    lines = ["| run | configuration | ppl | 95% block-bootstrap CI |", "|---|---|---:|---|"]
    for name, run in sorted(runs.items()):
        for col in run.nll:
            if "-random" in col:
                continue
            lo, hi = bootstrap_perplexity(run.nll[col], run.tokens, n_resamples=reps)
            lines.append(f"| {name} | {col} | {fmt(run.ppl(col))} | {fmt(lo)} – {fmt(hi)} |")
    return lines


def time_lines(runs: dict[str, Run]) -> list[str]:
    lines = ["| run | train s | evaluate s | overrides |", "|---|---:|---:|---|"]
    for name, run in sorted(runs.items()):
        i = run.info
        ov = " ".join(
            o for o in str(i.get("overrides", "")).split() if not o.startswith(("model=", "task="))
        )
        lines.append(f"| {name} | {i.get('train_s', '—')} | {i.get('eval_s', '—')} | `{ov}` |")
    return lines


def plot(runs: dict[str, Run], base: dict | None, path: Path) -> None:
    series: dict[str, list[dict]] = {}
    if base:
        series["quantized base"] = [
            {
                "avg_bits": r["avg_bits"],
                "kind": "allocation" if r["config"].startswith("allocation") else "random0",
                "ppl": r["ppl"],
            }
            for r in base["rows"]
            if r["avg_bits"] < 16
        ]
    for label, pattern in SERIES.items():
        if pattern == "lora" or label.startswith("ablation"):  # ablations: tables only
            continue
        groups: dict[tuple[str, float], list[dict]] = {}
        for b in BUDGETS:
            for r in series_runs(runs, pattern, b):
                for col, row in r.rows.items():
                    if col in (r.alloc.get(b), f"{b:g}-random0"):
                        groups.setdefault((row["kind"], b), []).append(row)
        rows = [  # seeds averaged: one point per configuration, ± std band when 2+ seeds
            {
                "avg_bits": statistics.mean(r["avg_bits"] for r in g),
                "kind": kind,
                "ppl": statistics.mean(r["ppl"] for r in g),
                "ppl_std": statistics.stdev([r["ppl"] for r in g]) if len(g) > 1 else None,
            }
            for (kind, _), g in sorted(groups.items(), key=lambda kv: kv[0][1])
        ]
        if rows:
            series[label.split(") ", 1)[-1]] = rows
    refs = {"LoRA": runs["lora"].ppl("32")} if "lora" in runs else None
    plot_metric_vs_bits(series, path, metric="ppl", references=refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="docs/results/decoder_smollm2")
    ap.add_argument("--base", default="docs/results/decoder_quantized_base.json")
    ap.add_argument("--out", default=None)
    ap.add_argument("--figure", default="docs/figures/decoder_smollm2_ppl_vs_bits.png")
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()
    results = Path(args.results)
    runs = load_runs(results)
    if not runs:
        raise SystemExit(f"error: no runs with results.json + predictions.csv under {results}")
    base = json.loads(Path(args.base).read_text()) if Path(args.base).is_file() else None
    lines = header_lines("SmolLM2-135M + WikiText-2: five methods at 2.5–4 bits")
    lines += [
        "Perplexity on WikiText-2 **test** (32 evenly spread blocks of 256 tokens = 8,160 scored "
        "tokens), adapters fine-tuned on WikiText-2 **valid**; every run: 40 optimizer steps × 2 "
        "blocks × 256 tokens = 20,480 training tokens (4× steps runs: 160 steps, 81,920 tokens, "
        "the compute of the four per-budget runs together), lr 1e-3 (linear decay, 6% warm-up), "
        "rank 8 unless stated, one configuration per step, fp32 on the CPU. Multi-seed cells: "
        "mean (seed 42 / seed 43). Overrides of every run: last table.",
        "",
        "### Perplexity at each budget's allocation",
        "",
        *table_allocations(runs, base),
        "",
        "### Held-out random configurations near each budget (never trained on)",
        "",
        *table_held_out(runs, base),
        "",
        "### Goal lines (CoA-LoRA at equal compute vs the best per-budget method and Shared-LoRA)",
        "",
        *goal_lines(runs),
        "",
        "### Paired differences (block bootstrap over the 32 evaluation blocks)",
        "",
        *paired_lines(runs, args.reps),
        "",
        "### Per-run perplexity intervals",
        "",
        *ci_lines(runs, args.reps),
        "",
        "### Wall time per run",
        "",
        *time_lines(runs),
    ]
    emit_markdown(lines, args.out or results / "report.md")
    plot(runs, base, Path(args.figure))
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
