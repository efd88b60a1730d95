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
#   tasks:A,B,...  several tasks left out together and scored (e.g. one of each family: every
#                  family keeps its other tasks, so one generator measures within-family transfer)
# Environment: LIMIT (test examples per score, sampled with SEED; 100), TRAIN_STEPS (MSE, 200),
# TRAIN_LR (1e-3), SFT_STEPS (600), SFT_LR (3e-4), SYSTEM_SHARE (0.5), EVAL_MSE (score the MSE
# generators too: 1 for every holdout; default only for `all`), VARIANTS (the generators scored,
# overriding that: e.g. "sft"; "sft-bare" also trains the SFT variant whose loss sees no system
# prompt on a BARE_SHARE of its examples, 0.5), COLLECT_STEPS (40, passed to learnability.sh as STEPS), OUT
# (runs/skill/MODEL), LEARN (runs/learnability/MODEL), LEARN_TASKS (the tasks whose own LoRA and
# learnability rows step 1 prepares; default all; `none` skips step 1), CONTROL (0 skips the
# control scores), DND (the dnd binary), SEED (0), ALL_INIT (a
# generator the `all` SFT stage starts from instead of its MSE stage, which is then skipped: how
# tasks are added to a trained generator without collecting every task's LoRA; the shipped
# skills generator grew from 20 to 24 tasks so, README "Skill results"; from 24 to 48,
# scripts/skills48.sh).
# Writes OUT/summary.md and OUT/summary.json (scripts/skill_summary.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-smollm2}"
# shellcheck source=scripts/lib/skill-common.sh
. "$root/scripts/lib/skill-common.sh"
TRAIN_STEPS="${TRAIN_STEPS:-200}" TRAIN_LR="${TRAIN_LR:-1e-3}"
SFT_STEPS="${SFT_STEPS:-600}" SFT_LR="${SFT_LR:-3e-4}"
SYSTEM_SHARE="${SYSTEM_SHARE:-0.5}" BARE_SHARE="${BARE_SHARE:-0.5}"
"$root/scripts/fetch-assets.sh" encoder >/dev/null

# 1. Data, each task's own LoRA, and the base / own-LoRA rows (skipped where done).
if [ "${LEARN_TASKS:-}" != none ]; then
  STEPS="$COLLECT_STEPS" OUT="$learn" DND="$dnd" TASKS="${LEARN_TASKS:-}" \
    "$root/scripts/learnability.sh" "$which" >/dev/null
fi
all_tasks="$(task_names)"
HOLDOUTS="${HOLDOUTS:-all $(tasks_json 'print(" ".join(sorted({"family:" + x["family"] for x in t})))') task:sentiment_good_bad task:extract_color task:successor task:first_letters}"

mkdir -p "$out/gen" "$out/adapters" "$out/results"
# adapter GEN DIR PROMPT_ARGS...: the adapter the generator makes from the prompts, into DIR.
adapter() {
  local gen="$1" dir="$2"
  shift 2
  "$dnd" generate --checkpoint "$gen" "$@" --out "$dir"
}
[ -f "$out/gen/init.safetensors" ] || "$dnd" init --preset "$preset" --seed "$SEED" --out "$out/gen/init.safetensors"
task_args=() sft_args=()
for t in $all_tasks; do
  task_args+=(--task "$t=$data/${t}_train.json:$(printf "%s/ckpt/%s" "$learn" "$t")")
  sft_args+=(--task "$t=$data/${t}_train.json")
done

