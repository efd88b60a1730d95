#!/usr/bin/env bash
# The DnD experiment on SmolLM2-135M-Instruct: LoRA checkpoints for six tasks, leave-one-task-out
# generators for three held-out tasks, a generator trained on all six, and the results tables.
# Every step skips work whose output already exists, so an interrupted run continues.
#
#   scripts/experiment.sh                 (hours on 2 cores; outputs under runs/, not in git)
#   DND_EXP_SMOKE=1 scripts/experiment.sh (seconds: the tiny golden model, a few steps)
#
# Settings (environment): DND_EXP_MODEL, DND_EXP_OUT, COLLECT_STEPS, KEEP_LAST, TRAIN_STEPS,
# EVAL_LIMIT, SEQ_LEN, PRESET, SEED.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/dnd
[ -d "$data" ] || data="${DND_DATA:?set DND_DATA to the folder of the task files}"
if [ -n "${DND_EXP_SMOKE:-}" ]; then
  model=tests/fixtures/golden/tiny-llama
  out="${DND_EXP_OUT:-target/experiment-smoke}"
  : "${COLLECT_STEPS:=3}" "${KEEP_LAST:=2}" "${TRAIN_STEPS:=4}" "${EVAL_LIMIT:=4}" "${SEQ_LEN:=96}"
  init_args=(--base-model "$model" --chunk-width 32 --rank 8 --alpha 16 --num-prompts 4 --max-length 16)
else
  scripts/fetch-assets.sh encoder smollm2 >/dev/null
  model="${DND_EXP_MODEL:-.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
  out="${DND_EXP_OUT:-runs}"
  : "${COLLECT_STEPS:=100}" "${KEEP_LAST:=5}" "${TRAIN_STEPS:=2000}" "${EVAL_LIMIT:=200}" "${SEQ_LEN:=256}"
  init_args=(--preset "${PRESET:-smollm2-135m-small}")
fi
seed="${SEED:-0}"
scripts/mistralrs-patch.sh prepare
cargo build --features server --bin dnd
dnd=target/debug/dnd
tasks=(ARC-c ARC-e BoolQ OBQA PIQA WinoGrande)
held_out=(ARC-e OBQA BoolQ)
mkdir -p "$out/data" "$out/ckpt" "$out/gen" "$out/results"

# Train/test files: as shipped; PIQA ships one file (split 50/50, seeded); WinoGrande trains on
# its validation file.
for t in "${tasks[@]}"; do
  [ -f "$out/data/${t}_train.json" ] && continue
  case "$t" in
    PIQA) "$dnd" split --task "$data/PIQA_test.json" --seed "$seed" \
            --train-out "$out/data/PIQA_train.json" --test-out "$out/data/PIQA_test.json" ;;
    WinoGrande) cp "$data/WinoGrande_validation.json" "$out/data/WinoGrande_train.json"
                cp "$data/WinoGrande_test.json" "$out/data/WinoGrande_test.json" ;;
    *) cp "$data/${t}_train.json" "$data/${t}_test.json" "$out/data/" ;;
  esac
done

# 1. LoRA checkpoints per task (timed: the fine-tuning cost DnD replaces).
for t in "${tasks[@]}"; do
  last=$(printf "%s/ckpt/%s/step-%05d" "$out" "$t" "$COLLECT_STEPS")
  [ -d "$last" ] && continue
  start=$(date +%s.%N)
  "$dnd" collect --model "$model" --task "$out/data/${t}_train.json" --out "$out/ckpt/$t" \
    --steps "$COLLECT_STEPS" --keep-last "$KEEP_LAST" --seq-len "$SEQ_LEN" --seed "$seed"
  echo "$t $(echo "$(date +%s.%N) - $start" | bc)" >>"$out/results/collect-seconds.txt"
done

[ -f "$out/gen/init.safetensors" ] || "$dnd" init "${init_args[@]}" --seed "$seed" --out "$out/gen/init.safetensors"
task_args=()
for t in "${tasks[@]}"; do task_args+=(--task "$t=$out/data/${t}_train.json:$out/ckpt/$t"); done

# 2-3. Leave-one-task-out generators, generated adapters, and scores on the held-out task.
for h in "${held_out[@]}"; do
  gen="$out/gen/no-$h.safetensors"
  "$dnd" train --init "$out/gen/init.safetensors" "${task_args[@]}" --exclude "$h" \
    --steps "$TRAIN_STEPS" --lr 1e-4 --warmup $((TRAIN_STEPS / 20 + 1)) --seed "$seed" \
    --out "$gen" --loss-png "$out/results/loss-no-$h.png" --cache-dir "$out/enc-cache" --resume
  [ -d "$out/dnd-$h" ] || "$dnd" generate --checkpoint "$gen" --prompts "$out/data/${h}_test.json" \
    --seed "$seed" --out "$out/dnd-$h"
  adapters=()
  for t in "${tasks[@]}"; do
    [ "$t" = "$h" ] && continue
    adapters+=(--adapter "lora-$t=$(printf "%s/ckpt/%s/step-%05d" "$out" "$t" "$COLLECT_STEPS")")
  done
  [ -f "$out/results/$h.md" ] || "$dnd" eval --model "$model" --task "$out/data/${h}_test.json" \
    --limit "$EVAL_LIMIT" --seed "$seed" "${adapters[@]}" --adapter "dnd=$out/dnd-$h" \
    --out-md "$out/results/$h.md" --out-png "$out/results/$h.png"
done

# 4. The shipped generator: all six tasks.
"$dnd" train --init "$out/gen/init.safetensors" "${task_args[@]}" --steps "$TRAIN_STEPS" --lr 1e-4 \
  --warmup $((TRAIN_STEPS / 20 + 1)) --seed "$seed" --out "$out/gen/all-six.safetensors" \
  --loss-png "$out/results/loss-all-six.png" --cache-dir "$out/enc-cache" --resume
cat "$out"/results/*.md
echo "results in $out/results; the all-task generator is $out/gen/all-six.safetensors"
