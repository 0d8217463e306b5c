"""Benchmark packed vs dequantized quantized storage on one model of conf/model (docs/packed.md).

``--model`` (default ``minilm_l6``): an encoder is built with a 2-label classification head, a
decoder (``model.kind: decoder``, e.g. ``smollm2_135m``) with ``build_causal_lm``; the targets are
the ``model.target_modules`` linears. One run measures, on the allocations at 2.5/3.0/3.5/4.0
average bits (MILP over the 432-option grid through ``coalora.quant.build.allocations``: error
table and allocations cached under --cache-dir, shared with training):

* bytes: the resident weight bytes of a model frozen on one configuration (original dropped) vs
  the storage formula (average bits × target parameters / 8 + every non-target weight);
* switch: the time to switch every target layer between cached configurations (and first use);
* deploy: the packed export on disk and ``deploy.load``-ed vs the formula, one export shared by
  the four configurations, and no-grad latency of ``deploy.load`` vs the training-time model vs
  bitsandbytes NF4 on the same ``--batch`` × ``--seq`` input (token ids drawn in the vocabulary);
* layers: one linear's forward+backward at several shapes (MiniLM: fixed shapes up to
  2048 × 2048; other models: their distinct target shapes);
* speed (MiniLM only): forward+backward+AdamW step time of LoRA (r=8) on the packed, dequantized
  and full-precision base, interleaved round-robin in one process (the machine is shared);
* rss (MiniLM only): peak RSS of a fixed number of training steps, each variant in its own
  process (``VmHWM`` through setup, then reset through ``/proc/self/clear_refs`` for the steps
  alone; ``ru_maxrss`` is not used: Linux carries the parent's peak over ``fork`` + ``exec``).
  Decoders: scripts/bench_decoder_step.py measures their training step time and peak RSS.

Writes docs/results/packed_<model>.{json,md} (packed_minilm, packed_smollm2 for the two).

    OMP_NUM_THREADS=1 python scripts/bench_packed.py [--model smollm2_135m] [--reps 7] \\
        [--parts bytes,switch,deploy] [--space bits0=[8] dtype1=[fp32] block1=[256]]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from coalora.errors import ConfigError
from coalora.io import atomic_write_json
from coalora.models import build_causal_lm, build_model, model_kind, target_names
from coalora.models.gguf import model_config
from coalora.quant import (
    NF3,
    NF4,
    DequantCache,
    ModelQuantConfig,
    QuantSpace,
    formula_weight_bytes,
    freeze_model,
    model_weights,
    pack_quantized,
    packed_linear,
    quantize_model,
    quantize_nf,
    resident_weight_bytes,
    set_model_config,
)
from coalora.quant.build import allocations as shared_allocations
from coalora.report.bench import (
    emit_markdown,
    header_lines,
    interleaved,
    measure_peak_rss,
    median_ms,
    paired_ratio,
    read_part_results,
    repo_command,
    run_json_child,
    safetensors_data_bytes,
    stamp_parts,
    status_kb,
    table_section,
)

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (2.5, 3.0, 3.5, 4.0)
PARTS = ("bytes", "speed", "switch", "layers", "rss", "deploy")
MINILM_ONLY = ("speed", "rss")  # LoRA training through the classification head
RSS_VARIANTS = ("fp", "dequantized", "packed", "dequantized_multi", "packed_multi")
OUT = ROOT / "docs" / "results"
# conf/model name -> (results file stem, title); other models use their name for both
NAMES = {"minilm_l6": ("minilm", "MiniLM-L6"), "smollm2_135m": ("smollm2", "SmolLM2-135M")}
MINILM_SHAPES = [(384, 384), (1536, 384), (384, 1536), (2048, 2048)]


def model_cfg(name: str, cache_dir: Path):
    """``conf/model/<name>.yaml`` (an unknown name lists the allowed ones) with
    ``paths.cache_dir`` = ``cache_dir`` (decoders convert and keep their weights there)."""
    raw = OmegaConf.to_container(model_config(name), resolve=False)
    return OmegaConf.create({"paths": {"cache_dir": str(cache_dir)}, "model": raw}).model


def is_decoder(cfg) -> bool:
    return model_kind(cfg) == "decoder"


def load_model(cfg):
    """(model, target names): a decoder LM, or an encoder with a 2-label head, seed 0."""
    if is_decoder(cfg):
        model = build_causal_lm(cfg, seed=0)
    else:
        model = build_model(cfg, num_labels=2, seed=0)
    return model, target_names(model, list(cfg.target_modules))


def parse_space(items: list[str]) -> QuantSpace:
    """``--space bits0=[8] dtype1=[fp32]``: the option lists to change (the others default)."""
    try:
        return QuantSpace.from_cfg(OmegaConf.from_dotlist(list(items)), prefix="--space")
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def allocations(cfg, cache_dir: Path, space: QuantSpace) -> dict[float, ModelQuantConfig]:
    """The four budgets' MILP allocations (``space``, default the 432-option grid) through the
    shared on-disk cache. For MiniLM these are the configurations of the former ``allocate``
    path (same table, space and solver; checked configuration by configuration)."""
    model, names = load_model(cfg)
    weights = model_weights(model, names)
    return shared_allocations(weights, list(BUDGETS), space, cache_dir, str(cfg.name), "exact")


def lora_model(cfg, storage: str | None, config: ModelQuantConfig | None, rank: int = 8):
    """The (encoder) model with LoRA on every target; base quantized with ``storage``."""
    from coalora.adapters.inject import inject
    from coalora.adapters.lora import LoRALinear

    model, names = load_model(cfg)
    if storage is not None:
        quantize_model(model, names, config, DequantCache(storage=storage))
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    inject(model, names, lambda n, m: LoRALinear(m, rank, 2 * rank))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.01)  # nonzero B: the backward goes through every base
    model.train()
    return model, names, torch.optim.AdamW(params, lr=1e-4)


def batch(seq: int, size: int = 32, seed: int = 0, vocab: int | None = None) -> dict:
    """Random token ids; ``vocab`` (decoders): ids in [0, vocab) and no labels."""
    g = torch.Generator().manual_seed(seed)
    if vocab is not None:
        ids = torch.randint(0, vocab, (size, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {
        "input_ids": torch.randint(1000, 29000, (size, seq), generator=g),
        "attention_mask": torch.ones(size, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (size,), generator=g),
    }


def train_step(model, opt, b) -> None:
    loss = model(**b).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def part_bytes(cfg, configs) -> list[dict]:
    rows = []
    for b, config in configs.items():
        model, names = load_model(cfg)
        quantize_model(model, names, config, DequantCache(storage="packed"))
        freeze_model(model, [config], keep_original="drop")
        got = resident_weight_bytes(model)
        want = formula_weight_bytes(model, config)
        targets = sum(config.numels.values())
        row = {"budget": b, "average_bits": round(config.average_bits(), 4)}
        row |= {"target_params": targets, "resident_bytes": got["total"]}
        row |= {"packed_target_bytes": got["quantized"], "non_target_bytes": got["other"]}
        row |= {"formula_bytes": round(want), "rel_diff": round(got["total"] / want - 1, 6)}
        row |= {"fp_bytes": got["other"] + 4 * targets}
        rows.append(row)
        dense, _ = load_model(cfg)
        quantize_model(dense, names, config, DequantCache(storage="dequantized"))
        rows[-1]["dequantized_resident_bytes"] = resident_weight_bytes(dense)["total"]
        del model, dense
        gc.collect()
    return rows


def part_speed(cfg, configs, reps: int, seqs: list[int], budgets: list[float]) -> list[dict]:
    variants = {
        "packed": lora_model(cfg, "packed", configs[BUDGETS[0]]),
        "dequantized": lora_model(cfg, "dequantized", configs[BUDGETS[0]]),
        "fp": lora_model(cfg, None, None),
    }
    rows = []
    for seq in seqs:
        b = batch(seq)
        for budget in budgets:
            config = configs[budget]
            for name in ("packed", "dequantized"):
                set_model_config(variants[name][0], config)
            steps = {
                v: (lambda m=m, o=o, b=b: train_step(m, o, b)) for v, (m, _, o) in variants.items()
            }
            times, cpu = interleaved(steps, reps)  # cpu: process CPU time
            row = {"seq": seq, "batch": 32, "budget": budget, "reps": reps}
            row.update({f"{v}_ms": median_ms(t) for v, t in times.items()})
            row["packed_over_dequantized"] = round(row["packed_ms"] / row["dequantized_ms"], 4)
            paired = paired_ratio(times["packed"], times["dequantized"])  # same round
            row["paired_ratio_median"] = paired["paired_median"]
            row["paired_ratio_q25_q75"] = [paired["paired_q25"], paired["paired_q75"]]
            row.update({f"{v}_cpu_ms": median_ms(t) for v, t in cpu.items()})
            row["cpu_ratio"] = round(row["packed_cpu_ms"] / row["dequantized_cpu_ms"], 4)
            rows.append(row)
            print(row, flush=True)
    return rows


def part_switch(cfg, configs, reps: int) -> list[dict]:
    rows = []
    for storage in ("packed", "dequantized"):
        model, names = load_model(cfg)
        cache = DequantCache(storage=storage)
        layers = quantize_model(model, names, None, cache)
        first = {}
        for b, config in configs.items():
            t = time.perf_counter()
            set_model_config(model, config, layers)
            first[b] = time.perf_counter() - t
        times = []
        for _ in range(reps):
            for config in configs.values():
                t = time.perf_counter()
                set_model_config(model, config, layers)
                times.append(time.perf_counter() - t)
        rows.append(
            {
                "storage": storage,
                "layers": len(layers),
                "switch_ms": median_ms(times),
                "first_use_ms": {str(b): round(s * 1e3, 1) for b, s in first.items()},
                "cache_mb": round(cache.nbytes / 2**20, 2),
                "entries": len(cache),
            }
        )
        print(rows[-1], flush=True)
        del model, layers, cache
        gc.collect()
    return rows


def part_layers(shapes, reps: int, tokens: int = 2048) -> list[dict]:
    """One linear, forward + backward wrt the input: dense weight vs packed (dequantize twice)."""
    rows = []
    for d_out, d_in in shapes:
        torch.manual_seed(0)
        W = torch.randn(d_out, d_in) * 0.02
        x = torch.randn(tokens, d_in, requires_grad=True)
        gy = torch.randn(tokens, d_out)
        for qc in (NF4, NF3):
            p = pack_quantized(quantize_nf(W, qc))
            dense = W.clone()

            def run_dense(x=x, w=dense, gy=gy):
                torch.autograd.grad(F.linear(x, w), x, gy)

            def run_packed(x=x, p=p, gy=gy):
                torch.autograd.grad(packed_linear(x, p), x, gy)

            times, _ = interleaved({"dense": run_dense, "packed": run_packed}, reps)
            row = {"shape": [d_out, d_in], "tokens": tokens, "config": qc.key}
            row.update({f"{k}_ms": median_ms(v) for k, v in times.items()})
            row["ratio"] = round(row["packed_ms"] / row["dense_ms"], 4)
            rows.append(row)
            print(row, flush=True)
    return rows


def part_deploy(cfg, configs, reps: int, size: int, seq: int) -> dict:
    """Exports on disk vs the formula, one shared multi-configuration export, and inference
    latency of ``deploy.load`` vs the training-time model vs bitsandbytes NF4, interleaved."""
    import shutil
    import tempfile

    from coalora import deploy

    model, names = load_model(cfg)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    sizes = []
    for b, config in configs.items():
        out = deploy.save_packed(model, names, {str(b): config}, None, tmp / f"b{b}")
        packed = safetensors_data_bytes(out / "packed.safetensors")
        base = safetensors_data_bytes(out / "base.safetensors")
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        formula = config.total_bits() / 8 + base
        loaded = deploy.load(out)
        resident = resident_weight_bytes(loaded)["total"]
        row = {"budget": b, "packed_data_bytes": packed}
        row |= {"target_formula_bytes": round(config.total_bits() / 8), "non_target_bytes": base}
        row |= {"export_dir_bytes": disk, "formula_bytes": round(formula)}
        row |= {"disk_rel_diff": round((packed + base) / formula - 1, 6)}
        row |= {"loaded_resident_bytes": resident}
        row |= {"resident_rel_diff": round(resident / formula - 1, 6)}
        sizes.append(row)
        print(sizes[-1], flush=True)
        del loaded
    multi = deploy.save_packed(
        model, names, {str(b): c for b, c in configs.items()}, None, tmp / "multi"
    )
    manifest = deploy.read_manifest(multi)
    multi_row = {
        "configurations": len(configs),
        "entries": len(manifest["entries"]),
        "layer_option_pairs": len(configs) * len(names),
        "packed_data_bytes": safetensors_data_bytes(multi / "packed.safetensors"),
        "sum_of_single_exports_bytes": sum(r["packed_data_bytes"] for r in sizes),
    }
    print(multi_row, flush=True)

    # inference latency, no grad, size x seq: served (packed) vs the training-time model
    # (dequantized storage) at 3.0 bits; bitsandbytes vs packed at uniform NF4 (4-bit, block 64)
    nf4 = ModelQuantConfig.uniform(configs[3.0].numels, NF4)
    deploy.save_packed(model, names, {"nf4": nf4}, None, tmp / "nf4")
    served = deploy.load(multi, budget=3.0)
    train_time, _ = load_model(cfg)
    quantize_model(train_time, names, configs[3.0], DequantCache(storage="dequantized"))
    train_time.eval()
    variants = {
        "deploy_packed_3.0": served,
        "training_dequantized_3.0": train_time,
        "deploy_packed_nf4": deploy.load(tmp / "nf4"),
    }
    bnb_missing = None
    try:
        variants["bnb_nf4"] = deploy.load(tmp / "nf4", backend="bnb")
    except Exception as e:  # noqa: BLE001 - bitsandbytes absent or without a CPU kernel
        bnb_missing = f"{type(e).__name__}: {e}"
    del model
    gc.collect()
    b = batch(seq, size, vocab=served.config.vocab_size if is_decoder(cfg) else None)
    b.pop("labels", None)
    with torch.no_grad():
        diff = (served(**b).logits - train_time(**b).logits).abs().max().item()
        times, _ = interleaved({k: (lambda m=m: m(**b)) for k, m in variants.items()}, reps)
    latency = {k: median_ms(v) for k, v in times.items()}
    print(latency, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "sizes": sizes,
        "multi": multi_row,
        "latency_ms": latency,
        "latency_batch": [size, seq],
        "latency_reps": reps,
        "max_abs_logit_diff_deploy_vs_training": diff,
        **({"bnb_unavailable": bnb_missing} if bnb_missing else {}),
    }


def rss_child(variant: str, steps: int, seq: int, cache_dir: Path, space: QuantSpace) -> None:
    """One variant's training steps; prints a JSON line with its memory numbers (KiB)."""
    cfg = model_cfg("minilm_l6", cache_dir)
    configs = allocations(cfg, cache_dir, space)
    rss_start = status_kb("VmRSS")
    storage = None if variant == "fp" else variant.split("_")[0]
    multi = variant.endswith("_multi")
    model, names, opt = lora_model(cfg, storage, None if storage is None else configs[3.0])
    if storage == "packed" and not multi:
        freeze_model(model, [configs[3.0]], keep_original="drop")
    gc.collect()
    b = batch(seq)
    cycle = list(configs.values()) if multi else [None]
    if multi:  # first use of every configuration before the measured steps
        for config in cycle:
            set_model_config(model, config)

    def run_steps() -> None:
        for i in range(steps):
            if multi:
                set_model_config(model, cycle[i % len(cycle)])
            train_step(model, opt, b)

    memory = measure_peak_rss(run_steps)  # VmHWM of the steps alone, and of the process
    weights = resident_weight_bytes(model)
    caches = {id(m.cache): m.cache for m in model.modules() if hasattr(m, "cache")}
    weights["cache"] = sum(c.nbytes for c in caches.values())  # every cached option
    row = {"variant": variant, "steps": steps, "seq": seq, "rss_start_kb": rss_start, **memory}
    print(json.dumps({**row, "weight_bytes": weights}), flush=True)


