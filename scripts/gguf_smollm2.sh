#!/usr/bin/env bash
# The SmolLM2 table of docs/gguf.md ("SmolLM2 in llama.cpp"): per-budget QLoRA and one CoA-LoRA run
# trained in the GGUF space (quant.space.kind=gguf), each exported with format=gguf and run in
# llama.cpp beside coalora (scripts/llamacpp_check.py), then the report.
#
#   scripts/gguf_smollm2.sh                      # everything not done yet (resumable)
#
# 1. scripts/decoder_comparison.sh trains and evaluates (32 WikiText-2 test blocks, held-out
#    configurations near each budget) qlora_b<B> for each budget and coalora_zero_x4_s42 (160 steps
#    = the four per-budget runs' compute; init=zero so that "without the adapter" is the plain
#    quantized base), into $RESULTS/<run>/.
# 2. export.py format=gguf writes each run's configurations (CoA-LoRA: all budgets in one export).
# 3. scripts/llamacpp_check.py scores $BLOCKS evaluation blocks in llama.cpp and in coalora, with
#    and without the adapter: $RESULTS/<run>/llamacpp_<B>.json.
# 4. scripts/gguf_report.py writes $RESULTS/report.md.
# Env: OUT [outputs/gguf_smollm2]  RESULTS [docs/results/gguf_smollm2]  BUDGETS ["4.25 4.5 4.75 5.0"]
#      BLOCKS [8]  THREADS [1]  PY [.venv/bin/python]; STEPS, BATCH, LR as decoder_comparison.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/gguf_smollm2}
RESULTS=${RESULTS:-docs/results/gguf_smollm2}
BUDGETS=${BUDGETS:-4.25 4.5 4.75 5.0}
BLOCKS=${BLOCKS:-8}
THREADS=${THREADS:-1}
list="[${BUDGETS// /,}]"
names=()
for b in $BUDGETS; do names+=("qlora_b$b"); done
names+=(coalora_zero_x4_s42)

ARGS="quant.space.kind=gguf ${ARGS:-}" BUDGETS="$list" POOL="4.05 5.5 0.15" OUT="$OUT" \
  RESULTS="$RESULTS" PY="$PY" scripts/decoder_comparison.sh "${names[@]}"

label_of() {  # the export's configuration label nearest budget $2
  "$PY" -c 'import json, sys
m = json.load(open(sys.argv[1] + "/manifest.json"))["configurations"]
print(min(m, key=lambda k: abs(float(k) - float(sys.argv[2]))))' "$1" "$2"
}

for name in "${names[@]}"; do
  run="$OUT/$name" gguf="$OUT/$name-gguf"
  case $name in
    coalora*) todo=($BUDGETS) q="quant.budgets=$list" ;;
    *) todo=("${name#qlora_b}") q="" ;;
  esac
  for b in "${todo[@]}"; do
    dest="$RESULTS/$name/llamacpp_$b.json"
    [[ -f "$dest" ]] && continue
    if [[ ! -f "$gguf/manifest.json" ]]; then
      echo "== $name: export format=gguf ($(date -u +%H:%M:%S))"
      "$PY" export.py ckpt="$run" format=gguf $q out_dir="$gguf" overwrite=true \
        hydra.run.dir="$OUT/$name-export"
    fi
    echo "== $name: llama.cpp check at $b ($(date -u +%H:%M:%S))"
    OMP_NUM_THREADS=$THREADS "$PY" scripts/llamacpp_check.py "$gguf" --budget "$(label_of "$gguf" "$b")" \
      --blocks "$BLOCKS" --threads "$THREADS" --out "$dest"
  done
done
"$PY" scripts/gguf_report.py --results "$RESULTS"
