#!/usr/bin/env bash
# The DnD experiment on SmolLM2-135M-Instruct: LoRA checkpoints for six tasks, leave-one-task-out
# generators for three held-out tasks, a generator trained on all six, and the results tables.
# Every step skips work whose output already exists, so an interrupted run continues.
#
#   scripts/experiment.sh                 (hours on 2 cores; outputs under runs/, not in git)
#   DND_EXP_SMOKE=1 scripts/experiment.sh (seconds: the tiny golden model, a few steps)
#
# Settings (environment): DND_EXP_MODEL, DND_EXP_OUT, COLLECT_STEPS, COLLECT_BATCH, KEEP_LAST,
# EARLY_STEP, TRAIN_STEPS, TRAIN_LR, EVAL_LIMIT, SEQ_LEN, PRESET, SEED. The defaults are the
# recorded run of README.md ("Results"), sized for two CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/dnd
[ -d "$data" ] || data="${DND_DATA:?set DND_DATA to the folder of the task files}"
if [ -n "${DND_EXP_SMOKE:-}" ]; then
  model=tests/fixtures/golden/tiny-llama
  out="${DND_EXP_OUT:-target/experiment-smoke}"
  : "${COLLECT_STEPS:=3}" "${KEEP_LAST:=2}" "${TRAIN_STEPS:=4}" "${EVAL_LIMIT:=4}" "${SEQ_LEN:=96}"
  : "${EARLY_STEP:=1}" "${COLLECT_BATCH:=4}" "${TRAIN_LR:=1e-3}"
  init_args=(--base-model "$model" --chunk-width 32 --rank 8 --alpha 16 --num-prompts 4 --max-length 16)
else
  scripts/fetch-assets.sh encoder smollm2 >/dev/null
  model="${DND_EXP_MODEL:-.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
  out="${DND_EXP_OUT:-runs}"
  : "${COLLECT_STEPS:=16}" "${KEEP_LAST:=6}" "${TRAIN_STEPS:=200}" "${EVAL_LIMIT:=30}" "${SEQ_LEN:=256}"
  : "${EARLY_STEP:=4}" "${COLLECT_BATCH:=4}" "${TRAIN_LR:=1e-3}"
  init_args=(--preset "${PRESET:-smollm2-135m-small}")
fi
seed="${SEED:-0}"
cargo build --manifest-path crates/Cargo.toml --bin dnd
mkdir -p "$out"
# The run uses its own copy of the binary, so rebuilding during a long run changes nothing.
cp target/debug/dnd "$out/dnd"
dnd="$out/dnd"
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
  rm -rf "$out/ckpt/$t"
  "$dnd" collect --model "$model" --task "$out/data/${t}_train.json" --out "$out/ckpt/$t" \
    --steps "$COLLECT_STEPS" --batch "$COLLECT_BATCH" --keep-last "$KEEP_LAST" \
    --save-at "$EARLY_STEP" --seq-len "$SEQ_LEN" --seed "$seed"
  echo "$t $(echo "$(date +%s.%N) - $start" | bc)" >>"$out/results/collect-seconds.txt"
done

[ -f "$out/gen/init.safetensors" ] || "$dnd" init "${init_args[@]}" --seed "$seed" --out "$out/gen/init.safetensors"
task_args=()
for t in "${tasks[@]}"; do task_args+=(--task "$t=$out/data/${t}_train.json:$out/ckpt/$t"); done

