"""Benchmark budget allocation: cold-cache allocation of the 51 default pool budgets per solver.

For each model the MSE error table is built once (its time is reported separately, then it is
read from the cache); then every solver allocates the default pool grid (2.25:7.25:0.1, 51
budgets) with no allocation cache, and the exact solver's cost is compared with HiGHS's wherever
HiGHS proves optimality. Writes the "## Allocation" section of docs/benchmarks.md and a JSON.

    OMP_NUM_THREADS=1 python scripts/bench_allocation.py [--models tiny_bert minilm_l6 smollm2_135m]
        [--solvers exact milp] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from coalora.io import atomic_write_json
from coalora.quant import QuantSettings, QuantSpace, model_weights
from coalora.quant.allocation import allocate, build_error_table, cached_error_table
from coalora.report.bench import header_lines, write_section
from coalora.search.pool import PoolGrid
from coalora.stages.build import build_backbone, method_context

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Allocation: 51 pool budgets, cold allocation cache"
TASK = {"tiny_bert": "sst2", "minilm_l6": "sst2"}


def model_weights_for(name: str, cache_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    task = TASK.get(name, "wikitext2")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"model={name}", f"task={task}", "method=qlora", "quant=none"],
        )
    cfg.paths.cache_dir = str(cache_dir)
    model = build_backbone(cfg).eval()
    ctx = method_context(cfg, model, QuantSettings.from_cfg(cfg.quant), None)
    return model_weights(model, ctx.names), cfg.model.name


def time_table(weights: dict[str, torch.Tensor], blocks: int) -> dict:
    """Seconds to build a fresh (uncached) MSE table of the first ``blocks`` blocks' layers with
    1 and with 2 threads (the tables are checked bit-identical)."""
    layers = sorted({int(m.group(1)) for n in weights if (m := re.search(r"\.(\d+)\.", n))})
    keep = {str(i) for i in layers[:blocks]}
    sub = {
        n: w for n, w in weights.items() if (m := re.search(r"\.(\d+)\.", n)) and m.group(1) in keep
    }
    out, tables = {"layers": len(sub)}, []
    for workers in (1, 2):
        os.environ["COALORA_TABLE_WORKERS"] = str(workers)
        t = time.perf_counter()
        tables.append(build_error_table(sub, QuantSpace()))
        out[f"seconds_{workers}_thread{'s' if workers > 1 else ''}"] = round(
            time.perf_counter() - t, 1
        )
    os.environ.pop("COALORA_TABLE_WORKERS")
    out["identical"] = bool(torch.equal(tables[0].costs, tables[1].costs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny_bert", "minilm_l6", "smollm2_135m"])
    ap.add_argument("--solvers", nargs="+", default=["exact", "milp"])
    ap.add_argument(
        "--milp-models",
        nargs="*",
        default=["minilm_l6"],
        help="models HiGHS also runs on (on tiny_bert it takes 30-45 s per budget)",
    )
    ap.add_argument(
        "--table-blocks",
        type=int,
        default=4,
        help="time a fresh error table of the first N blocks with 1 and 2 threads (0: skip)",
    )
    ap.add_argument("--cache-dir", default=os.environ.get("COALORA_CACHE_DIR"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "allocation_bench.json"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cache_dir = Path(args.cache_dir or ROOT / ".cache" / "coalora")
    torch.set_num_threads(1)
    space = QuantSpace()
    budgets = PoolGrid(2.25, 7.25, 0.1).budgets(space)
    results = []
    for name in args.models:
        weights, model_name = model_weights_for(name, cache_dir)
        t0 = time.perf_counter()
        table = cached_error_table(weights, space, cache_dir, model_name)
        table_s = time.perf_counter() - t0
        print(
            f"{name}: {len(weights)} layers, table {table_s:.1f}s (cache {cache_dir})", flush=True
        )
        row = {"model": name, "layers": len(weights), "table_seconds": round(table_s, 1)}
        costs: dict[str, list[float]] = {}
        for solver in args.solvers:
            if solver == "milp" and name not in args.milp_models:
                continue
            times, statuses, nodes = [], [], []
            t_all = time.perf_counter()
            for b in budgets:
                t = time.perf_counter()
                _, info = allocate(None, b, space, table=table, solver=solver, return_info=True)
                times.append(time.perf_counter() - t)
                statuses.append(info.status)
                nodes.append(info.nodes)
                costs.setdefault(solver, []).append(info.cost)
            total = time.perf_counter() - t_all
            row[solver] = {
                "total_seconds": round(total, 2),
                "median_seconds": round(statistics.median(times), 4),
                "max_seconds": round(max(times), 3),
                "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
                "max_nodes": int(max(nodes)),
            }
            print(f"  {solver}: {len(budgets)} budgets in {total:.2f}s, {row[solver]}", flush=True)
        if args.table_blocks:
            row["table_threads"] = time_table(weights, args.table_blocks)
            print(
                f"  fresh table of {args.table_blocks} blocks: {row['table_threads']}", flush=True
            )
        if "exact" in costs and "milp" in costs:
            a, m = np.array(costs["exact"]), np.array(costs["milp"])
            row["exact_minus_milp_max_rel"] = float(np.max((a - m) / np.maximum(np.abs(m), 1e-300)))
        results.append(row)
    out = {"budgets": budgets, "results": results}
    if args.no_write:
        print(json.dumps(out, indent=1))
        return
    atomic_write_json(args.json, out)
    lines = header_lines(SECTION)
    lines += [
        "",
        f"Budgets {budgets[0]:g}:{budgets[-1]:g} step 0.1 ({len(budgets)}), full 432-option "
        "space, MSE error table (built once, then cached). Times are for the allocations alone.",
        "",
        "| model | layers | table build (s) | solver | 51 budgets (s) | median (s) | max (s) "
        "| statuses |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        for s in args.solvers:
            if s not in r:
                continue
            d = r[s]
            lines.append(
                f"| {r['model']} | {r['layers']} | {r['table_seconds']} | {s} | "
                f"{d['total_seconds']} | {d['median_seconds']} | {d['max_seconds']} | "
                f"{', '.join(f'{k}: {v}' for k, v in d['statuses'].items())} |"
            )
    lines.append("")
    lines.append(
        "Largest relative cost difference exact − HiGHS (negative: exact found a cheaper "
        "allocation where HiGHS stopped at its node limit): "
        + ", ".join(
            f"{r['model']} {r.get('exact_minus_milp_max_rel', float('nan')):.2e}" for r in results
        )
    )
    lines += [
        "",
        "Error table build, fresh (no cache), full space, the first blocks' layers, by threads "
        "(`COALORA_TABLE_WORKERS`; bit-identical tables):",
        "",
        "| model | layers | 1 thread (s) | 2 threads (s) | identical |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        t = r.get("table_threads")
        if t:
            lines.append(
                f"| {r['model']} | {t['layers']} | {t['seconds_1_thread']} | "
                f"{t['seconds_2_threads']} | {t['identical']} |"
            )
    write_section(ROOT / "docs" / "benchmarks.md", SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
