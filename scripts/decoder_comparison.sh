#!/usr/bin/env bash
# The decoder comparison of docs/decoder_lms.md ("Five methods on SmolLM2"): SmolLM2-135M on
# WikiText-2 (fine-tune on `valid`, report on `test`), every run with the same token budget and
# number of forward/backward passes, each followed by evaluate.py at the four budgets (multi-
# configuration methods also on held-out random configurations near each budget). The compact
# results of each run (results.json, predictions.csv with per-block NLL, the training log) are
# copied to $RESULTS/<run name>/ so that runs made in different sittings can be aggregated by
# scripts/decoder_report.py.
#
#   scripts/decoder_comparison.sh lora qlora_b3.0 coalora_s42      # named runs, in this order
#   scripts/decoder_comparison.sh --list                            # the run names
#   scripts/decoder_comparison.sh coalora_lpq_x4_s42 shared_lora_zero_x4_s42
#
# A multi-configuration run name may carry the shared initialisation after the method
# (`_zero`, `_lpq`, `_lq` -> method.init=..., docs/methods.md "Quantization-aware
# initialisation"); without it the method's default applies. CoA-LoRA runs use the paper's
# mixing (method.mapper.mix=full) unless the name carries `_learned` after the initialisation
# (method.mapper.mix=learned, the default since, docs/methods.md "What the mapper mixes"), e.g.
# coalora_lq_learned_x4_s42.
#
# A run whose $RESULTS/<name>/results.json exists is skipped (so a queue can be resumed).
# Env: OUT [outputs/decoder_comparison]  RESULTS [docs/results/decoder_smollm2]
#      STEPS [40]  BATCH [2]  LR [1e-3]  PY [.venv/bin/python]  ARGS (extra overrides, every run)
#      BUDGETS [[2.5,3.0,3.5,4.0]] (evaluation budgets)  POOL ["2.25 4.5 0.25"] (start stop step
#      of the multi-configuration training pool), e.g. the GGUF space of docs/gguf.md:
#      ARGS=quant.space.kind=gguf BUDGETS=[4.25,4.5,4.75,5.0] POOL="4.05 5.5 0.15"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/decoder_comparison}
RESULTS=${RESULTS:-docs/results/decoder_smollm2}
STEPS=${STEPS:-40}
BATCH=${BATCH:-2}
LR=${LR:-1e-3}
read -r -a EXTRA <<< "${ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}

# Every run: 40 optimizer steps x 2 blocks x 256 tokens = 20,480 training tokens from WikiText-2
# valid, one configuration per step (configs_per_step=1, so the multi-configuration methods pay
# the same forward/backward passes as one per-budget run); validation only at the last step, on
# one batch (the reported numbers come from evaluate.py on 32 test blocks).
COMMON=(model=smollm2_135m task=wikitext2 "data.batch_size=$BATCH" data.eval_batch_size=8
  "method.lr=$LR" trainer.limit_val_batches=1 final_eval=false)
BUDGETS=${BUDGETS:-[2.5,3.0,3.5,4.0]}
# the multi-configuration methods' training pool: allocations every 0.25 bits over 2.25-4.5
read -r POOL_START POOL_STOP POOL_STEP <<< "${POOL:-2.25 4.5 0.25}"
MULTI=(method.configs_per_step=1 "method.eval_budgets=$BUDGETS" "method.pool.start=$POOL_START"
  "method.pool.stop=$POOL_STOP" "method.pool.step=$POOL_STEP")