def part_rss(steps: int, seq: int, cache_dir: Path, space: list[str]) -> list[dict]:
    rows = []
    for variant in RSS_VARIANTS:
        cmd = [__file__, "--rss-child", variant, "--steps", str(steps), "--rss-seq", str(seq)]
        row = run_json_child([*cmd, "--cache-dir", str(cache_dir), "--space", *space])
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(results: dict, command: str, title: str) -> list[str]:
    lines = header_lines(f"Packed vs dequantized storage ({title})", command)
    lines[0] = "# " + lines[0][3:]
    lines += ["Each section names the run that produced it (parts can be re-run alone).", ""]
    if "bytes" in results:
        lines += table_section(
            results,
            "bytes",
            "Resident weight bytes vs the storage formula (original dropped)",
            "budget | avg bits | packed targets | non-target | resident | formula | diff "
            "| dequantized (orig + copy) | fp",
        )
        for r in results["bytes"]:
            mb = lambda v: f"{v / 2**20:.2f} MiB"  # noqa: E731
            lines.append(
                f"| {r['budget']} | {r['average_bits']} | {mb(r['packed_target_bytes'])} | "
                f"{mb(r['non_target_bytes'])} | {mb(r['resident_bytes'])} | "
                f"{mb(r['formula_bytes'])} | {100 * r['rel_diff']:+.3f}% | "
                f"{mb(r['dequantized_resident_bytes'])} | {mb(r['fp_bytes'])} |"
            )
        lines.append("")
    if "speed" in results:
        lines += table_section(
            results,
            "speed",
            "Training step (LoRA r=8, fwd+bwd+AdamW, batch 32), medians, interleaved",
            "seq | budget | reps | packed ms | dequantized ms | fp ms | ratio of medians | paired "
            "ratio median [q25, q75] | CPU-time ms packed / dequantized / fp | CPU-time ratio",
        )
        for r in results["speed"]:
            q = r.get("paired_ratio_q25_q75", [float("nan")] * 2)
            lines.append(
                f"| {r['seq']} | {r['budget']} | {r['reps']} | {r['packed_ms']} | "
                f"{r['dequantized_ms']} | {r['fp_ms']} | {r['packed_over_dequantized']:.3f} | "
                f"{r.get('paired_ratio_median', float('nan')):.3f} [{q[0]:.3f}, {q[1]:.3f}] | "
                f"{r.get('packed_cpu_ms')} / {r.get('dequantized_cpu_ms')} / {r.get('fp_cpu_ms')} "
                f"| {r.get('cpu_ratio', float('nan')):.3f} |"
            )
        lines.append("")
    if "switch" in results:
        n = results["switch"][0].get("layers", "all")
        lines += table_section(
            results,
            "switch",
            f"Configuration switch ({n} target layers, all four configurations cached)",
            "storage | switch ms (median) | first use ms per budget | cache MiB | entries",
        )
        for r in results["switch"]:
            first = ", ".join(f"{b}: {v}" for b, v in r["first_use_ms"].items())
            lines.append(
                f"| {r['storage']} | {r['switch_ms']} | {first} | {r['cache_mb']} | "
                f"{r['entries']} |"
            )
        lines.append("")
    if "layers" in results:
        lines += table_section(
            results,
            "layers",
            "One linear, fwd + bwd wrt input, 2048 tokens (dense weight vs packed)",
            "shape (out, in) | config | dense ms | packed ms | ratio",
        )
        for r in results["layers"]:
            lines.append(
                f"| {tuple(r['shape'])} | {r['config']} | {r['dense_ms']} | {r['packed_ms']} | "
                f"{r['ratio']:.3f} |"
            )
        lines.append("")
    if "deploy" in results:
        d = results["deploy"]
        mb = lambda v: f"{v / 2**20:.3f} MiB"  # noqa: E731
        lines += table_section(
            results,
            "deploy",
            "Packed export (`coalora.deploy`): on disk and loaded, vs the storage formula",
            "budget | packed base (data) | formula targets | non-target | export dir "
            "| disk vs formula | loaded resident | resident vs formula",
        )
        for r in d["sizes"]:
            lines.append(
                f"| {r['budget']} | {mb(r['packed_data_bytes'])} | "
                f"{mb(r['target_formula_bytes'])} | {mb(r['non_target_bytes'])} | "
                f"{mb(r['export_dir_bytes'])} | {100 * r['disk_rel_diff']:+.3f}% | "
                f"{mb(r['loaded_resident_bytes'])} | {100 * r['resident_rel_diff']:+.3f}% |"
            )
        m, bnb = d["multi"], d.get("bnb_unavailable")
        lines += [
            "",
            f"One export of all {m['configurations']} configurations: {m['entries']} packed "
            f"entries for {m['layer_option_pairs']} (layer, configuration) pairs, "
            f"{mb(m['packed_data_bytes'])} vs {mb(m['sum_of_single_exports_bytes'])} for four "
            "single exports.",
            "",
            f"Inference latency, batch {d['latency_batch'][0]} × {d['latency_batch'][1]}, no "
            f"grad, medians of {d['latency_reps']} interleaved: "
            + ", ".join(f"{k} {v} ms" for k, v in d["latency_ms"].items())
            + f". Max |logit difference| deploy vs training-time model (3.0 bits): "
            f"{d['max_abs_logit_diff_deploy_vs_training']:.2e}."
            + (f" bitsandbytes not measured: {bnb}." if bnb else ""),
            "",
        ]
    if "rss" in results:
        lines += table_section(
            results,
            "rss",
            "Peak RSS of training steps (one process per variant, 3.0-bit allocation)",
            "variant | RSS after setup | peak during steps (VmHWM) | process peak (VmHWM) "
            "| weights: current + originals + other | + cached options",
        )
        for r in results["rss"]:
            w = r["weight_bytes"]
            held = (w["quantized"] + w["original"] + w["other"]) / 2**20
            steps_peak = r["peak_steps_kb"]
            lines.append(
                f"| {r['variant']} | {r['rss_after_setup_kb'] / 1024:.0f} MiB | "
                f"{'n/a' if steps_peak is None else f'{steps_peak / 1024:.0f} MiB'} | "
                f"{r['peak_process_kb'] / 1024:.0f} MiB | {held:.1f} MiB | "
                f"{w.get('cache', 0) / 2**20:.1f} MiB |"
            )
        lines.append("")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm_l6", help="a conf/model name")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {list(PARTS)}")
    ap.add_argument("--batch", type=int, help="deploy latency batch (32 encoder, 2 decoder)")
    ap.add_argument("--seq", type=int, help="deploy latency sequence (64 encoder, 256 decoder)")
    ap.add_argument("--seqs", default="64,24", help="sequence lengths for the step time")
    ap.add_argument("--speed-budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--steps", type=int, default=6, help="training steps per RSS process")
    ap.add_argument("--rss-seq", type=int, default=64)
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("COALORA_CACHE_DIR", ROOT / ".cache" / "coalora")),
    )
    ap.add_argument(
        "--space",
        nargs="*",
        default=[],
        metavar="FIELD=[V,...]",
        help="QuantSpace option lists to change, e.g. bits0=[8] dtype1=[fp32] block1=[256] "
        "(default: the 432-option grid)",
    )
    ap.add_argument("--rss-child", choices=RSS_VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="output stem (default docs/results/packed_<model>)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    space = parse_space(args.space)
    if args.rss_child:
        rss_child(args.rss_child, args.steps, args.rss_seq, args.cache_dir, space)
        return {}
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts {bad} not allowed; allowed: {list(PARTS)}")
    try:
        cfg = model_cfg(args.model, args.cache_dir)
    except ConfigError as e:
        raise SystemExit(f"--model: {e}") from None
    refused = [p for p in parts if p in MINILM_ONLY]
    if refused and args.model != "minilm_l6":
        raise SystemExit(
            f"--parts {','.join(refused)} run on minilm_l6 only; for {args.model} use "
            "scripts/bench_decoder_step.py (training step time and peak RSS of a decoder)"
        )
    stem, title = NAMES.get(args.model, (args.model, args.model))
    decoder = is_decoder(cfg)
    size = args.batch or (2 if decoder else 32)
    seq = args.seq or (256 if decoder else 64)
    configs = allocations(cfg, args.cache_dir, space)
    out = args.out or OUT / f"packed_{stem}"
    json_path = out.with_suffix(".json")
    results = read_part_results(json_path)  # parts not re-run keep their committed numbers
    if "bytes" in parts:
        results["bytes"] = part_bytes(cfg, configs)
    if "switch" in parts:
        results["switch"] = part_switch(cfg, configs, args.reps)
    if "layers" in parts:
        shapes = MINILM_SHAPES
        if args.model != "minilm_l6":
            model, names = load_model(cfg)
            shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in names})
            del model
        results["layers"] = part_layers(shapes, args.reps)
    if "speed" in parts:
        seqs = [int(s) for s in args.seqs.split(",")]
        budgets = [float(b) for b in args.speed_budgets.split(",")]
        results["speed"] = part_speed(cfg, configs, args.reps, seqs, budgets)
    if "deploy" in parts:
        results["deploy"] = part_deploy(cfg, configs, args.reps, size, seq)
    if "rss" in parts:
        results["rss"] = part_rss(args.steps, args.rss_seq, args.cache_dir, args.space)
    command = repo_command(ROOT, argv if argv is None else [__file__, *argv])
    stamp_parts(results, parts, command)
    results["model"] = args.model
    lines = markdown(results, command, title)
    atomic_write_json(json_path, {"header": lines[:5], "results": results})
    emit_markdown(lines, out.with_suffix(".md"))
    return results


if __name__ == "__main__":
    main()
