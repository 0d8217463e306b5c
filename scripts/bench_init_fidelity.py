"""Step-0 fidelity of Shared-LoRA / CoA-LoRA's ``method.init`` (zero | lpq | lq), no training.

For each initialisation the run is built as training builds it (``build_untrained``: the default
pool, its allocations, ``method.setup``) and, at the allocation of every evaluation budget, the
effective weight of every target is compared with the full-precision ``W``:

    zero: deq(quantize_c(W))                 (B = 0)
    lpq / lq: deq(quantize_c(W − L)) + s·B·A  (s·B·A = L at step 0)

Reported: the relative error over all targets ``sqrt(Σ‖W_eff − W‖² / Σ‖W‖²)`` and the mean of the
per-layer relative errors. With ``--dev`` (encoders) also the untrained model on the task's dev
split with the seeded random head, the same for every initialisation: accuracy, loss, and the
fidelity of the final hidden states to the full-precision model (``h rel`` = ‖h − h_fp‖/‖h_fp‖
over dev tokens, ``CLS cos`` = mean cosine of the final [CLS] state the head reads), as
scripts/bench_baselines.py measures step 0. Shared-LoRA is measured; CoA-LoRA's step-0 ΔW differs
only by the mapper's initial U (std 1e-3). docs/methods.md, "Quantization-aware initialisation".

Writes docs/results/init_fidelity_<model>.{json,md} (init_fidelity_minilm for MiniLM-L6).

    COALORA_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 python scripts/bench_init_fidelity.py --dev
    OMP_NUM_THREADS=1 python scripts/bench_init_fidelity.py --model tiny_llama
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coalora.io import atomic_write_json
from coalora.quant import model_weights
from coalora.report.bench import emit_markdown, header_lines, repo_command
from coalora.stages.build import build_untrained
from coalora.stages.evaluate import random_near

ROOT = Path(__file__).resolve().parents[1]
INITS = ("zero", "lpq", "lq")
# tiny_llama reads the fixture WikiText-2 (its data is only needed for the datamodule)
MODEL_ARGS = {
    "minilm_l6": ["model=minilm_l6", "task=sst2"],
    "tiny_llama": [
        "model=tiny_llama",
        "task=wikitext2",
        f"paths.data_dir={ROOT / 'tests/fixtures'}",
        "data.allow_hub=false",
        "task.block_length=32",
        "task.max_train_blocks=16",
        "task.eval_blocks=4",
    ],  # fmt: skip
}


@torch.no_grad()
def weight_errors(model, method, budgets: list[float], originals, held_out: int) -> dict:
    """Relative error of the effective target weights against ``originals`` at every budget's
    allocation (``"<b>"``) and at ``held_out`` random configurations near it (``"<b>-random<i>"``,
    evaluate.py's held-out draw, seeded: the same configurations for every initialisation)."""
    rng = random.Random(0)
    out = {}
    for b in budgets:
        alloc = method.eval_set[f"{b:g}"]
        near = [random_near(alloc, method.space, b, 0.1, rng) for _ in range(held_out)]
        configs = {f"{b:g}": alloc, **{f"{b:g}-random{i}": c for i, c in enumerate(near) if c}}
        for label, config in configs.items():
            method.switch_base(model, config)
            d2 = w2 = rel = 0.0
            for name, lora in zip(method.names, method.loras, strict=True):
                w = originals[name].double()
                eff = lora.base_layer.weight.double() + lora.delta_weight().double()
                e, n = float((eff - w).square().sum()), float(w.square().sum())
                d2, w2, rel = d2 + e, w2 + n, rel + (e / n) ** 0.5
            out[label] = {
                "avg_bits": round(config.average_bits(), 4),
                "rel_err": (d2 / w2) ** 0.5,
                "layer_rel_err_mean": rel / len(method.names),
            }
    return out


@torch.no_grad()
def dev_pass(model, loader, ref: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """Accuracy, loss and (against ``ref``) final-hidden-state fidelity on the dev split."""
    model.eval()
    n = correct = tokens = 0
    loss = d2 = r2 = cls_cos = 0.0
    outs = []
    for i, batch in enumerate(loader):
        out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()
        h, cls = out.hidden_states[-1][mask], out.hidden_states[-1][:, 0]  # (tokens, H), (B, H)
        bs = batch["labels"].shape[0]
        n += bs
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss += float(out.loss) * bs
        if ref is None:
            outs.append({"h": h, "cls": cls})
            continue
        d2 += float((h - ref[i]["h"]).square().sum())
        r2 += float(ref[i]["h"].square().sum())
        cls_cos += float(F.cosine_similarity(cls, ref[i]["cls"], dim=-1).sum())
        tokens += h.shape[0]
    m = {"acc": correct / n, "loss": loss / n}
    if ref is not None:
        m |= {"h_rel": (d2 / r2) ** 0.5, "cls_cos": cls_cos / n}
    return m, outs


def fit_line(fit: dict) -> str:
    """How lq fitted L: its configurations, iterates and weighting."""
    bits = ", ".join(f"{b:.2f}" for b in fit["fitted_configs_avg_bits"])
    weighting = "Fisher-weighted" if fit["fisher"] else "unweighted"
    return (
        f"fitted to the training set's configurations at {bits} bits, {weighting}, "
        f"{fit['iterates_mean']:g} iterates per layer on average"
    )


def set_eval_config(model, method, budget: float) -> None:
    method.switch_base(model, method.eval_set[f"{budget:g}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm_l6", choices=list(MODEL_ARGS))
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    ap.add_argument("--dev", action="store_true", help="also score the untrained model on dev")
    ap.add_argument("--held-out", type=int, default=2, help="random configurations per budget")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "coalora")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra train.py overrides, e.g. method.init_iters=20")  # fmt: skip
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.model == "minilm_l6" and not os.environ.get("COALORA_DATA_DIR"):
        sys.exit("set COALORA_DATA_DIR to the folder holding glue/SST-2 (e.g. /work/shared/data)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out_dir = Path(tempfile.mkdtemp(prefix="bench_init_"))
    budgets = "[" + ",".join(f"{b:g}" for b in args.budgets) + "]"
    base = [*MODEL_ARGS[args.model], "method=shared_lora", f"method.eval_budgets={budgets}",
            *args.set]  # fmt: skip
    ref = fp = None
    rows = []
    for init in args.inits:
        t0 = time.perf_counter()
        dm, model, method, setup_s = build_untrained(
            [*base, f"method.init={init}"], args.cache_dir, out_dir
        )
        originals = {n: w.clone() for n, w in model_weights(model, method.names).items()}
        row = {"init": init, "setup_seconds": round(setup_s, 2),
               "fit": method.describe().get("init_fit"),
               "weights": weight_errors(model, method, args.budgets, originals,
                                        args.held_out)}  # fmt: skip
        if args.dev:
            loader = dm.val_dataloader()
            if ref is None:  # full precision with the same seeded head
                for layer in method.qlayers.values():
                    layer.set_config(None)  # serves W (zero) / W − L + L (lpq, lq)
                fp, ref = dev_pass(model, loader)
            row["dev"] = {}
            for b in args.budgets:
                set_eval_config(model, method, b)
                row["dev"][f"{b:g}"] = dev_pass(model, loader, ref)[0]
        rows.append(row)
        print(f"{init}: {row} ({time.perf_counter() - t0:.0f} s)", flush=True)
        del model, method, dm
    if args.no_write:
        return
    command = repo_command(ROOT)
    if args.model == "minilm_l6":
        command = "COALORA_DATA_DIR=/work/shared/data " + command
    title = f"Step-0 fidelity of method.init ({args.model})"
    lines = header_lines(title, command)
    lines[0] = f"# {title}"
    lines += [
        "Shared-LoRA (rank 8, default pool and allocations), **untrained**; the allocation at each "
        "budget. `rel err` = sqrt(Σ‖W_eff − W‖² / Σ‖W‖²) over all targets, `layer mean` = mean of "
        "the per-layer relative errors; W_eff = deq(quantize_c(W)) for zero, "
        "deq(quantize_c(W − L)) + s·B·A for lpq / lq.",
        "",
        "| budget | avg bits | "
        + " | ".join(f"{r['init']} rel err" for r in rows)
        + " | "
        + " | ".join(f"{r['init']} layer mean" for r in rows)
        + " |",
        "|---:|---:|" + "---:|" * (2 * len(rows)),
    ]
    for b in args.budgets:
        k = f"{b:g}"
        lines.append(
            f"| {k} | {rows[0]['weights'][k]['avg_bits']:.3f} | "
            + " | ".join(f"{r['weights'][k]['rel_err']:.4f}" for r in rows)
            + " | "
            + " | ".join(f"{r['weights'][k]['layer_rel_err_mean']:.4f}" for r in rows)
            + " |"
        )
    if args.held_out:
        lines += [
            "",
            f"Held-out configurations: {args.held_out} random per-layer perturbations of each "
            "allocation within ±0.1 bits (evaluate.py's draw, seeded, the same for every init); "
            "`rel err` of each, in order.",
            "",
            "| budget | " + " | ".join(f"{r['init']} rel err" for r in rows) + " |",
            "|---:|" + "---|" * len(rows),
        ]
        for b in args.budgets:
            keys = [k for k in rows[0]["weights"] if k.startswith(f"{b:g}-random")]
            lines.append(
                f"| {b:g} | "
                + " | ".join(
                    " / ".join(f"{r['weights'][k]['rel_err']:.4f}" for k in keys) for r in rows
                )
                + " |"
            )
    lines += ["", "Fitting L (s, inside `method.setup`): "
              + ", ".join(f"{r['init']} {r['fit']['seconds']:.1f}" for r in rows if r["fit"])
              + "; `method.setup` in all (s; the first build includes any error table and pool "
              "not yet cached): " + ", ".join(f"{r['init']} {r['setup_seconds']:.1f}" for r in rows)
              + ". lq: " + "; ".join(fit_line(r["fit"]) for r in rows if r["init"] == "lq")
              + "."]  # fmt: skip
    if args.dev:
        lines += [
            "",
            f"Untrained model on dev with the seeded random head (the same for every init; full "
            f"precision: acc {fp['acc']:.4f}, loss {fp['loss']:.4f}). `h rel` = ‖h − h_fp‖/‖h_fp‖ "
            "of the final hidden states over dev tokens, `CLS cos` = mean cosine of the final "
            "[CLS] state.",
            "",
            "| budget | init | dev acc | dev loss | h rel ↓ | CLS cos ↑ |",
            "|---:|---|---:|---:|---:|---:|",
            *[
                f"| {b:g} | {r['init']} | {r['dev'][f'{b:g}']['acc']:.4f} | "
                f"{r['dev'][f'{b:g}']['loss']:.4f} | {r['dev'][f'{b:g}']['h_rel']:.4f} | "
                f"{r['dev'][f'{b:g}']['cls_cos']:.4f} |"
                for b in args.budgets
                for r in rows
            ],
        ]
    short = {"minilm_l6": "minilm"}.get(args.model, args.model)
    stem = ROOT / "docs" / "results" / f"init_fidelity_{short}"
    atomic_write_json(stem.with_suffix(".json"),
                      {"header": lines[:6], "fp_dev": fp, "rows": rows})  # fmt: skip
    emit_markdown(lines, stem.with_suffix(".md"))


if __name__ == "__main__":
    main()
