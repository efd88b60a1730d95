#!/usr/bin/env bash
# Does DnD transfer skill? Generators trained on the skill tasks of `dnd tasks`, scored on the
# tasks' test splits with adapters generated from the two conditions the server uses: the
# request's system prompt (the test split's paraphrase, never trained on) and 16 unlabeled test
# prompts. Each generator is trained twice over: the paper's recipe (`mse`: MSE to each task's
# own LoRA from scripts/learnability.sh), then fine-tuned through the base model's answer loss
# on the tasks' examples (`sft`, `dnd train --objective sft`).
# Every step is skipped when its output exists, so an interrupted run continues.
#
#   scripts/skill.sh [smollm2|qwen05]
#
# Generators (HOLDOUTS, space-separated; default: all of them):
#   all            trained on every task; every task scored (unseen prompts of training tasks)
#   family:NAME    the family's tasks left out and scored (leave-one-family-out)
#   task:NAME      one task left out and scored (leave-one-task-out within its family)
# Environment: LIMIT (test examples per score, sampled with SEED; 100), TRAIN_STEPS (MSE, 200),
# TRAIN_LR (1e-3), SFT_STEPS (300), SFT_LR (1e-4), SYSTEM_SHARE (0.5), EVAL_MSE (score the MSE
# generators too: 1 for every holdout; default only for `all`), VARIANTS (the generators scored,
# overriding that: e.g. "sft"), COLLECT_STEPS (40, passed to learnability.sh as STEPS), OUT
# (runs/skill/MODEL), LEARN (runs/learnability/MODEL), DND (the dnd binary), SEED (0).
# Writes OUT/summary.md and OUT/summary.json (scripts/skill_summary.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-smollm2}"
case "$which" in
  smollm2) model="$root/.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; preset=smollm2-135m-small ;;
  qwen05) model="$root/.assets/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
          preset=qwen25-05b-common-sense ;;
  *) echo "unknown model '$which' (smollm2, qwen05)" >&2; exit 2 ;;
esac
LIMIT="${LIMIT:-100}" TRAIN_STEPS="${TRAIN_STEPS:-200}" TRAIN_LR="${TRAIN_LR:-1e-3}"
SFT_STEPS="${SFT_STEPS:-300}" SFT_LR="${SFT_LR:-1e-4}"
SYSTEM_SHARE="${SYSTEM_SHARE:-0.5}" COLLECT_STEPS="${COLLECT_STEPS:-40}" SEED="${SEED:-0}"
out="${OUT:-$root/runs/skill/$which}"
learn="${LEARN:-$root/runs/learnability/$which}"
dnd="${DND:-$root/target/debug/dnd}"
if [ -z "${DND:-}" ]; then
  (cd "$root" && cargo build --bin dnd --quiet)
fi
"$root/scripts/fetch-assets.sh" encoder >/dev/null

# 1. Data, each task's own LoRA, and the base / own-LoRA rows (skipped where done).
STEPS="$COLLECT_STEPS" OUT="$learn" DND="$dnd" "$root/scripts/learnability.sh" "$which" >/dev/null
data="$learn/data"
all_tasks=$(python3 -c 'import json,sys; print(" ".join(t["name"] for t in json.load(open(sys.argv[1]))))' "$data/tasks.json")
family_of() { python3 -c 'import json,sys; print(" ".join(t["name"] for t in json.load(open(sys.argv[1])) if t["family"] == sys.argv[2]))' "$data/tasks.json" "$1"; }
HOLDOUTS="${HOLDOUTS:-all $(python3 -c 'import json,sys; print(" ".join(sorted({"family:" + t["family"] for t in json.load(open(sys.argv[1]))})))' "$data/tasks.json") task:sentiment_good_bad task:extract_color task:successor task:first_letters}"

mkdir -p "$out/gen" "$out/adapters" "$out/results"
[ -f "$out/gen/init.safetensors" ] || "$dnd" init --preset "$preset" --seed "$SEED" --out "$out/gen/init.safetensors"
task_args=() sft_args=()
for t in $all_tasks; do
  task_args+=(--task "$t=$data/${t}_train.json:$(printf "%s/ckpt/%s" "$learn" "$t")")
  sft_args+=(--task "$t=$data/${t}_train.json")
done

