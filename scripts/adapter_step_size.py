"""How far does one optimizer step move each baseline's ΔW? (QLoRA vs LQ-LoRA vs QWHA)

Adam's first update is lr · sign(gradient) per parameter, whatever the gradient's scale, so how
far a step moves the weight update ΔW depends on the adapter's parameterisation and init:

* LoRA (QLoRA): ΔW = s·B·A with B = 0, A small  -> the step moves ΔW by about s·lr·‖sign(g_B)·A‖.
* LQ-LoRA: s·B·A = L1·L2 carries the top singular directions of W − Q, so A and B are large and
  the same lr moves ΔW by s·‖ΔB·A + B·ΔA + ΔB·ΔA‖, many times more.
* QWHA: ΔW = F·H with H orthonormal, so a step moves ΔW by exactly lr·√(number of coefficients).

For each method at one budget (MiniLM-L6 + SST-2, ``COALORA_DATA_DIR``) this builds the model as
training does, takes one training batch, computes the gradients, applies the sign step with the
method's configured lr to a copy of the adapter, and reports per-layer means of ‖A‖_F, ‖B‖_F,
‖ΔW₀‖_F and ‖ΔW₁ − ΔW₀‖_F (and the total over layers).

    COALORA_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 python scripts/adapter_step_size.py --budget 2.5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from coalora.report.bench import emit_markdown

METHODS = ("qlora", "lq_lora", "qwha")


def step_sizes(
    method_name: str,
    budget: float,
    cache_dir: Path,
    out_dir: Path,
    lr: float | None,
    extra: list[str] = (),
):
    from coalora.adapters import LoRALinear, WHTAdapterLinear, adapter_modules
    from coalora.stages.build import build_untrained  # as the step-0 benchmark builds

    overrides = [f"method={method_name}", "quant=budget", f"quant.budget={budget}", *extra]
    dm, model, method, _ = build_untrained(overrides, cache_dir, out_dir)
    lr = float(lr if lr is not None else method.cfg.lr)
    dm.setup("fit")
    batch = dm.calibration_batches(1, seed=0)[0]
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    rows = []
    loras = adapter_modules(model, LoRALinear)
    whts = adapter_modules(model, WHTAdapterLinear)
    with torch.no_grad():
        for name in method.names:
            if name in loras:
                m = loras[name]
                a, b = m.lora_A, m.lora_B
                ga = a.grad if a.grad is not None else torch.zeros_like(a)
                gb = b.grad if b.grad is not None else torch.zeros_like(b)
                a1, b1 = a - lr * torch.sign(ga), b - lr * torch.sign(gb)
                d0 = m.scaling * b @ a
                d1 = m.scaling * b1 @ a1
                rows.append(
                    (float(a.norm()), float(b.norm()), float(d0.norm()), float((d1 - d0).norm()))
                )
            elif name in whts:
                m = whts[name]
                d0 = m.delta_weight()
                params = list(m.adapter_parameters().values())
                moved = (
                    sum(
                        float(
                            (lr * torch.sign(p.grad if p.grad is not None else torch.zeros_like(p)))
                            .pow(2)
                            .sum()
                        )
                        for p in params
                    )
                    ** 0.5
                )  # H orthonormal: ‖ΔF·H‖_F = ‖ΔF‖_F
                rows.append((float("nan"), float("nan"), float(d0.norm()), moved))
    t = torch.tensor(rows, dtype=torch.float64)
    return lr, t


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget", type=float, default=2.5)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--lr", type=float, default=None, help="one lr for every method (default: each method's)"
    )
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (e.g. model=tiny_bert)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lines = [
        f"One Adam-like sign step on one SST-2 batch, budget {args.budget} (means over target layers)",
        "",
        "| method | lr | ‖A‖_F | ‖B‖_F | ‖ΔW₀‖_F | ‖ΔW₁−ΔW₀‖_F | total ‖ΔW₁−ΔW₀‖ (all layers) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        for name in args.methods:
            lr, t = step_sizes(name, args.budget, cache, Path(tmp) / name, args.lr, args.overrides)
            mean = t.nanmean(0)
            total = float(t[:, 3].pow(2).sum().sqrt())
            a = "—" if torch.isnan(mean[0]) else f"{mean[0]:.3f}"
            b = "—" if torch.isnan(mean[1]) else f"{mean[1]:.3f}"
            lines.append(
                f"| {name} | {lr:g} | {a} | {b} | {mean[2]:.4f} | {mean[3]:.4f} | {total:.4f} |"
            )
            print(lines[-1], flush=True)
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
