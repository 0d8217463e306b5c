#!/usr/bin/env bash
# Search -> train CoA-LoRA on the searched set -> evaluate at the target budgets (arXiv 2509.25214;
# README "Pareto search"), on the embedded MiniLM-L6 + SST-2.
#
#   scripts/pipeline.sh                      # full: 10 search rounds, 1000 training steps
#   QUICK=1 scripts/pipeline.sh              # smoke run: 2 rounds, 60 steps, 256 eval samples
#                                            # (QUICK=1 BASELINE=1 CKPT=pool: ~22 min on a busy 2-core CPU)
#   BASELINE=1 scripts/pipeline.sh           # + the same training on the initial pool (comparison)
#   CKPT=pool scripts/pipeline.sh            # train on the pool first, search with that adapter
#
# Environment (defaults in brackets):
#   ITER [10]  search rounds          CANDS [5]   candidates per round    CALIB [4] calibration batches
#   STEPS [1000] training steps       SEED [42]   seed of every stage     EVAL_SAMPLES [all] dev examples
#   BASELINE [0] also train + evaluate CoA-LoRA on the initial pool (no configset), same steps/seed
#   CKPT [none] trained coalora run whose adapter + head score the search's loss (without it: the
#        quantized base + a fresh head); CKPT=pool trains the pool baseline first and uses it
#   OUT [outputs/pipeline/<date>]     PY [.venv/bin/python]
#   SEARCH_ARGS / TRAIN_ARGS / EVAL_ARGS   extra Hydra overrides for each stage
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${QUICK:-0}" == 1 ]]; then
  : "${ITER:=2}" "${CANDS:=3}" "${CALIB:=2}" "${STEPS:=60}" "${EVAL_SAMPLES:=256}"
fi
ITER=${ITER:-10}
CANDS=${CANDS:-5}
CALIB=${CALIB:-4}
STEPS=${STEPS:-1000}
SEED=${SEED:-42}
EVAL_SAMPLES=${EVAL_SAMPLES:-null}
BASELINE=${BASELINE:-0}
CKPT=${CKPT:-}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}
if [[ -z "${COALORA_DATA_DIR:-}" && -d ../shared/data/glue ]]; then
  export COALORA_DATA_DIR=$(cd ../shared/data && pwd)
fi
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_DISABLE_TELEMETRY=1
# shellcheck disable=SC2206
SEARCH_EXTRA=(${SEARCH_ARGS:-}) TRAIN_EXTRA=(${TRAIN_ARGS:-}) EVAL_EXTRA=(${EVAL_ARGS:-})

stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }

train_eval() {  # name, extra overrides...
  local name=$1; shift
  stage "train CoA-LoRA ($name): $STEPS steps -> $OUT/train_$name"
  "$PY" train.py model=minilm_l6 task=sst2 method=coalora seed="$SEED" \
    trainer.max_steps="$STEPS" trainer.val_check_interval="$STEPS" callbacks=minimal "$@" \
    "${TRAIN_EXTRA[@]}" hydra.run.dir="$OUT/train_$name"
  stage "evaluate ($name) -> $OUT/eval_$name"
  "$PY" evaluate.py ckpt="$OUT/train_$name" eval.max_eval_samples="$EVAL_SAMPLES" \
    eval.seed="$SEED" "${EVAL_EXTRA[@]}" hydra.run.dir="$OUT/eval_$name"
}

if [[ "$CKPT" == pool ]]; then
  train_eval pool
  CKPT="$OUT/train_pool"
fi
CKPT_ARG=()
[[ -n "$CKPT" ]] && CKPT_ARG=(ckpt="$CKPT")

stage "search: $ITER rounds x $CANDS candidates -> $OUT/search"
"$PY" search.py model=minilm_l6 task=sst2 seed="$SEED" search.iterations="$ITER" \
  search.candidates_per_iter="$CANDS" search.calib_batches="$CALIB" "${CKPT_ARG[@]}" \
  "${SEARCH_EXTRA[@]}" hydra.run.dir="$OUT/search"

train_eval searched method.configset="$OUT/search/configset.json"
if [[ "$BASELINE" == 1 && ! -d "$OUT/eval_pool" ]]; then
  train_eval pool
fi

stage "summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
s = json.loads((out / "search" / "results.json").read_text())
print(f"search: {s['observations']} observations, {s['selected']} selected, hypervolume "
      f"{s['hypervolume_start']:.5g} -> {s['hypervolume_end']:.5g}")
for name in ("searched", "pool"):
    f = out / f"eval_{name}" / "results.json"
    if not f.is_file():
        continue
    train = json.loads((out / f"train_{name}" / "results.json").read_text())
    rows = json.loads(f.read_text())["rows"]
    metric = next(k for k in rows[0] if k not in ("budget", "kind", "avg_bits", "adapt_ms"))
    alloc = {r["budget"]: r[metric] for r in rows if r["kind"] == "allocation"}
    rand = [r[metric] for r in rows if r["kind"] != "allocation"]
    cells = "  ".join(f"{b:g}: {v:.4f}" for b, v in sorted(alloc.items()))
    mean = sum(alloc.values()) / len(alloc)
    extra = f"  random-near mean {sum(rand) / len(rand):.4f}" if rand else ""
    print(f"{name:>8} ({train['train_configs']} train configs, {train['global_step']} steps): "
          f"{metric} {cells}  mean {mean:.4f}{extra}")
print(f"outputs: {out}")
EOF
