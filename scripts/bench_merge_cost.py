"""What merging a LoRA into the packed base costs: perplexity of a ``format=packed`` export served
with the adapter beside the base (``deploy.load``) vs folded into it (``deploy.load(merge=True)``,
which re-quantizes deq(Q) + s·BA with each layer's option), on the run's own evaluation blocks.

    python scripts/bench_merge_cost.py --run <decoder run dir> [--budgets 3.0 4.0] \
        [--out docs/results/decoder_merge_cost.json]

The run is exported once with ``export.py format=packed quant.budgets=[...]`` into a temporary
folder (a per-budget run exports its own configuration; pass its budget as the label). Perplexity uses the
run's task blocks (WikiText-2 test, 32 × 256 tokens by default) and the same NLL as evaluate.py;
the merge's per-layer relative weight error (``coalora_export["merge_error"]``) is summarised.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from coalora import deploy
from coalora.data.metrics import corpus_nll, perplexity
from coalora.io import atomic_write_json
from coalora.methods import registry
from coalora.models import build_tokenizer
from coalora.report.bench import header_lines
from coalora.stages.build import build_datamodule
from coalora.stages.restore import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a trained decoder run directory")
    ap.add_argument("--budgets", type=float, nargs="+", default=[3.0, 4.0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = load_run_config(args.run)
    loader = build_datamodule(cfg, build_tokenizer(cfg.model)).val_dataloader()
    rows = []
    with tempfile.TemporaryDirectory(prefix="coalora-merge-") as tmp:
        out = Path(tmp) / "export"
        # a per-budget run (QLoRA, LoRA) exports the one configuration it was trained on
        multi = registry()[cfg.method.name].switches_configs
        budgets = "[" + ",".join(f"{b:g}" for b in args.budgets) + "]"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "export.py"), f"ckpt={args.run}", "format=packed",
             *([f"quant.budgets={budgets}"] if multi else []), f"out_dir={out}",
             f"hydra.run.dir={Path(tmp) / 'run'}"],
            check=True,
        )  # fmt: skip
        print(f"export: {time.perf_counter() - t0:.1f} s", flush=True)
        for b in args.budgets:
            row = {"budget": b}
            for merge in (False, True):
                model = deploy.load(out, budget=b if multi else None, merge=merge)
                nll, tokens = corpus_nll(model, loader)
                key = "merged" if merge else "adapter"
                row[f"ppl_{key}"] = perplexity(nll, tokens)
                if merge:
                    errs = list(model.coalora_export["merge_error"].values())
                    row["merge_error_median"] = statistics.median(errs)
                    row["merge_error_max"] = max(errs)
                print(f"{b:g} bits, {key}: ppl {row[f'ppl_{key}']:.3f}", flush=True)
                del model
            row["ppl_change"] = row["ppl_merged"] - row["ppl_adapter"]
            rows.append(row)
    result = {
        "header": header_lines("Merging the LoRA into the packed base: perplexity cost"),
        "run": str(args.run),
        "method": cfg.method.name,
        "model": cfg.model.name,
        "task": f"{cfg.task.name} (eval split {cfg.task.get('eval_split')})",
        "eval_blocks": cfg.task.get("eval_blocks"),
        "rows": rows,
    }
    if args.out:
        atomic_write_json(Path(args.out), result)
    for r in rows:
        print(r)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