for h in $HOLDOUTS; do
  scored="$(held_out "$h")"
  excluded="$scored"
  [ "$h" != all ] || excluded=""
  [ -n "$scored" ] || { echo "holdout '$h' names no task" >&2; exit 2; }
  name="${h/:/-}"
  excl=()
  for t in $excluded; do excl+=(--exclude "$t"); done
  init="$out/gen/$name-mse.safetensors"
  if [ "$h" = all ] && [ -n "${ALL_INIT:-}" ]; then
    init="$ALL_INIT"
  elif [ ! -f "$out/gen/$name-mse.done" ]; then
    "$dnd" train --init "$out/gen/init.safetensors" "${task_args[@]}" "${excl[@]}" \
      --steps "$TRAIN_STEPS" --lr "$TRAIN_LR" --warmup $((TRAIN_STEPS / 20 + 1)) --seed "$SEED" \
      --mean-offset --system-share "$SYSTEM_SHARE" --out "$out/gen/$name-mse.safetensors" \
      --save-every 50 --loss-png "$out/results/loss-$name-mse.png" --cache-dir "$out/enc-cache" --resume
    touch "$out/gen/$name-mse.done"
  fi
  # SFT generators: `sft` conditions on each example's own prompt context; `sft-bare` (when
  # VARIANTS asks for it) also, on a BARE_SHARE of its examples, drops the system prompt from
  # the context the loss is computed in, so that only the adapter can tell the task.
  for v in sft ${VARIANTS:-}; do
    case "$v" in sft) bare=0 ;; sft-bare) bare="$BARE_SHARE" ;; *) continue ;; esac
    [ -f "$out/gen/$name-$v.done" ] && continue
    "$dnd" train --objective sft --model "$model" --init "$init" \
      "${sft_args[@]}" "${excl[@]}" --steps "$SFT_STEPS" --lr "$SFT_LR" \
      --warmup $((SFT_STEPS / 20 + 1)) --seed "$SEED" --system-share "$SYSTEM_SHARE" \
      --bare-share "$bare" --out "$out/gen/$name-$v.safetensors" --save-every 25 \
      --loss-png "$out/results/loss-$name-$v.png" --cache-dir "$out/enc-cache" --resume
    touch "$out/gen/$name-$v.done"
  done
  variants=sft
  if { [ "$h" = all ] && [ -z "${ALL_INIT:-}" ]; } || [ -n "${EVAL_MSE:-}" ]; then variants="mse sft"; fi
  variants="${VARIANTS:-$variants}"
  for v in $variants; do
    gen="$out/gen/$name-$v.safetensors"
    for t in $scored; do
      res="$out/results/$name-$v/$t.json"
      [ -f "$res" ] && continue
      mkdir -p "$out/results/$name-$v"
      score_conditions "$gen" "$t" "$res" "$out/adapters/$name-$v" "$name-$v"
    done
  done
  # On held-out tasks, the LoRA baselines DnD is compared with (mean and best other-task LoRA).
  if [ "$h" != all ]; then
    OUT="$out" LEARN="$learn" DND="$dnd" LIMIT="$LIMIT" SEED="$SEED" COLLECT_STEPS="$COLLECT_STEPS" \
      "$root/scripts/holdout_baselines.sh" "$h" "$which"
  fi
done
# Control: does the condition matter? For the generator trained on every task, each task is also
# answered with the adapter made from another family's task's test system prompt (task i gets
# task i+5's, the tasks listed family by family, five each): if that scores as well as the
# task's own condition, the adapters teach something general (answer briefly, follow the
# instruction in the context) rather than the task the condition names.
if [[ " $HOLDOUTS " == *" all "* ]] && [ "${CONTROL:-1}" != 0 ]; then
  read -r -a listed <<<"$all_tasks"
  for v in sft ${VARIANTS:-}; do
    [ "$v" = sft-bare ] || [ "$v" = sft ] || continue
    [ -f "$out/gen/all-$v.safetensors" ] || continue
    for i in "${!listed[@]}"; do
      t="${listed[$i]}" o="${listed[$(((i + 5) % ${#listed[@]}))]}"
      res="$out/results/all-$v/$t.control.json"
      [ -f "$res" ] && continue
      mkdir -p "$out/results/all-$v" "$out/adapters/all-$v"
      test_system "$o" >"$out/adapters/all-$v/$t.other-system.txt"
      adapter "$out/gen/all-$v.safetensors" "$out/adapters/all-$v/$t-other" \
        --prompts "$out/adapters/all-$v/$t.other-system.txt"
      score "$t" "$res" "dnd-other-task=$out/adapters/all-$v/$t-other"
      echo "$o" >"$out/results/all-$v/$t.control.condition"
      rm -rf "$out/adapters/all-$v/$t-other"
    done
  done
fi
# Each variant once (VARIANTS may repeat sft).
python3 "$root/scripts/skill_summary.py" --learn "$learn" --skill "$out" --holdouts $HOLDOUTS \
  --variants $(printf '%s\n' mse sft ${VARIANTS:-} | awk '!seen[$0]++')
