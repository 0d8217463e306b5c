#!/usr/bin/env bash
# The five-method budget comparison in one command (arXiv 2509.25214's setting, scaled to the
# machine): per-budget QLoRA, LQ-LoRA and QWHA at each budget, one Shared-LoRA and one CoA-LoRA
# run for all budgets, full-precision LoRA as the ceiling; then compare.py's table and plots
# (metric vs bits, time vs number of configurations).
#
#   scripts/compare_methods.sh                       # MiniLM-L6 + SST-2, method defaults
#   QUICK=1 scripts/compare_methods.sh               # experiment=quick (100 steps, subsets)
#   ARGS="model=tiny_llama task=wikitext2" scripts/compare_methods.sh
#
# Env: BUDGETS [2.5,3.0,3.5,4.0]  SEED [42]  OUT [outputs/compare_methods/<date>]  PY [.venv/bin/python]
#      ARGS (every run)  MULTI_ARGS (Shared-LoRA and CoA-LoRA only, e.g. method.pool.step=0.5)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGETS=${BUDGETS:-2.5,3.0,3.5,4.0}
SEED=${SEED:-42}
OUT=${OUT:-outputs/compare_methods/$(date +%Y-%m-%d_%H-%M-%S)}
read -r -a EXTRA <<< "${ARGS:-}"
read -r -a MULTI <<< "${MULTI_ARGS:-}"
if [[ -n "${QUICK:-}" ]]; then EXTRA+=(experiment=quick); fi
runs=()
train() {  # name, overrides...
  local name=$1; shift
  "$PY" train.py seed="$SEED" "${EXTRA[@]}" "$@" hydra.run.dir="$OUT/$name"
  runs+=("$OUT/$name")
}
train lora method=lora
for b in ${BUDGETS//,/ }; do
  for m in qlora lq_lora qwha; do
    train "${m}_b$b" method=$m quant=budget quant.budget="$b"
  done
done
train shared_lora method=shared_lora "method.eval_budgets=[$BUDGETS]" "${MULTI[@]}"
train coalora method=coalora "method.eval_budgets=[$BUDGETS]" "${MULTI[@]}"
list=$(IFS=,; echo "${runs[*]}")
"$PY" scripts/compare.py "runs=[$list]" out="$OUT/compare"
echo "comparison: $OUT/compare"
