"""Run a ``format=gguf`` export in llama.cpp beside coalora on the task's evaluation blocks.

    python scripts/llamacpp_check.py EXPORT --budget 4.5 [--blocks 8] [--threads 2] [--out r.md]
        [--packed PACKED_EXPORT]

For the configuration ``--budget`` of the export (docs/gguf.md, "Export to llama.cpp") it scores
the run's evaluation blocks (``coalora.data.lm``: ``task.eval_blocks`` blocks of
``task.block_length`` tokens, ``block_length − 1`` predicted tokens each) four ways: llama.cpp
(the ``xllamacpp`` wheel) on ``base.gguf`` with and without ``adapter.gguf``, and coalora's
restored run (its model at the same configuration, ``method.adapt``) with and without its adapter.
It prints perplexity and tokens/s of each (same threads; llama.cpp's time is its forward pass, the
output projection runs in torch: ``coalora.deploy.llamacpp``). ``--out`` writes JSON (``.json``)
or a markdown table (``.md``). ``--packed`` also scores a ``format=packed`` export of the same run
loaded with ``coalora.deploy.load`` at that configuration (the PyTorch deployment path: GGUF
blocks decoded per forward), so the three runtimes are timed on the same tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from coalora.data.lm import evenly_spaced
from coalora.deploy.gguf import read_gguf_manifest
from coalora.deploy.llamacpp import LlamaCpp, output_matrix, score_blocks
from coalora.quant.config import ModelQuantConfig
from coalora.stages.restore import load_run


def pick_label(manifest: dict, budget: str) -> str:
    confs = manifest["configurations"]
    for label in confs:
        if label == budget or math.isclose(float(label), float(budget), abs_tol=1e-9):
            return label
    raise SystemExit(f"--budget {budget}: the export has configurations {sorted(confs)}")


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Every LoRA's ``scaling`` set to 0 (the base alone), restored afterwards."""
    saved = {m: m.scaling for m in model.modules() if hasattr(m, "lora_A")}
    try:
        for m in saved:
            m.scaling = 0.0
        yield
    finally:
        for m, s in saved.items():
            m.scaling = s


@torch.no_grad()
def torch_scores(model: torch.nn.Module, blocks: torch.Tensor) -> dict[str, float]:
    total, count, seconds = 0.0, 0, 0.0
    for row in blocks:
        t0 = time.perf_counter()
        logits = model(input_ids=row[None]).logits[0, :-1].double()  # (T-1, vocab)
        seconds += time.perf_counter() - t0
        total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return {
        "nll": total / count,
        "perplexity": math.exp(total / count),
        "tokens": int(blocks.numel()),
        "tokens_per_s": blocks.numel() / seconds,
    }


def markdown(result: dict) -> str:
    rows = "\n".join(
        f"| {name} | {r['perplexity']:.4f} | {r['nll']:.5f} | {r['tokens_per_s']:.1f} |"
        for name, r in result["scores"].items()
    )
    return (
        f"# llama.cpp vs coalora: {result['model']} {result['method']}, configuration "
        f"{result['label']} ({result['target_average_bits']:.4f} target bits, file "
        f"{result['file_bits_per_weight']:.3f} bits/weight)\n\n"
        f"{result['blocks']} evaluation blocks of {result['block_length']} tokens, "
        f"{result['threads']} thread(s), {result['date']}\n\n"
        "| runtime | perplexity | NLL | tokens/s |\n|---|---|---|---|\n"
        f"{rows}\n\nllama.cpp / coalora perplexity: with adapter "
        f"{result['ratio_adapter']:.4f}, base {result['ratio_base']:.4f}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--budget", required=True, help="the configuration's label, e.g. 4.5")
    ap.add_argument("--ckpt", help="the training run (default: the run the manifest names)")
    ap.add_argument("--blocks", type=int, help="score this many of the evaluation blocks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the result as .json or .md")
    ap.add_argument("--packed", type=Path, help="a format=packed export of the same run")
    args = ap.parse_args(argv)

    manifest = read_gguf_manifest(args.export)
    label = pick_label(manifest, args.budget)
    record = manifest["configurations"][label]
    ckpt = args.ckpt or manifest.get("run_dir")
    if not ckpt:
        raise SystemExit("the manifest names no training run: pass --ckpt <run dir>")
    torch.set_num_threads(args.threads)
    run = load_run(ckpt, with_data=True)
    blocks = run.datamodule.val_set.blocks
    if args.blocks is not None and args.blocks < blocks.shape[0]:
        blocks = blocks[evenly_spaced(blocks.shape[0], args.blocks)]
    config = ModelQuantConfig.from_json(args.export / record["config"])
    model = run.lit.model.eval()
    run.lit.method.adapt(model, config)

    base, adapter = args.export / record["base"], args.export / record["adapter"]
    W_out = output_matrix(base)
    scores = {}
    n_ctx = int(blocks.shape[1])
    for name, path in (("llama.cpp + adapter", adapter), ("llama.cpp base", None)):
        rt = LlamaCpp(base, path, n_ctx=n_ctx, threads=args.threads)
        scores[name] = score_blocks(rt, W_out, blocks)
        rt.close()
    scores["coalora + adapter"] = torch_scores(model, blocks)
    with adapters_off(model):
        scores["coalora base"] = torch_scores(model, blocks)
    if args.packed is not None:
        from coalora import deploy

        packed = deploy.load(args.packed, budget=label).eval()
        scores["coalora.deploy.load + adapter"] = torch_scores(packed, blocks)

    result = {
        "export": str(args.export),
        "label": label,
        "model": manifest["model"],
        "method": manifest["method"],
        "target_average_bits": record["target_average_bits"],
        "file_bits_per_weight": record["file_bits_per_weight"],
        "blocks": int(blocks.shape[0]),
        "block_length": n_ctx,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "scores": scores,
        "ratio_adapter": scores["llama.cpp + adapter"]["perplexity"]
        / scores["coalora + adapter"]["perplexity"],
        "ratio_base": scores["llama.cpp base"]["perplexity"] / scores["coalora base"]["perplexity"],
    }
    text = markdown(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(result, indent=2) + "\n" if args.out.suffix == ".json" else text
        args.out.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
