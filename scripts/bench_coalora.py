"""Benchmark CoA-LoRA's per-step and adaptation costs on MiniLM-L6 + SST-2 (issue: CoA-LoRA).

In one process, on the same batch and the same quantized base:
* a QLoRA training step (forward + backward + AdamW) at one configuration,
* a CoA-LoRA training step per configuration (mapper call + forward + backward + AdamW; base
  switch through the cache included) — target ratio ≤ 1.15,
* adaptation to an unseen configuration: one batched mapper call + folding B' = B(I + γU)
  (target ≤ 5 ms), and the base switch to it from the cache (first use and cached).

    OMP_NUM_THREADS=2 python scripts/bench_coalora.py [--reps 9] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from coalora import adapt
from coalora.quant import ModelQuantConfig, set_model_config
from coalora.report.bench import header_lines, median_time, write_section
from coalora.stages.build import build_module, prepare

ROOT = Path(__file__).resolve().parents[1]

SECTION = "CoA-LoRA step and adaptation cost"


def build(method: str, extra: list[str]):
    data_dir = os.environ.get("COALORA_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"method={method}",
                f"paths.data_dir={data_dir}",
                "task.max_train_samples=512",
                *extra,
            ],
        )
    cfg.paths.output_dir = "/tmp/coalora-bench"
    dm, model, m, ctx = prepare(cfg)
    m.setup(model, ctx)
    lit = build_module(cfg, model, m, ctx)
    model.train()
    opt = torch.optim.AdamW([p for p in lit.parameters() if p.requires_grad], lr=1e-4)
    return cfg, lit, dm, opt


def random_config(base: ModelQuantConfig, space, rng: random.Random) -> ModelQuantConfig:
    opts = space.options()
    return ModelQuantConfig({n: rng.choice(opts) for n in base}, base.numels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    cfg, coa, dm, opt_c = build("coalora", [])
    batch = next(iter(dm.train_dataloader()))
    config = coa.method.eval_set["3"]
    _, qlora, _, opt_q = build("qlora", ["quant=budget", "quant.budget=3.0"])

    def qlora_step():
        loss = qlora.model(**batch).loss
        loss.backward()
        opt_q.step()
        opt_q.zero_grad(set_to_none=True)

    def coa_step_one_config():
        with coa.method.configured(coa.model, config):
            loss = coa.model(**batch).loss
        loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)

    def coa_training_step():  # k = configs_per_step configurations, as in training
        loss = coa.method.training_loss(coa.model, batch, 0)
        loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)

    t_q = median_time(qlora_step, args.reps)
    t_c1 = median_time(coa_step_one_config, args.reps)
    k = int(coa.method.cfg.configs_per_step)
    t_ck = median_time(coa_training_step, args.reps)

    rng = random.Random(0)
    unseen = [random_config(config, coa.method.space, rng) for _ in range(args.reps + 2)]
    layers = coa.method.qlayers
    it = iter(unseen)

    def first_switch():
        set_model_config(coa.model, next(it), layers)

    t_switch_first = median_time(first_switch, args.reps)
    new = unseen[0]
    t_switch_cached = median_time(lambda: set_model_config(coa.model, new, layers), args.reps)

    def mapper_fold():
        with torch.no_grad():
            mix = coa.method.mixing(new)
            for i, lora in enumerate(coa.method.loras):
                lora.folded_B = lora.lora_B @ mix[i]

    t_fold = median_time(mapper_fold, args.reps, warmup=2)
    t_adapt = median_time(lambda: adapt(coa, new), args.reps, warmup=2)

    rows = [
        ("QLoRA step (fwd+bwd+AdamW), 1 configuration", t_q * 1000),
        ("CoA-LoRA step per configuration (switch + mapper + fwd+bwd+AdamW)", t_c1 * 1000),
        (f"CoA-LoRA training step, k={k} configurations", t_ck * 1000),
        (
            "switch base to an unseen configuration (first use: quantize 36 layers)",
            t_switch_first * 1000,
        ),
        ("switch base to a cached configuration", t_switch_cached * 1000),
        ("adapt: mapper (all layers, one call) + fold B' = B(I+γU)", t_fold * 1000),
        ("coalora.adapt total (cached base switch + mapper + fold)", t_adapt * 1000),
    ]
    ratio = t_c1 / t_q
    lines = header_lines(SECTION)
    lines += [
        f"MiniLM-L6 (36 quantized linears), SST-2 batch of {batch['input_ids'].shape[0]} × "
        f"{batch['input_ids'].shape[1]} tokens, rank {cfg.method.rank}, fp32, "
        f"{torch.get_num_threads()} threads; medians of {args.reps} runs.",
        "",
        "| operation | median ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in rows]
    lines += [
        "",
        f"* CoA-LoRA / QLoRA time per configuration: **{ratio:.3f}** (target ≤ 1.15)",
        f"* adaptation to an unseen configuration (mapper + fold): **{t_fold * 1000:.2f} ms**"
        " (target ≤ 5 ms)",
        "",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