# 2-3. Leave-one-task-out generators, generated adapters, and scores on the held-out task.
for h in "${held_out[@]}"; do
  gen="$out/gen/no-$h.safetensors"
  "$dnd" train --init "$out/gen/init.safetensors" "${task_args[@]}" --exclude "$h" \
    --steps "$TRAIN_STEPS" --lr "$TRAIN_LR" --warmup $((TRAIN_STEPS / 20 + 1)) --seed "$seed" \
    --mean-offset --out "$gen" --loss-png "$out/results/loss-no-$h.png" --cache-dir "$out/enc-cache" --resume
  if [ ! -d "$out/dnd-$h" ]; then
    # Timed: the cost of an adapter for a new task, prompts to PEFT folder (model load included).
    start=$(date +%s.%N)
    "$dnd" generate --checkpoint "$gen" --prompts "$out/data/${h}_test.json" \
      --seed "$seed" --out "$out/dnd-$h"
    echo "$h $(echo "$(date +%s.%N) - $start" | bc)" >>"$out/results/generate-seconds.txt"
  fi
  adapters=()
  for t in "${tasks[@]}"; do
    [ "$t" = "$h" ] && continue
    adapters+=(--adapter "lora-$t=$(printf "%s/ckpt/%s/step-%05d" "$out" "$t" "$COLLECT_STEPS")")
  done
  # The held-out task's own fine-tuning, early and final: what DnD is compared with in time.
  own=(--adapter "own-step$EARLY_STEP=$(printf "%s/ckpt/%s/early/step-%05d" "$out" "$h" "$EARLY_STEP")"
       --adapter "own-step$COLLECT_STEPS=$(printf "%s/ckpt/%s/step-%05d" "$out" "$h" "$COLLECT_STEPS")")
  [ -f "$out/results/$h.md" ] || "$dnd" eval --model "$model" --task "$out/data/${h}_test.json" \
    --limit "$EVAL_LIMIT" --seed "$seed" "${adapters[@]}" --adapter "dnd=$out/dnd-$h" "${own[@]}" \
    --out-md "$out/results/$h.md" --out-png "$out/results/$h.png" \
    --out-replies "$out/results/$h-replies.json"
done

# 4. The shipped generator: all six tasks.
"$dnd" train --init "$out/gen/init.safetensors" "${task_args[@]}" --steps "$TRAIN_STEPS" --lr "$TRAIN_LR" \
  --warmup $((TRAIN_STEPS / 20 + 1)) --seed "$seed" --mean-offset --out "$out/gen/all-six.safetensors" \
  --loss-png "$out/results/loss-all-six.png" --cache-dir "$out/enc-cache" --resume
# 5. The summary: per held-out task, accuracy (strict / lenient) of the base model, the mean and
# best LoRA of the other tasks, the generated adapter and the task's own fine-tuning, and the
# time to generate an adapter against the time to fine-tune one to the generated one's accuracy.
summary="$out/results/summary.md"
{
  echo "| held-out task | base | other tasks' LoRAs, mean | best | DnD | own LoRA, step $EARLY_STEP | step $COLLECT_STEPS | DnD: generate | own fine-tuning to DnD's accuracy |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for h in "${held_out[@]}"; do
    gen_s=$(awk -v t="$h" '$1 == t {print $2}' "$out/results/generate-seconds.txt" | tail -1)
    tune_s=$(awk -v t="$h" '$1 == t {print $2}' "$out/results/collect-seconds.txt" | tail -1)
    awk -F'|' -v h="$h" -v gen="$gen_s" -v tune="$tune_s" -v early="$EARLY_STEP" -v steps="$COLLECT_STEPS" '
      function pct(x) { gsub(/[ %]/, "", x); return x + 0 }
      NR > 2 {
        label = $2; gsub(/ /, "", label); a = pct($3); l = pct($4)
        if (label == "base") { base = a; basel = l }
        else if (label ~ /^lora-/) { n++; sum += a; if (a > best) best = a }
        else if (label == "dnd") dnd = a
        else if (label == "own-step" early) e = a
        else if (label == "own-step" steps) f = a
      }
      END {
        per = tune / steps
        if (dnd <= base) reach = "- (DnD no better than the base model)"
        else if (e >= dnd) reach = sprintf("%d steps, %.0f s", early, early * per)
        else if (f >= dnd) reach = sprintf("%d steps, %.0f s", steps, tune)
        else reach = sprintf("not within %d steps (%.0f s)", steps, tune)
        printf "| %s | %.1f%% (lenient %.1f%%) | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f%% | %.1f s | %s |\n",
          h, base, basel, sum / n, best, dnd, e, f, gen, reach
      }' "$out/results/$h.md"
  done
} >"$summary"
cat "$out"/results/*.md
echo "results in $out/results; the all-task generator is $out/gen/all-six.safetensors"
