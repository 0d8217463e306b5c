"""Per-step time and memory of the training variants on a decoder LM (SmolLM2-135M), in one run.

Every variant trains LoRA r=8 (alpha 16) on the 7 projections of every block, fp32 on the CPU,
on the same WikiText-2 batch (``--batch`` × ``--seq`` tokens of the task's training split), with
AdamW over its trainable parameters only:

* ``coalora``: CoA-LoRA (arXiv 2509.25214 §3) through coalora's own code path — the train config
  composed with ``model=<model> task=wikitext2 method=coalora``, ``prepare(cfg)``,
  ``method.setup``, ``method.training_loss(model, batch, step)`` + backward + AdamW — with
  ``method.configs_per_step=1`` over a small pool (``--pool``), so the base switches
  configuration every step; packed storage (docs/packed.md: the storage for causal LMs);
* ``qlora_packed`` / ``qlora_dequantized``: QLoRA (arXiv 2305.14314) on coalora's uniform NF4 with
  double quantization (``quant=nf4``, 4.127 bits) with ``quant.storage=packed|dequantized``;
* ``lora``: LoRA on the full-precision base (``method=lora``);
* ``peft_bnb``: what a user would pick instead — a ``transformers`` model loaded with
  ``BitsAndBytesConfig(load_in_4bit=True)`` (nf4, double quantization, fp32 compute: QLoRA's
  recipe, arXiv 2305.14314 §3) so its target linears are ``bitsandbytes.nn.Linear4bit``, then
  ``peft.prepare_model_for_kbit_training`` (without gradient checkpointing, which our variants do
  not use) and ``peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules=[...]))``;
* optional (``--variants``): ``qlora_bnb`` (coalora's QLoRA on ``quant=bnb_nf4``) and
  ``coalora_dequantized``.

With packed storage QLoRA frees the fp32 originals after setup (one fixed configuration,
``Method.release_original``); CoA-LoRA keeps them to quantize configurations it has not seen.

Parts (``--parts``):

* ``speed``: step time of the variants interleaved round-robin in one process (the cores are
  shared: contention hits every variant alike), medians and paired ratios per round;
* ``rss``: peak RSS of ``--steps`` training steps, each variant in its own child process
  (VmHWM, reset after setup), and the base's resident weight bytes during training vs its packed
  size (``resident_weight_bytes``, ``formula_weight_bytes``; adapters excluded from both);
* ``infer``: no-grad forward latency on the same input of a ``coalora.deploy.load`` packed export
  of the CoA-LoRA model at 3.0 bits vs that training-time model vs QLoRA NF4 (packed) vs the
  bitsandbytes NF4 model, interleaved, plus the export's max |logit difference|.

Every variant's first step is checked: finite loss, a gradient on every trainable parameter and
on nothing else, only adapter parameters (LoRA, CoA-LoRA's mapper) trainable, and the optimizer
step moves them. Writes ``--out`` .md and .json; progress lines go to stdout (flushed).

Full run (the default shapes; about 10-15 min on 2 free cores by the 1 × 64 smoke run, up to
twice that when the cores are shared):

    OMP_NUM_THREADS=1 COALORA_CACHE_DIR=/tmp/wt11_cache COALORA_DATA_DIR=/work/shared/data \\
        python scripts/bench_decoder_step.py --batch 2 --seq 256 --reps 7 --steps 3 \\
        --out docs/results/decoder_step_smollm2 2>&1 | tee /tmp/bench_decoder_step.log
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coalora.io import atomic_write_json
from coalora.quant.bnb import bnb_cpu_status, bnb_weight_bytes, replace_with_bnb_nf4
from coalora.report.bench import (
    emit_markdown,
    header_lines,
    interleaved,
    load_average,
    measure_peak_rss,
    median_ms,
    paired_ratio,
    quartiles,
    repo_command,
    run_json_child,
    status_kb,
)

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("speed", "rss", "infer")
DEFAULT_VARIANTS = ("coalora", "qlora_packed", "qlora_dequantized", "lora", "peft_bnb")
DEFAULT_RSS = DEFAULT_VARIANTS
# coalora variants: (Hydra overrides, description); peft_bnb is built outside coalora
COALORA_VARIANTS: dict[str, tuple[list[str], str]] = {
    "coalora": (
        ["method=coalora", "quant.storage=packed", "method.configs_per_step=1"],
        "CoA-LoRA, packed storage, 1 configuration per step (switches every step)",
    ),
    "coalora_dequantized": (
        ["method=coalora", "quant.storage=dequantized", "method.configs_per_step=1"],
        "CoA-LoRA, dequantized storage, 1 configuration per step",
    ),
    "qlora_packed": (
        ["method=qlora", "quant=nf4", "quant.storage=packed"],
        "QLoRA, coalora NF4 + double quantization (4.127 bits), packed storage (fp32 originals "
        "dropped after setup: one fixed configuration)",
    ),
    "qlora_dequantized": (
        ["method=qlora", "quant=nf4", "quant.storage=dequantized"],
        "QLoRA, coalora NF4 + double quantization (4.127 bits), dequantized storage",
    ),
    "qlora_bnb": (
        ["method=qlora", "quant=bnb_nf4"],
        "coalora QLoRA on bitsandbytes Linear4bit (quant=bnb_nf4)",
    ),
    "lora": (["method=lora"], "LoRA on the full-precision fp32 base"),
}
PEFT_DESCRIPTION = "PEFT LoRA on transformers + bitsandbytes NF4 (Linear4bit, double quant)"
ALL_VARIANTS = (*COALORA_VARIANTS, "peft_bnb")
BNB_VARIANTS = ("peft_bnb", "qlora_bnb")
# (a, b, goal on a / b): paired step-time ratios reported when both variants ran
PAIRS = (
    ("coalora", "qlora_packed", None),
    ("qlora_packed", "qlora_dequantized", 1.15),
    ("qlora_packed", "peft_bnb", None),
    ("qlora_dequantized", "peft_bnb", None),
    ("coalora", "peft_bnb", None),
    ("qlora_packed", "lora", None),
    ("coalora", "lora", None),
    ("peft_bnb", "lora", None),
    ("qlora_bnb", "peft_bnb", None),
    ("coalora", "coalora_dequantized", None),
)
RESIDENT_GOAL = 1.2  # base resident bytes / packed size, packed storage


def log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


# ---------------------------------------------------------------- building the variants
def compose_cfg(args, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    base = [
        f"model={args.model}",
        "task=wikitext2",
        f"data.batch_size={args.batch}",
        f"task.block_length={args.seq}",
        "data.allow_hub=false",
        f"paths.cache_dir={args.cache_dir}",
        f"paths.log_dir={args.tmp}",
        "callbacks=minimal",
        "logger=csv",
    ]
    if args.data_dir:
        base.append(f"paths.data_dir={args.data_dir}")
    start, stop, step = args.pool
    pool = [f"method.pool.start={start}", f"method.pool.stop={stop}", f"method.pool.step={step}"]
    is_multi = any(o in ("method=coalora", "method=shared_lora") for o in overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[*base, *overrides, *(pool if is_multi else []), *args.override]
        )


def wikitext_batch(args) -> dict[str, torch.Tensor]:
    """One fixed training batch (the task's training split, seeded draw)."""
    from coalora.models import build_tokenizer
    from coalora.stages.build import build_datamodule

    cfg = compose_cfg(args, ["method=lora"])
    dm = build_datamodule(cfg, build_tokenizer(cfg.model))
    batch = dm.calibration_batches(1, seed=0, batch_size=args.batch)[0]
    assert tuple(batch["input_ids"].shape) == (args.batch, args.seq), batch["input_ids"].shape
    return batch


def _is_adapter(name: str) -> bool:
    return "lora_" in name or name.startswith("mapper.")


@dataclass
class Trainee:
    """One variant: its model, trainable (adapter) parameters, AdamW and loss."""

    name: str
    description: str
    model: nn.Module
    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    loss_fn: Callable[[dict, int], torch.Tensor]
    method: Any = None
    config: Any = None  # the base's current configuration (ModelQuantConfig), None: fp / bnb
    build_s: float = 0.0
    first_use_s: float | None = None  # CoA-LoRA: quantizing every training configuration once
    notes: list[str] = field(default_factory=list)
    steps_done: int = 0
    losses: list[float] = field(default_factory=list)
    check: dict | None = None

    def step(self, batch: dict, check: bool = False) -> None:
        before = {n: p.detach().clone() for n, p in self.params.items()} if check else None
        loss = self.loss_fn(batch, self.steps_done)
        loss.backward()
        if check:
            self.check = self._check_grads(loss)
        self.opt.step()
        if check:
            moved = sum(int(not torch.equal(p.detach(), before[n])) for n, p in self.params.items())
            if moved == 0:
                raise AssertionError(f"{self.name}: the optimizer step moved no parameter")
            self.check["moved"] = moved
        self.opt.zero_grad(set_to_none=True)
        if self.method is not None and self.method.switches_configs:
            self.config = self.method.draw(self.steps_done)[-1]
        self.steps_done += 1
        self.losses.append(float(loss.detach()))

    def _check_grads(self, loss: torch.Tensor) -> dict:
        if not torch.isfinite(loss):
            raise AssertionError(f"{self.name}: loss {float(loss)} is not finite")
        missing = [n for n, p in self.params.items() if p.grad is None]
        if missing:
            raise AssertionError(f"{self.name}: no gradient on trainable {missing[:3]}")
        trainable = {id(p) for p in self.params.values()}
        frozen = [
            n
            for n, p in self.all_parameters()
            if id(p) not in trainable and (p.grad is not None or p.requires_grad)
        ]
        if frozen:
            raise AssertionError(f"{self.name}: frozen parameters got gradients: {frozen[:3]}")
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in self.params.values()))
        if not math.isfinite(norm) or norm == 0.0:
            raise AssertionError(f"{self.name}: gradient norm {norm}")
        return {
            "loss": round(float(loss.detach()), 5),
            "trainable_tensors": len(self.params),
            "trainable_params": sum(p.numel() for p in self.params.values()),
            "grad_norm": float(f"{norm:.5g}"),
        }

    def all_parameters(self):
        yield from self.model.named_parameters()
        if self.method is not None:
            for key, module in self.method.modules().items():
                for n, p in module.named_parameters():
                    yield f"{key}.{n}", p