overrides() {  # run name -> its Hydra overrides (one per line)
  local name=$1 seed=42
  case $name in *_s[0-9]*) seed=${name##*_s} ;; esac
  printf '%s\n' "seed=$seed"
  local init
  for init in zero lpq lq; do  # <method>_<init>_...: the shared initialisation
    case $name in
      shared_lora_${init}_* | shared_lora_evalonly_${init}_* | coalora_${init}_*)
        echo "method.init=$init"; name=${name/_${init}_/_}; break ;;
    esac
  done
  case $name in  # coalora_<init>_learned_...: the mapper mixes only what training added to B
    coalora_learned_*) echo method.mapper.mix=learned; name=${name/_learned_/_} ;;
    coalora_*) echo method.mapper.mix=full ;;  # the paper's form (the runs named before the option)
  esac
  # <method>_x4_s<seed>: 4x the steps, the compute of the four per-budget runs together
  local steps=$STEPS
  case $name in *_x4_s*) steps=$((4 * STEPS)) name=${name/_x4/} ;; esac
  printf '%s\n' "method.max_steps=$steps" "method.val_check_interval=$steps"
  case $name in
    lora) echo method=lora ;;
    qlora_b* | lq_lora_b* | qwha_b*)
      local m=${name%_b*}
      printf '%s\n' "method=$m" quant=budget "quant.budget=${name##*_b}" ;;
    shared_lora_s*) printf '%s\n' method=shared_lora "${MULTI[@]}" ;;
    shared_lora_evalonly_s*)  # the CoA-LoRA paper's Shared-LoRA: only the evaluation budgets
      printf '%s\n' method=shared_lora "${MULTI[@]}" method.train_on=eval_budgets ;;
    coalora_s*) printf '%s\n' method=coalora "${MULTI[@]}" ;;
    coalora_r32_s*) printf '%s\n' method=coalora "${MULTI[@]}" method.rank=32 method.alpha=64 ;;
    shared_lora_r32_s*)
      printf '%s\n' method=shared_lora "${MULTI[@]}" method.rank=32 method.alpha=64 ;;
    *) echo "unknown run name: $name (see --list)" >&2; return 2 ;;
  esac
}

if [[ "${1:-}" == --list ]]; then
  echo lora qlora_b{2.5,3.0,3.5,4.0} lq_lora_b{2.5,3.0} qwha_b{2.5,3.0} \
    shared_lora_s{42,43} shared_lora_evalonly_s{42,43} coalora_s{42,43} \
    coalora_r32_s42 shared_lora_r32_s42 coalora_x4_s42 shared_lora_x4_s42 \
    shared_lora_evalonly_x4_s42 coalora_x4_s43 shared_lora_x4_s43 shared_lora_evalonly_x4_s43 \
    lq_lora_b{3.5,4.0} qwha_b{3.5,4.0} \
    {coalora,shared_lora}_{zero,lpq,lq}_x4_s{42,43} {coalora,shared_lora}_{zero,lpq,lq}_s{42,43} \
    {coalora,shared_lora}_{zero,lpq,lq}_r32_s42 coalora_{lpq,lq}_learned_{x4_,}s{42,43} \
    coalora_{lpq,lq}_learned_r32_s42
  exit 0
fi

for name in "$@"; do overrides "$name" > /dev/null || exit 2; done  # check every name first
for name in "$@"; do
  dest="$RESULTS/$name"
  if [[ -f "$dest/results.json" ]]; then echo "== $name: done already ($dest)"; continue; fi
  text=$(overrides "$name") || exit 2  # an unknown run name stops before anything runs
  mapfile -t ov <<< "$text"
  run="$OUT/$name"
  rm -rf "$run" "$run-eval"
  echo "== $name: train ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  "$PY" train.py "${COMMON[@]}" "${ov[@]}" "${EXTRA[@]}" hydra.run.dir="$run"
  trained=$(date +%s)
  echo "== $name: evaluate ($(date -u +%H:%M:%S))"
  "$PY" evaluate.py ckpt="$run" "eval.budgets=$BUDGETS" eval.random_per_budget=1 \
    hydra.run.dir="$run-eval"
  done_at=$(date +%s)
  mkdir -p "$dest.tmp"
  cp "$run-eval/results.json" "$run-eval/predictions.csv" "$dest.tmp/"
  cp "$run/run_info.json" "$dest.tmp/train_run_info.json" 2>/dev/null || true
  metrics=$(find "$run" -name metrics.csv | head -1)
  [[ -n "$metrics" ]] && cp "$metrics" "$dest.tmp/train_metrics.csv"
  printf '{"name": "%s", "overrides": "%s", "train_s": %d, "eval_s": %d, "host": "%s", "date": "%s"}\n' \
    "$name" "$(printf '%s ' "${COMMON[@]}" "${ov[@]}" "${EXTRA[@]}")" $((trained - start)) \
    $((done_at - trained)) "$(uname -m) $(nproc --all) cores, OMP_NUM_THREADS=$OMP_NUM_THREADS" "$(date -u +%FT%TZ)" > "$dest.tmp/run.json"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "== $name: done in $((done_at - start)) s -> $dest"
done
