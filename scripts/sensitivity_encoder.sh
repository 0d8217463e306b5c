#!/usr/bin/env bash
# Loss-aware vs data-free allocation on an encoder (docs/quantization.md, "Sensitivity"): QLoRA on
# MiniLM-L6 / SST-2 at each budget, the base allocated with quant.sensitivity=none and =fisher,
# the same seed, data order and step count; then evaluate.py on the full SST-2 dev set
# (872 examples) with per-example predictions and scripts/paired.py (McNemar's exact test
# and a paired bootstrap interval of the accuracy difference, fisher vs none).
#
# Step 0 is not informative here: the classification head starts random, so every allocation
# scores at chance before training; the comparison is after STEPS QLoRA steps.
#
#   scripts/sensitivity_encoder.sh                 # budgets 2.5 3.0, 150 steps
#   BUDGETS="3.0" STEPS=300 scripts/sensitivity_encoder.sh
#
# Env: OUT [outputs/sensitivity_encoder]  RESULTS [docs/results/sensitivity/minilm_sst2]
#      BUDGETS [2.5 3.0]  STEPS [150]  SEED [42]  PY [.venv/bin/python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/sensitivity_encoder}
RESULTS=${RESULTS:-docs/results/sensitivity/minilm_sst2}
BUDGETS=${BUDGETS:-2.5 3.0}
STEPS=${STEPS:-150}
SEED=${SEED:-42}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

mkdir -p "$RESULTS"
for b in $BUDGETS; do
  evals=()
  for s in none fisher; do
    name="qlora_b${b}_${s}"
    run="$OUT/$name"
    if [ ! -f "$run/results.json" ]; then
      "$PY" train.py model=minilm_l6 task=sst2 method=qlora quant=budget "quant.budget=$b" \
        "quant.sensitivity=$s" "trainer.max_steps=$STEPS" "seed=$SEED" final_eval=false \
        "hydra.run.dir=$run"
    fi
    if [ ! -f "$run/eval/results.json" ]; then
      "$PY" evaluate.py "ckpt=$run" eval.save_predictions=true "hydra.run.dir=$run/eval"
    fi
    mkdir -p "$RESULTS/$name"
    cp "$run/eval/results.json" "$run/eval/predictions.csv" "$run/allocations.json" "$RESULTS/$name/"
    evals+=("$run/eval")
  done
  "$PY" scripts/paired.py "${evals[@]}" --out "$RESULTS/paired_b${b}.md"
done