def _adamw(cfg, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(
        list(params.values()), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas)
    )


def _only_adapters(name: str, params: dict[str, nn.Parameter]) -> None:
    bad = [n for n in params if not _is_adapter(n)]
    if bad or not params:
        raise AssertionError(f"{name}: trainable parameters that are not adapters: {bad[:3]}")


def build_coalora_variant(name: str, args) -> Trainee:
    from coalora.stages.build import prepare

    overrides, description = COALORA_VARIANTS[name]
    t = time.perf_counter()
    cfg = compose_cfg(args, overrides)
    _, model, method, ctx = prepare(cfg, with_data=False)
    method.setup(model, ctx)
    notes = []
    first_use = None
    if method.switches_configs:  # quantize every training configuration once: steady state
        t1 = time.perf_counter()
        for config in method.train_set:
            method.switch_base(model, config)
        first_use = time.perf_counter() - t1
        method.switch_base(model, method.config)
        notes.append(f"{len(method.train_set)} training configurations")
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for key, module in method.modules().items():
        module.train()
        params.update({f"{key}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
    _only_adapters(name, params)
    declared = {n for n, _ in method.trainable_parameters(model)}
    if not declared <= set(params):
        raise AssertionError(f"{name}: adapter parameters left frozen")

    def loss_fn(batch: dict, step: int) -> torch.Tensor:
        return method.training_loss(model, batch, step)

    return Trainee(
        name,
        description,
        model,
        params,
        _adamw(cfg, params),
        loss_fn,
        method=method,
        config=method.config,
        build_s=time.perf_counter() - t - (first_use or 0.0),
        first_use_s=first_use,
        notes=notes,
    )


def _hf_dir(cfg, tmp: Path) -> Path:
    """The folder ``from_pretrained`` reads for this model: the converted folder, or the
    coalora-built (seeded, random) model saved once into ``tmp``."""
    from coalora.models.causal_lm import build_causal_lm, causal_lm_path

    if cfg.model.source != "random":
        return Path(causal_lm_path(cfg.model))
    out = tmp / f"hf-{cfg.model.name}"
    if not (out / "config.json").exists():
        build_causal_lm(cfg.model, seed=cfg.seed).save_pretrained(out)
    return out


def build_peft_bnb(args) -> Trainee:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t = time.perf_counter()
    cfg = compose_cfg(args, ["method=lora"])  # model, rank, alpha, dropout and optim keys
    path = _hf_dir(cfg, args.tmp)
    targets = list(cfg.model.target_modules)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, dtype=torch.float32, device_map="cpu"
        )
        how = "from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, fp32 compute), device_map='cpu')"
    except Exception as e:  # noqa: BLE001 - fall back to replacing the modules ourselves
        from coalora.quant.model import target_linear_names

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        replace_with_bnb_nf4(model, target_linear_names(model, targets))
        how = f"BitsAndBytesConfig failed on CPU ({type(e).__name__}: {e}); targets replaced by coalora.quant.bnb.replace_with_bnb_nf4"
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    m = cfg.method
    lora = LoraConfig(
        r=int(m.rank),
        lora_alpha=float(m.alpha),
        lora_dropout=float(m.dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _only_adapters("peft_bnb", params)

    def loss_fn(batch: dict, step: int) -> torch.Tensor:
        return model(**batch).loss

    return Trainee(
        "peft_bnb",
        PEFT_DESCRIPTION,
        model,
        params,
        _adamw(cfg, params),
        loss_fn,
        build_s=time.perf_counter() - t,
        notes=[how, f"{n4} Linear4bit layers"],
    )


def build(name: str, args) -> Trainee:
    log(f"build {name}")
    tr = build_peft_bnb(args) if name == "peft_bnb" else build_coalora_variant(name, args)
    first = "" if tr.first_use_s is None else f", first use of the pool {tr.first_use_s:.1f} s"
    log(f"built {name} in {tr.build_s:.1f} s{first}" + "".join(f"; {n}" for n in tr.notes))
    return tr


# ---------------------------------------------------------------- parts
def part_speed(trainees: dict[str, Trainee], batch: dict, reps: int) -> dict:
    for tr in trainees.values():  # warm-up = the checked first step
        t = time.perf_counter()
        tr.step(batch, check=True)
        log(f"speed warm-up {tr.name}: {time.perf_counter() - t:.2f} s, check {tr.check}")

    def progress(name: str, r: int, seconds: float) -> None:
        tr = trainees[name]
        log(f"speed round {r + 1}/{reps} {name}: {seconds:.2f} s, loss {tr.losses[-1]:.4f}")

    fns = {name: (lambda tr=tr: tr.step(batch)) for name, tr in trainees.items()}
    wall, cpu = interleaved(fns, reps, warmup=0, progress=progress)
    tokens = batch["input_ids"].numel()
    rows = {}
    for name, tr in trainees.items():
        q25, q75 = quartiles(wall[name])
        med = statistics.median(wall[name])
        rows[name] = {
            "description": tr.description,
            "median_ms": median_ms(wall[name]),
            "q25_q75_ms": [round(q25 * 1e3, 2), round(q75 * 1e3, 2)],
            "cpu_median_ms": median_ms(cpu[name]),
            "tokens_per_s": round(tokens / med, 1),
            "wall_s": [round(x, 4) for x in wall[name]],
            "cpu_s": [round(x, 4) for x in cpu[name]],
            "losses": [round(x, 5) for x in tr.losses],
            "check": tr.check,
            "build_s": round(tr.build_s, 2),
            "first_use_s": None if tr.first_use_s is None else round(tr.first_use_s, 2),
            "notes": tr.notes,
        }
    pairs = []
    for a, b, goal in PAIRS:
        if a in wall and b in wall:
            row = {"a": a, "b": b, **paired_ratio(wall[a], wall[b])}
            row["cpu_ratio_of_medians"] = round(
                statistics.median(cpu[a]) / statistics.median(cpu[b]), 4
            )
            row["goal"] = goal
            pairs.append(row)
            log(f"ratio {a} / {b}: {row}")
    return {"reps": reps, "tokens_per_step": tokens, "variants": rows, "pairs": pairs}


def weight_report(tr: Trainee) -> dict:
    """Resident weight bytes of the base (adapters excluded) vs its packed size (the storage
    formula: average bits × target parameters / 8 + the non-target weights)."""
    from coalora.quant import QuantLinear, formula_weight_bytes, resident_weight_bytes

    in_model = {id(p) for _, p in tr.model.named_parameters()}
    adapters = sum(p.numel() * p.element_size() for p in tr.params.values() if id(p) in in_model)
    if tr.name == "peft_bnb" or tr.name == "qlora_bnb":
        w = bnb_weight_bytes(tr.model)
        formula = None
    else:
        w = resident_weight_bytes(tr.model)
        formula = None if tr.config is None else formula_weight_bytes(tr.model, tr.config)
    caches = {id(m.cache): m.cache for m in tr.model.modules() if isinstance(m, QuantLinear)}
    out = {
        **w,
        "adapter_bytes": adapters,
        "base_resident_bytes": w["total"] - adapters,
        "cache_bytes": sum(c.nbytes for c in caches.values()),  # every cached option
    }
    if formula is not None:
        out["base_packed_bytes"] = round(formula - adapters)
        out["resident_over_packed"] = round(out["base_resident_bytes"] / (formula - adapters), 4)
        out["average_bits"] = round(tr.config.average_bits(), 4)
    return out


def rss_row(variant: str, args) -> dict:
    """One variant's memory: build, then ``args.steps`` training steps (the first checked)."""
    rss_start = status_kb("VmRSS")
    batch = wikitext_batch(args)
    tr = build(variant, args)
    gc.collect()
    step_s: list[float] = []

    def run_steps() -> None:
        for i in range(args.steps):
            t = time.perf_counter()
            tr.step(batch, check=i == 0)
            step_s.append(round(time.perf_counter() - t, 4))

    memory = measure_peak_rss(run_steps)
    return {
        "variant": variant,
        "description": tr.description,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "rss_start_kb": rss_start,
        **memory,
        # anonymous vs file-backed pages after the steps (a memory-mapped checkpoint's pages
        # count in VmRSS / VmHWM while mapped, whether or not a tensor still uses them)
        "rss_anon_end_kb": status_kb("RssAnon"),
        "rss_file_end_kb": status_kb("RssFile"),
        "step_s": step_s,
        "losses": [round(x, 5) for x in tr.losses],
        "check": tr.check,
        "weights": weight_report(tr),
        "notes": tr.notes,
    }


def _child_args(args, variant: str) -> list[str]:
    out = [__file__, "--rss-child", variant, "--model", args.model, "--batch", str(args.batch)]
    out += ["--seq", str(args.seq), "--steps", str(args.steps), "--cache-dir", str(args.cache_dir)]
    out += ["--pool", ",".join(map(str, args.pool))]
    if args.data_dir:
        out += ["--data-dir", str(args.data_dir)]
    for o in args.override:
        out += ["--override", o]
    return out


def part_rss(variants: list[str], args) -> list[dict]:
    rows = []
    for variant in variants:
        log(f"rss child {variant} ({args.steps} steps)")
        row = run_json_child(_child_args(args, variant))
        w = row["weights"]
        log(
            f"rss {variant}: peak steps {row['peak_steps_kb']} KiB, process "
            f"{row['peak_process_kb']} KiB, base resident {w['base_resident_bytes']} B, "
            f"resident/packed {w.get('resident_over_packed')}"
        )
        rows.append(row)
    return rows


def part_infer(trainees: dict[str, Trainee], batch: dict, reps: int, args) -> dict:
    from coalora import deploy

    co = trainees["coalora"]
    for tr in trainees.values():  # a trained adapter: the export must carry a nonzero LoRA
        if tr.steps_done == 0:
            tr.step(batch, check=True)
    method = co.method
    label = min(method.eval_set, key=lambda k: abs(float(k) - 3.0))
    config, tag = method.eval_set[label], f"{float(label):.1f}"
    method.adapt(co.model, config)  # switch to the 3.0-bit allocation and fold B' = B(I + γU)
    adapters, scaling = deploy.lora_tensors(co.model, method.names)
    out = deploy.save_packed(
        co.model, method.names, {tag: config}, {tag: adapters}, args.tmp / "export",
        scaling=scaling, overwrite=True,
    )  # fmt: skip
    served = deploy.load(out, budget=tag)
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    models = {f"deploy_packed_{tag}": served, f"coalora_training_{tag}": co.model}
    if "qlora_packed" in trainees:
        models["qlora_packed_nf4"] = trainees["qlora_packed"].model
    if "peft_bnb" in trainees:
        models["peft_bnb_nf4"] = trainees["peft_bnb"].model
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for m in models.values():
        m.eval()
    with torch.no_grad():
        diff = (served(**x).logits - co.model(**x).logits).abs().max().item()
        log(f"infer: max |logit difference| deploy vs training-time at {tag} bits: {diff:.3e}")

        def progress(name: str, r: int, seconds: float) -> None:
            log(f"infer round {r + 1}/{reps} {name}: {seconds * 1e3:.1f} ms")

        fns = {k: (lambda m=m: m(**x)) for k, m in models.items()}
        wall, _ = interleaved(fns, reps, warmup=1, progress=progress)
    for m in models.values():
        m.train()
    return {
        "reps": reps,
        "batch": list(batch["input_ids"].shape),
        "average_bits": round(config.average_bits(), 4),
        "export_dir_bytes": disk,
        "max_abs_logit_diff_deploy_vs_training": diff,
        "median_ms": {k: median_ms(v) for k, v in wall.items()},
        "q25_q75_ms": {k: [round(q * 1e3, 2) for q in quartiles(v)] for k, v in wall.items()},
        "wall_s": {k: [round(t, 4) for t in v] for k, v in wall.items()},
    }


# ---------------------------------------------------------------- markdown
def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f} MiB"


def markdown(results: dict, command: str) -> list[str]:
    meta = results["meta"]
    lines = header_lines(f"Training step cost of the variants on {meta['model']}", command)
    lines[0] = "# " + lines[0][3:]
    lines += [
        f"* load average: start {meta['load_start']}; end {meta['load_end']}",
        f"* wall time of the whole run: {meta['elapsed_s']:.0f} s",
        f"* batch: {meta['batch']} × {meta['seq']} tokens of WikiText-2 `{meta['train_split']}` "
        "(one fixed seeded draw, the same for every variant and step), fp32, CPU, "
        f"{meta['threads']} thread(s); LoRA r={meta['rank']}, alpha={meta['alpha']} on "
        f"{meta['targets']} target linears; AdamW lr={meta['lr']} over the trainable parameters",
        f"* CoA-LoRA pool: budgets {meta['pool'][0]}–{meta['pool'][1]} step {meta['pool'][2]}, "
        "1 configuration per step",
    ]
    lines += [f"* {note}" for note in meta.get("notes", [])]
    lines.append("")
    if "speed" in results:
        s = results["speed"]
        lines += [
            f"## Step time (forward + backward + AdamW), medians of {s['reps']} interleaved rounds",
            "",
            "| variant | what | median s | [q25, q75] s | CPU s | tokens/s | trainable "
            "| first-step loss | build s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in s["variants"].items():
            q = r["q25_q75_ms"]
            lines.append(
                f"| {name} | {r['description']} | {r['median_ms'] / 1e3:.3f} | "
                f"[{q[0] / 1e3:.3f}, {q[1] / 1e3:.3f}] | {r['cpu_median_ms'] / 1e3:.3f} | "
                f"{r['tokens_per_s']} | {r['check']['trainable_params']:,} | "
                f"{r['check']['loss']:.4f} | {r['build_s']:.1f}"
                + ("" if r["first_use_s"] is None else f" (+{r['first_use_s']:.1f} first use)")
                + " |"
            )
        lines += [
            "",
            "| a / b | ratio of medians | paired median [q25, q75] | CPU-time ratio | goal |",
            "|---|---:|---:|---:|---|",
        ]
        for p in s["pairs"]:
            goal = ""
            if p["goal"] is not None:
                ok = p["paired_median"] <= p["goal"]
                goal = f"≤ {p['goal']}: {'met' if ok else 'NOT met'}"
            lines.append(
                f"| {p['a']} / {p['b']} | {p['ratio_of_medians']:.3f} | "
                f"{p['paired_median']:.3f} [{p['paired_q25']:.3f}, {p['paired_q75']:.3f}] | "
                f"{p['cpu_ratio_of_medians']:.3f} | {goal} |"
            )
        lines.append("")
    if "rss" in results:
        steps = results["rss"][0]["steps"] if results["rss"] else 0
        lines += [
            f"## Peak RSS of {steps} training steps (one process per variant) and base weights",
            "",
            "Base = every weight but the adapters; packed size = the storage formula (average "
            "bits × target parameters / 8 + non-target weights), both from the tensors the "
            "model holds. Peaks: VmHWM after setup (steps alone, reset through "
            "/proc/self/clear_refs) and of the whole process; both count file-backed pages "
            "(a memory-mapped checkpoint), shown apart after the steps.",
            "",
            "| variant | RSS after setup | peak during steps | process peak | anon / file after "
            "| base resident | of it originals | base packed size | resident / packed "
            "| all cached options |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["rss"]:
            w = r["weights"]
            ratio = w.get("resident_over_packed")
            if ratio is None:
                shown = "n/a"
            else:
                shown = f"{ratio:.2f}" + (" (≤ 1.2)" if ratio <= RESIDENT_GOAL else " (> 1.2)")
            peak = r["peak_steps_kb"]
            lines.append(
                f"| {r['variant']} | {r['rss_after_setup_kb'] / 1024:.0f} MiB | "
                f"{'n/a' if peak is None else f'{peak / 1024:.0f} MiB'} | "
                f"{r['peak_process_kb'] / 1024:.0f} MiB | "
                f"{r['rss_anon_end_kb'] / 1024:.0f} / {r['rss_file_end_kb'] / 1024:.0f} MiB | "
                f"{_mib(w['base_resident_bytes'])} | "
                f"{_mib(w['original'])} | {_mib(w.get('base_packed_bytes'))} | {shown} | "
                f"{_mib(w['cache_bytes'])} |"
            )
        lines.append("")
    if "infer" in results:
        d = results["infer"]
        lines += [
            f"## Inference (no grad, batch {d['batch'][0]} × {d['batch'][1]}), medians of "
            f"{d['reps']} interleaved rounds",
            "",
            "| model | median ms | [q25, q75] ms |",
            "|---|---:|---:|",
        ]
        for k, v in d["median_ms"].items():
            q = d["q25_q75_ms"][k]
            lines.append(f"| {k} | {v} | [{q[0]}, {q[1]}] |")
        lines += [
            "",
            f"Export at {d['average_bits']} average bits: {_mib(d['export_dir_bytes'])} on "
            "disk; max |logit difference| deploy vs the training-time model: "
            f"{d['max_abs_logit_diff_deploy_vs_training']:.2e}.",
            "",
        ]
    return lines


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m", help="a decoder in conf/model")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="tokens per block (task.block_length)")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (speed, infer)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per RSS process")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--rss-variants", default=",".join(DEFAULT_RSS))
    ap.add_argument("--pool", default="2.25,4.5,0.25", help="CoA-LoRA pool start,stop,step")
    ap.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("COALORA_CACHE_DIR", ROOT / ".cache" / "coalora")),
    )
    ap.add_argument("--data-dir", default=os.environ.get("COALORA_DATA_DIR"))
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    ap.add_argument(
        "--out", type=Path, default=None, help="default docs/results/decoder_step_<model>"
    )
    ap.add_argument("--rss-child", choices=ALL_VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.pool = tuple(float(v) for v in args.pool.split(","))
    if len(args.pool) != 3:
        ap.error("--pool needs start,stop,step")
    for key in ("parts", "variants", "rss_variants"):
        chosen = [v for v in getattr(args, key).split(",") if v]
        allowed = PARTS if key == "parts" else ALL_VARIANTS
        bad = [v for v in chosen if v not in allowed]
        if bad:
            ap.error(f"--{key.replace('_', '-')} {bad} not allowed; allowed: {list(allowed)}")
        setattr(args, key, chosen)
    if "infer" in args.parts and "coalora" not in args.variants:
        ap.error("--parts infer needs the coalora variant in --variants")
    if args.out is None:
        args.out = ROOT / "docs" / "results" / f"decoder_step_{args.model}"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.tmp = Path(tempfile.mkdtemp(prefix="bench-decoder-step-"))
    try:
        if args.rss_child:
            print(json.dumps(rss_row(args.rss_child, args)), flush=True)
            return {}
        return run(args, argv)
    finally:
        shutil.rmtree(args.tmp, ignore_errors=True)


def run(args, argv: list[str] | None) -> dict:
    t0 = time.perf_counter()
    command = repo_command(ROOT, None if argv is None else [__file__, *argv])
    load_start = load_average()
    log(f"start: {command}; load {load_start}")
    notes = []
    bnb_problem = bnb_cpu_status()
    if bnb_problem:
        for key in ("variants", "rss_variants"):
            setattr(args, key, [v for v in getattr(args, key) if v not in BNB_VARIANTS])
        notes.append(f"bitsandbytes variants skipped: {bnb_problem}")
        log(notes[-1])
    cfg = compose_cfg(args, ["method=lora"])
    batch = wikitext_batch(args)
    results: dict[str, Any] = {}
    trainees: dict[str, Trainee] = {}
    if "speed" in args.parts or "infer" in args.parts:
        for name in args.variants:
            trainees[name] = build(name, args)
            gc.collect()
    if "speed" in args.parts:
        results["speed"] = part_speed(trainees, batch, args.reps)
        notes += [
            f"{n}: {'; '.join(r['notes'])}"
            for n, r in results["speed"]["variants"].items()
            if r["notes"]
        ]
    if "infer" in args.parts:
        for name in list(trainees):  # free what inference does not use
            if name not in ("coalora", "qlora_packed", "peft_bnb"):
                del trainees[name]
        gc.collect()
        results["infer"] = part_infer(trainees, batch, args.reps, args)
    trainees.clear()
    gc.collect()
    if "rss" in args.parts:
        results["rss"] = part_rss(args.rss_variants, args)
    results["meta"] = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "train_split": str(cfg.task.train_split),
        "threads": torch.get_num_threads(),
        "rank": int(cfg.method.rank),
        "alpha": float(cfg.method.alpha),
        "lr": float(cfg.optim.lr),
        "targets": len(cfg.model.target_modules) * int(cfg.model.num_layers),
        "pool": list(args.pool),
        "load_start": load_start,
        "load_end": load_average(),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "notes": notes,
    }
    lines = markdown(results, command)
    atomic_write_json(args.out.with_suffix(".json"), {"header": lines[:5], "results": results})
    emit_markdown(lines, args.out.with_suffix(".md"))
    log(f"done in {results['meta']['elapsed_s']:.0f} s; load {results['meta']['load_end']}")
    return results


if __name__ == "__main__":
    main()
