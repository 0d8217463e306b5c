"""Step-0 comparison of the per-configuration baselines: QLoRA vs LQ-LoRA vs QWHA.

On MiniLM-L6 + SST-2 (real data, ``COALORA_DATA_DIR``), at each budget: build every method with
``prepare(cfg)`` + ``method.setup`` (``quant=budget``), time the setup (initialisation), and score the
untrained model on the dev split.  The task head is random at step 0 (identical for every method:
same seed), so dev accuracy is near chance for all of them; the head-independent measures are the
fidelity of the final hidden states to the full-precision model on dev tokens (relative error,
cosine) and of the [CLS] state the pooler and head read (cosine).  The output distribution under
the random head is near uniform for every model, so its KL to the fp model's says little.

Error tables are built once up front (plain, and LQ-LoRA's decomposition-aware one), so the
per-method setup times do not include them; the table build times are reported separately.

    COALORA_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 python scripts/bench_baselines.py

``--from-ckpt <full-precision LoRA run>`` measures step 0 with a *trained* head instead: the run's
LoRA is merged into W (W' = W + ΔW) and its head kept, then every method quantizes W' with its own
initialisation at each budget (QLoRA: quant(W'); LQ-LoRA: Q + L1 L2 of W'; QWHA: Q(W') + F·H from
its init) and the dev accuracy is read with that head. This is the post-training-quantization view
of "which initialisation starts closer", in accuracy rather than hidden-state error. Error tables
of W' are built inside the first setup at each budget (so those setup times include them).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from coalora.report.bench import write_section
from coalora.stages.build import build_backbone, build_untrained, compose_train

ROOT = Path(__file__).resolve().parents[1]

SECTION = "## Baselines at step 0 (LQ-LoRA, QWHA vs QLoRA)"
SECTION_TRAINED = "## Baselines at step 0 with a trained head (quantizing a fine-tuned model)"
METHODS = {
    "qlora": ["method=qlora"],
    "lq_lora": ["method=lq_lora"],
    "lq_lora (plain alloc.)": ["method=lq_lora", "method.lq.allocation=quantization"],
    "qwha": ["method=qwha"],
}


@torch.no_grad()
def dev_pass(model, loader, ref: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """Accuracy, loss and (against ``ref``) hidden-state / output fidelity on the dev split."""
    model.eval()
    n = correct = 0
    loss_sum = 0.0
    d2 = r2 = cos_sum = cls_sum = 0.0
    tokens = 0
    outs = []
    for i, batch in enumerate(loader):
        out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"].bool()
        h = out.hidden_states[-1][mask]  # (tokens, hidden)
        cls = out.hidden_states[-1][:, 0]  # (B, hidden): what the pooler + head see
        bs = batch["labels"].shape[0]
        n += bs
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(out.loss) * bs
        if ref is None:
            outs.append({"h": h, "cls": cls})
            continue
        hr = ref[i]["h"]
        d2 += float((h - hr).square().sum())
        r2 += float(hr.square().sum())
        cos_sum += float(F.cosine_similarity(h, hr, dim=-1).sum())
        tokens += h.shape[0]
        cls_sum += float(F.cosine_similarity(cls, ref[i]["cls"], dim=-1).sum())
    m = {"acc": correct / n, "loss": loss_sum / n}
    if ref is not None:
        m |= {"h_rel": (d2 / r2) ** 0.5, "h_cos": cos_sum / tokens, "cls_cos": cls_sum / n}
    return m, outs


def build_tables(budgets, cache_dir, out_dir, full_layers: int) -> dict[str, float]:
    """Plain and LQ tables into ``cache_dir`` (timed), plus an unpruned LQ-table estimate."""
    from coalora.methods.lq_lora import LQSettings
    from coalora.methods.lq_table import cached_lq_error_table, lq_error_table
    from coalora.models import build_model, target_names
    from coalora.quant import cached_error_table, model_weights, quant_space

    cfg = compose_train(["method=lq_lora", "quant=budget"], cache_dir, out_dir)
    model = build_model(cfg.model, num_labels=cfg.task.num_labels, seed=cfg.seed)
    names = target_names(model, list(cfg.model.target_modules))
    weights = model_weights(model, names)
    space = quant_space(cfg.quant)
    lq = LQSettings.from_cfg(cfg.method.lq)
    t0 = time.perf_counter()
    plain = cached_error_table(weights, space, cache_dir, cfg.model.name)
    t_plain = time.perf_counter() - t0
    kw = dict(randomized=lq.randomized, oversampling=lq.oversampling, seed=lq.seed)
    _, t_lq = cached_lq_error_table(weights, space, cache_dir, cfg.model.name, cfg.method.rank,
                                    lq.table_iters, plain=plain, **kw)  # fmt: skip
    out = {"plain": t_plain, "lq_pruned": t_lq, "layers": len(names), "options": len(space)}
    if full_layers:
        sub = dict(list(weights.items())[:full_layers])
        t0 = time.perf_counter()
        lq_error_table(sub, space, cfg.method.rank, lq.table_iters, **kw)
        out["lq_full_estimate"] = (time.perf_counter() - t0) * len(names) / full_layers
        out["full_layers"] = full_layers
    print(f"tables: {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument(
        "--full-table-layers",
        type=int,
        default=6,
        help="time an unpruned LQ table on this many layers (0: skip)",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--from-ckpt",
        type=Path,
        default=None,
        help="a full-precision LoRA run: merge it and keep its head (step 0 with a trained head)",
    )
    args = ap.parse_args()
    if not os.environ.get("COALORA_DATA_DIR"):
        sys.exit("set COALORA_DATA_DIR to the folder holding glue/SST-2 (e.g. /work/shared/data)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="bench_baselines_"))
    cache_dir = args.cache_dir or tmp / "cache"
    state = None
    if args.from_ckpt is not None:
        from coalora.deploy.merged import merged_model
        from coalora.stages.restore import restore

        run_cfg, lit = restore(args.from_ckpt, cache_dir=cache_dir)
        if run_cfg.quant.mode != "none":
            sys.exit(
                f"--from-ckpt needs a full-precision run (quant=none), got quant={run_cfg.quant.mode}"
            )
        fresh = build_backbone(run_cfg)
        state = merged_model(lit.model, lit.method.names, fresh, run_cfg.task).state_dict()
        del lit
        tables = None
    else:
        tables = build_tables(args.budgets, cache_dir, tmp / "run", args.full_table_layers)

    dm, fp_model, _, _ = build_untrained(
        ["method=lora", "quant=none"], cache_dir, tmp / "run", state
    )
    loader = dm.val_dataloader()
    fp_metrics, ref = dev_pass(fp_model, loader)
    del fp_model
    print(f"fp: {fp_metrics}", flush=True)
    rows = []
    for budget in args.budgets:
        for label in args.methods:
            ov = [*METHODS[label], "quant=budget", f"quant.budget={budget}"]
            _, model, method, setup_s = build_untrained(ov, cache_dir, tmp / "run", state)
            m, _ = dev_pass(model, loader, ref)
            d = method.describe()
            row = {"budget": budget, "method": label, "bits": d.get("avg_bits", float("nan")),
                   "setup": setup_s, **m}  # fmt: skip
            if "lq" in d:
                row["note"] = (f"‖W−Q−L1L2‖ {d['lq']['err_lq_total']:.2f} vs ‖W−quant(W)‖ "
                               f"{d['lq']['err_quant_total']:.2f}")  # fmt: skip
            if "qwha" in d:
                q = d["qwha"]
                row["note"] = (f"layer output error {q['err_zero_total']:.1f} → "
                               f"{q['err_init_total']:.1f} (Gram {q['gram_seconds']:.1f} s, "
                               f"init {q['init_seconds']:.1f} s)")  # fmt: skip
            rows.append(row)
            print(row, flush=True)
            del model, method
    if args.no_write:
        return
    if state is not None:
        write_trained_head_section(args, rows, fp_metrics, len(loader.dataset))
        return
    cmd = " ".join(sys.argv[1:])
    machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    lines = [
        SECTION,
        "",
        f"Measured {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} with",
        f"`COALORA_DATA_DIR=/work/shared/data OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
        f"python scripts/bench_baselines.py {cmd}".rstrip()
        + "`",
        "",
        f"Machine: `{machine}`, nproc {os.cpu_count()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread), Python {platform.python_version()}; the 2 cores are "
        "shared with other jobs, so times are noisy.",
        "",
        f"MiniLM-L6 + SST-2 dev ({len(loader.dataset)} sentences), methods at their defaults (rank 8, "
        "`quant=budget`), **untrained**. The head is random (the same for every method), so accuracy "
        "and loss are near chance; the fidelity columns compare with the full-precision model with "
        "that same head: `h rel` = ‖h − h_fp‖/‖h_fp‖ and `h cos` = mean cosine of final hidden states "
        "over dev tokens, `CLS cos` = mean cosine of the final [CLS] state (what pooler and head "
        "read). Setup = "
        "`method.setup` wall time with error tables already cached (QLoRA at step 0 is the quantized "
        "base: B = 0).",
        "",
        f"Full precision: acc {fp_metrics['acc']:.4f}, loss {fp_metrics['loss']:.4f}.",
        "",
        "| budget | method | avg bits | setup (s) | dev acc | dev loss | h rel ↓ | h cos ↑ | CLS cos ↑ | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *[
            f"| {r['budget']:g} | {r['method']} | {r['bits']:.3f} | {r['setup']:.1f} | {r['acc']:.4f} | "
            f"{r['loss']:.4f} | {r['h_rel']:.4f} | {r['h_cos']:.4f} | {r['cls_cos']:.4f} | {r.get('note', '')} |"
            for r in rows
        ],
        "",
        *[
            f"Closest to full precision at {b:g} bits (h rel): "
            + " < ".join(
                r["method"] for r in sorted(rows, key=lambda r: r["h_rel"]) if r["budget"] == b
            )
            + "."
            for b in args.budgets
        ],
        "",
        f"Error tables ({tables['layers']} layers × {tables['options']} options, built once, cached "
        f"under `paths.cache_dir`): plain quantization {tables['plain']:.0f} s; LQ-LoRA "
        f"decomposition-aware (rank 8, 2 iterations, dominance-pruned) {tables['lq_pruned']:.0f} s"
        + (
            f"; the same without pruning, extrapolated from {tables['full_layers']} layers: "
            f"{tables['lq_full_estimate']:.0f} s."
            if "lq_full_estimate" in tables
            else "."
        ),
        "",
    ]
    write_section(ROOT / "docs" / "benchmarks.md", SECTION[3:], "\n".join(lines))
    print(f"wrote {SECTION!r} in docs/benchmarks.md")


def write_trained_head_section(args, rows: list[dict], fp: dict, n_dev: int) -> None:
    from coalora.report.bench import header_lines

    command = (
        f"COALORA_DATA_DIR=/work/shared/data OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
        f"python scripts/bench_baselines.py {' '.join(sys.argv[1:])}"
    )
    lines = [
        *header_lines(SECTION_TRAINED[3:], command),
        f"Start: the full-precision LoRA run `{args.from_ckpt}` with its LoRA merged into W and its "
        f"trained head (full precision: dev acc **{fp['acc']:.4f}**, loss {fp['loss']:.4f}; "
        f"{n_dev} sentences). Each method quantizes the merged W' with its own initialisation; "
        "nothing is trained. `h rel` compares final hidden states with the full-precision model.",
        "",
        "| budget | method | avg bits | dev acc ↑ | dev loss ↓ | h rel ↓ | CLS cos ↑ | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
        *[
            f"| {r['budget']:g} | {r['method']} | {r['bits']:.3f} | {r['acc']:.4f} | {r['loss']:.4f} | "
            f"{r['h_rel']:.4f} | {r['cls_cos']:.4f} | {r.get('note', '')} |"
            for r in rows
        ],
        "",
    ]
    write_section(ROOT / "docs" / "benchmarks.md", SECTION_TRAINED[3:], "\n".join(lines))
    print(f"wrote {SECTION_TRAINED!r} in docs/benchmarks.md")


if __name__ == "__main__":
    main()
