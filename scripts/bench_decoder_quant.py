"""Row (a) of the decoder comparison: the quantized base with no adapter, on SmolLM2-135M.

For each budget, the allocation (the configuration every method is scored on, through
``MethodContext.allocations`` with the model's ``quant.solver`` and sensitivity) is applied to the
frozen base and WikiText-2 perplexity is measured over the task's fixed evaluation blocks; full
precision is the reference. ``--sensitivity none|fisher`` (default: the model's
``quant.sensitivity``, docs/quantization.md "Sensitivity") chooses what weights the allocation
errors; rows of a non-default sensitivity are named ``allocation@<bits> (<kind>)``, so one
``--out`` file holds both. Also times the sensitivity, error-table build and allocations (cached
under ``paths.cache_dir``) and writes the compact results as JSON.

    COALORA_CACHE_DIR=<cache with the converted model> python scripts/bench_decoder_quant.py \
        --out docs/results/decoder_quantized_base.json

``--configs FILE ...`` also scores saved configurations, e.g. the held-out random configurations
an ``evaluate.py`` run wrote to ``<eval dir>/configs/<budget>-random<i>.json``, so the base's row
of the held-out table uses the same configurations as the adapters'. ``--skip-allocations``
scores only those (the earlier rows stay in ``--out`` when it exists: new rows replace rows of
the same name).

Numbers go into docs/decoder_lms.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from coalora.data.metrics import bootstrap_perplexity, corpus_nll, perplexity
from coalora.io import atomic_write_json
from coalora.models import build_tokenizer
from coalora.quant import ModelQuantConfig, quantize_model
from coalora.quant.build import QuantSettings
from coalora.quant.sensitivity import SENSITIVITIES
from coalora.report.bench import header_lines
from coalora.stages.build import build_backbone, build_datamodule, method_context

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--configs", nargs="*", default=[], help="configuration JSON files to score")
    ap.add_argument("--skip-allocations", action="store_true")
    ap.add_argument(
        "--sensitivity",
        choices=list(SENSITIVITIES),
        default=None,
        help="what weights the allocation errors (default: the model's)",
    )
    ap.add_argument(
        "--sensitivity-examples",
        type=int,
        default=None,
        help="training examples of the Fisher (default: quant.sensitivity_examples)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data_dir = os.environ.get("COALORA_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    overrides = [f"model={args.model}", "task=wikitext2", "method=qlora", "quant=none",
                 f"paths.data_dir={data_dir}", "data.eval_batch_size=4"]  # fmt: skip
    if args.sensitivity:
        overrides.append(f"quant.sensitivity={args.sensitivity}")
    if args.sensitivity_examples:
        overrides.append(f"quant.sensitivity_examples={args.sensitivity_examples}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.paths.output_dir = "/tmp/coalora-bench-decoder-quant"
    model = build_backbone(cfg).eval()
    dm = build_datamodule(cfg, build_tokenizer(cfg.model))
    loader = dm.val_dataloader()
    ctx = method_context(cfg, model, QuantSettings.from_cfg(cfg.quant), dm)
    kind = ctx.quant.sensitivity
    t0 = time.perf_counter()
    solved = ctx.allocations(model, args.budgets)  # before quantizing: the Fisher needs fp
    table_s = time.perf_counter() - t0
    allocs = {b: a.config for b, a in solved.items()}
    suffix = "" if kind == "none" else f" ({kind})"
    rows = []
    header = header_lines("Quantized SmolLM2 base, no adapter")

    def score(name: str, config) -> None:
        quantize_model(model, ctx.names, config)
        nll, tokens = corpus_nll(model, loader)
        ppl = perplexity(nll, tokens)
        lo, hi = bootstrap_perplexity(nll, tokens)
        bits = 32.0 if config is None else config.average_bits()
        rows.append(
            {
                "config": name,
                "avg_bits": bits,
                "ppl": ppl,
                "ci95": [lo, hi],
                "block_nll": [round(float(v), 6) for v in nll],  # paired tests across files
                "block_tokens": [int(t) for t in tokens],
            }
        )
        print(f"{name} ({bits:.3f} bits): ppl {ppl:.2f} [{lo:.2f}, {hi:.2f}]", flush=True)

    if not args.skip_allocations:
        score("full precision", None)
        for b, config in allocs.items():
            score(f"allocation@{b:g}{suffix}", config)
    for path in args.configs:
        score(f"held-out {Path(path).stem}", ModelQuantConfig.from_json(path))
    if args.out and Path(args.out).is_file():  # keep earlier rows that were not re-scored
        new = {r["config"] for r in rows}
        old = json.loads(Path(args.out).read_text())
        rows = [r for r in old["rows"] if r["config"] not in new] + rows
        if args.skip_allocations:
            table_s = old.get("table_and_allocations_seconds", table_s)
        header = old["header"] + header
    result = {
        "header": header,
        "model": cfg.model.name,
        "task": "wikitext2 (eval split test)",
        "eval_blocks": int(cfg.task.eval_blocks),
        "block_length": int(cfg.task.block_length),
        "target_layers": len(ctx.names),
        "table_and_allocations_seconds": round(table_s, 1),
        "sensitivity": ctx.sensitivity_record(),
        "solver": ctx.quant.solver,
        "solve": {f"{b:g}": a.info.to_dict() for b, a in solved.items() if a.info},
        "rows": rows,
    }
    if args.out:
        atomic_write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "header"}, indent=1))


if __name__ == "__main__":
    main()