for h in $HOLDOUTS; do
  case "$h" in
    all) excluded=""; scored="$all_tasks" ;;
    family:*) excluded="$(family_of "${h#family:}")"; scored="$excluded" ;;
    task:*) excluded="${h#task:}"; scored="$excluded" ;;
    *) echo "unknown holdout '$h' (all, family:NAME, task:NAME)" >&2; exit 2 ;;
  esac
  [ -n "$scored" ] || { echo "holdout '$h' names no task" >&2; exit 2; }
  name="${h/:/-}"
  excl=()
  for t in $excluded; do excl+=(--exclude "$t"); done
  if [ ! -f "$out/gen/$name-mse.done" ]; then
    "$dnd" train --init "$out/gen/init.safetensors" "${task_args[@]}" "${excl[@]}" \
      --steps "$TRAIN_STEPS" --lr "$TRAIN_LR" --warmup $((TRAIN_STEPS / 20 + 1)) --seed "$SEED" \
      --mean-offset --system-share "$SYSTEM_SHARE" --out "$out/gen/$name-mse.safetensors" \
      --save-every 50 --loss-png "$out/results/loss-$name-mse.png" --cache-dir "$out/enc-cache" --resume
    touch "$out/gen/$name-mse.done"
  fi
  if [ ! -f "$out/gen/$name-sft.done" ]; then
    "$dnd" train --objective sft --model "$model" --init "$out/gen/$name-mse.safetensors" \
      "${sft_args[@]}" "${excl[@]}" --steps "$SFT_STEPS" --lr "$SFT_LR" \
      --warmup $((SFT_STEPS / 20 + 1)) --seed "$SEED" --system-share "$SYSTEM_SHARE" \
      --out "$out/gen/$name-sft.safetensors" --save-every 25 --loss-png "$out/results/loss-$name-sft.png" \
      --cache-dir "$out/enc-cache" --resume
    touch "$out/gen/$name-sft.done"
  fi
  variants=sft
  if [ "$h" = all ] || [ -n "${EVAL_MSE:-}" ]; then variants="mse sft"; fi
  variants="${VARIANTS:-$variants}"
  for v in $variants; do
    gen="$out/gen/$name-$v.safetensors"
    for t in $scored; do
      res="$out/results/$name-$v/$t.json"
      [ -f "$res" ] && continue
      mkdir -p "$out/results/$name-$v" "$out/adapters/$name-$v"
      # The system-prompt condition: the test split's paraphrase, alone (the server fills it to N).
      python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["system"])' \
        "$data/${t}_test.json" >"$out/adapters/$name-$v/$t.system.txt"
      start=$(date +%s.%N)
      "$dnd" generate --checkpoint "$gen" --prompts "$out/adapters/$name-$v/$t.system.txt" \
        --out "$out/adapters/$name-$v/$t-system"
      mid=$(date +%s.%N)
      "$dnd" generate --checkpoint "$gen" --prompts "$data/${t}_test.json" --sample 16 --seed "$SEED" \
        --out "$out/adapters/$name-$v/$t-examples"
      end=$(date +%s.%N)
      echo "$name-$v $t $(echo "$mid - $start" | bc) $(echo "$end - $mid" | bc)" >>"$out/results/generate-seconds.txt"
      "$dnd" eval --model "$model" --task "$data/${t}_test.json" --limit "$LIMIT" --seed "$SEED" \
        --max-new-tokens 16 --no-base \
        --adapter "dnd-system=$out/adapters/$name-$v/$t-system" \
        --adapter "dnd-examples=$out/adapters/$name-$v/$t-examples" \
        --out-md "$out/results/$name-$v/$t.md" --out-json "$res.tmp" \
        --out-replies "$out/results/$name-$v/$t.replies.json"
      mv "$res.tmp" "$res"
      # Adapters are 10 MB each and regenerate from the generator in a second.
      rm -rf "$out/adapters/$name-$v/$t-system" "$out/adapters/$name-$v/$t-examples"
    done
  done
done
# Control: does the condition matter? For the generator trained on every task, each task is also
# answered with the adapter made from another family's task's test system prompt (task i gets
# task i+5's, the tasks listed family by family, five each): if that scores as well as the
# task's own condition, the adapters teach something general (answer briefly, follow the
# instruction in the context) rather than the task the condition names.
if [[ " $HOLDOUTS " == *" all "* ]]; then
  read -r -a listed <<<"$all_tasks"
  for i in "${!listed[@]}"; do
    t="${listed[$i]}" o="${listed[$(((i + 5) % ${#listed[@]}))]}"
    res="$out/results/all-sft/$t.control.json"
    [ -f "$res" ] && continue
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["system"])' \
      "$data/${o}_test.json" >"$out/adapters/all-sft/$t.other-system.txt"
    "$dnd" generate --checkpoint "$out/gen/all-sft.safetensors" \
      --prompts "$out/adapters/all-sft/$t.other-system.txt" --out "$out/adapters/all-sft/$t-other"
    "$dnd" eval --model "$model" --task "$data/${t}_test.json" --limit "$LIMIT" --seed "$SEED" \
      --max-new-tokens 16 --no-base --adapter "dnd-other-task=$out/adapters/all-sft/$t-other" \
      --out-md "$out/results/all-sft/$t.control.md" --out-json "$res.tmp" \
      --out-replies "$out/results/all-sft/$t.control.replies.json"
    mv "$res.tmp" "$res"
    echo "$o" >"$out/results/all-sft/$t.control.condition"
    rm -rf "$out/adapters/all-sft/$t-other"
  done
fi
python3 "$root/scripts/skill_summary.py" --learn "$learn" --skill "$out" --holdouts $HOLDOUTS
