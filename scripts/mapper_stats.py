"""How much does a trained CoA-LoRA mapper change the adapter? (diagnostic)

    python scripts/mapper_stats.py <coalora run dir> [--budgets 2.5 3.0 3.5 4.0] [--out FILE]

For each budget's configuration c of the run (recorded in its allocations.json, else recomputed
with the run's own space, solver and sensitivity), over the target layers: ‖γU(c)‖_F / ‖I‖_F (the mapper's share of
the mixing matrix I + γU), ‖B(I + γU(c)) − B‖_F / ‖B‖_F (how far the folded adapter moves from
the shared LoRA), and between every pair of budgets ‖B'(c1) − B'(c2)‖_F / ‖B‖_F (how differently
two configurations are served). Values near 0 mean the run behaves like Shared-LoRA.
"""

from __future__ import annotations

import argparse
from itertools import combinations

import torch

from coalora.report.bench import emit_markdown


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from coalora.methods.coa_lora import CoALoRA
    from coalora.stages.restore import restore

    cfg, lit = restore(args.run, cache_dir=args.cache_dir)
    method = lit.method
    if not isinstance(method, CoALoRA):
        raise SystemExit(f"error: {args.run} is a method={method.name} run, not coalora")
    allocs = {b: a.config for b, a in lit.ctx.allocations(lit.model, args.budgets).items()}
    bs = [lora.lora_B.detach() for lora in method.loras]
    rank = bs[0].shape[1]
    eye = torch.eye(rank)
    folded: dict[float, list[torch.Tensor]] = {}
    lines = [
        f"CoA-LoRA run {args.run} ({len(bs)} layers, r={rank}); means over layers",
        "",
        "| budget | ‖γU‖/‖I‖ mean | max | ‖B′−B‖/‖B‖ mean | max |",
        "|---:|---:|---:|---:|---:|",
    ]
    with torch.no_grad():
        for b, config in allocs.items():
            mix = method.mixing(config)  # (L, r, r) = I + γU
            u = torch.linalg.matrix_norm(mix - eye) / torch.linalg.matrix_norm(eye)
            folded[b] = [B @ m for B, m in zip(bs, mix, strict=True)]
            moved = torch.stack(
                [
                    torch.linalg.matrix_norm(f - B) / torch.linalg.matrix_norm(B)
                    for f, B in zip(folded[b], bs, strict=True)
                ]
            )
            lines.append(
                f"| {b:g} | {u.mean():.4f} | {u.max():.4f} | {moved.mean():.4f} | {moved.max():.4f} |"
            )
        lines += ["", "| budgets | ‖B′(c1)−B′(c2)‖/‖B‖ mean | max |", "|---|---:|---:|"]
        for b1, b2 in combinations(folded, 2):
            d = torch.stack(
                [
                    torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(B)
                    for x, y, B in zip(folded[b1], folded[b2], bs, strict=True)
                ]
            )
            lines.append(f"| {b1:g} vs {b2:g} | {d.mean():.4f} | {d.max():.4f} |")
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
