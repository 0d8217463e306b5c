"""Benchmark SmolLM2-135M on this machine: conversion/load time, fp32 WikiText-2 perplexity, and
forward+backward time per training step (docs/decoder_lms.md).

    python scripts/bench_decoder.py --blocks 32 --block-length 256 --batch 4 --out docs/results/x.md

The conversion runs only when ``model.local_dir`` is not converted yet (its time is then
reported); point ``COALORA_CACHE_DIR`` at an empty folder to measure a first conversion.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from omegaconf import OmegaConf

from coalora.data.lm import LMDataModule
from coalora.data.metrics import block_nll, bootstrap_perplexity, perplexity
from coalora.models import build_causal_lm, build_tokenizer
from coalora.models.gguf import is_converted, model_config
from coalora.report.bench import emit_markdown, header_lines, median_time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (median)")
    ap.add_argument(
        "--extra-shapes",
        default="",
        help="more BxT training shapes to time with a frozen base, e.g. 4x128,2x256",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cfg = model_config(args.model)
    lines = header_lines(f"SmolLM2 decoder benchmark ({args.model})")
    if cfg.source == "gguf_wheel" and not is_converted(cfg.local_dir):
        t = time.perf_counter()
        build_causal_lm(cfg)
        lines.append(f"* first load incl. conversion: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    model = build_causal_lm(cfg)
    load = time.perf_counter() - t
    tok = build_tokenizer(cfg)
    lines.append(f"* load after conversion (safetensors, fp32): {load:.2f} s")

    task = OmegaConf.load("conf/task/wikitext2.yaml")
    task.block_length = args.block_length
    task.eval_blocks = args.blocks
    task.eval_split = args.eval_split
    task.train_split = "valid" if args.eval_split == "test" else "test"
    dm = LMDataModule(task, tok, os.environ.get("COALORA_DATA_DIR"), batch_size=args.batch, seed=0)
    t = time.perf_counter()
    dm.setup("fit")
    lines.append(f"* tokenize + pack both splits: {time.perf_counter() - t:.2f} s; {dm.budget()}")

    model.eval()
    nll, ntok = [], []
    t = time.perf_counter()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            s, n = block_nll(out.logits, batch["labels"])
            nll.append(s)
            ntok.append(n)
    nll, ntok = torch.cat(nll), torch.cat(ntok)
    ev = time.perf_counter() - t
    lo, hi = bootstrap_perplexity(nll, ntok, seed=0)
    lines.append(
        f"* fp32 perplexity, WikiText-2 {args.eval_split}, {len(ntok)} blocks x "
        f"{args.block_length} tokens ({int(ntok.sum())} scored): **{perplexity(nll, ntok):.3f}** "
        f"(95% block bootstrap {lo:.3f} - {hi:.3f}); eval time {ev:.1f} s"
    )

    model.train()
    batch = dm.calibration_batches(1, seed=0, batch_size=args.batch)[0]

    def full_step() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def frozen_step() -> None:
        # a leaf input that needs a gradient: every activation gradient is computed (what a
        # LoRA step pays on the frozen base), no weight gradient is
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(
            inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        out.loss.backward()

    for p in model.parameters():
        p.requires_grad_(True)
    full = median_time(full_step, reps=args.steps, warmup=1)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = median_time(frozen_step, reps=args.steps, warmup=1)
    lines.append(
        f"* forward+backward per step, batch {args.batch} x {args.block_length} tokens, "
        f"{torch.get_num_threads()} thread(s): all weights trainable {full:.2f} s; "
        f"frozen base (activation gradients only) {frozen:.2f} s"
    )
    for shape in filter(None, args.extra_shapes.split(",")):
        b, t = (int(x) for x in shape.lower().split("x"))
        ids = dm.train_set.blocks[:b, :t].contiguous()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        sec = median_time(frozen_step, reps=args.steps, warmup=1)
        lines.append(
            f"* forward+backward per step, frozen base, batch {b} x {t}: {sec:.2f} s "
            f"({b * t / sec:.0f} tokens/s)"
        )
    load1, load5, _ = os.getloadavg()
    lines.append(
        f"* machine load average during the run: {load1:.1f} (1 min), {load5:.1f} (5 min) on "
        f"{os.cpu_count()} cores; other jobs shared the cores, so times are upper bounds"
    )
    emit_markdown(lines, args.out)


if __name__ == "__main__":
    main()
