#!/usr/bin/env bash
# Does the generator read a value from an unseen instruction? On the parametric suite
# (`dnd tasks --suite params`: add_K, times_K, word_K, wrap_NAME, label_A_B), a generator is
# SFT-trained from the shipped skills generator on every task but a few held-out values, then
# scored on those: DnD from the held-out task's test system prompt and from 16 of its test
# prompts; the same without the parametric training (the shipped generator: what the skill
# tasks alone give); the adapter made from a neighbouring value's instruction (add_7 answered
# with add_8's adapter: if that scores as well, the generator did not read the value); and the
# held-out task's own LoRA (learnability, 40 steps), the reference for the recovered share.
# Every step is skipped when its output exists, so an interrupted run continues.
#
#   scripts/params_holdout.sh [smollm2|qwen05]
#
# Environment: HELD (held-out tasks, with the neighbour each is compared with, as TASK:NEIGHBOUR),
# SFT_STEPS (600), SFT_LR (3e-4), LIMIT (test examples per score, 100), SEED (0), INIT (the
# generator SFT starts from; the shipped skills generator), OUT (runs/params/MODEL), LEARN
# (runs/learnability/MODEL-params), DND. Writes OUT/summary.md (scripts/skill_summary.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-smollm2}"
OUT="${OUT:-$root/runs/params/$which}" LEARN="${LEARN:-$root/runs/learnability/$which-params}"
# shellcheck source=scripts/lib/skill-common.sh
. "$root/scripts/lib/skill-common.sh"
SFT_STEPS="${SFT_STEPS:-600}" SFT_LR="${SFT_LR:-3e-4}"
if [ -z "${INIT:-}" ]; then
  case "$which" in
    smollm2) INIT="$root/generators/smollm2-135m-skills.safetensors" ;;
    *) echo "no shipped skills generator for $which: set INIT" >&2; exit 2 ;;
  esac
fi
HELD="${HELD:-add_7:add_8 add_23:add_22 times_6:times_7 word_3:word_4 wrap_angle:wrap_braces wrap_tildes:wrap_hashes label_win_lose:label_pass_fail label_hot_cold:label_light_dark}"
"$root/scripts/fetch-assets.sh" encoder >/dev/null

# 1. The suite's data, then the held-out tasks' own LoRAs and base / own-LoRA rows
#    (learnability.sh keeps data/ when it is there).
[ -f "$data/tasks.json" ] || "$dnd" tasks --suite params --out "$data" --seed "$SEED"
held=() neighbour=()
for pair in $HELD; do
  [[ "$pair" == *:* ]] || { echo "HELD entry '$pair' is not TASK:NEIGHBOUR" >&2; exit 2; }
  held+=("${pair%%:*}") neighbour+=("${pair#*:}")
done
held_csv="$(IFS=,; echo "${held[*]}")"
STEPS="$COLLECT_STEPS" OUT="$learn" DND="$dnd" TASKS="${held[*]}" "$root/scripts/learnability.sh" "$which" >/dev/null

# 2. The generator: SFT from INIT on every task but the held-out ones.
mkdir -p "$out/gen" "$out/results" "$out/adapters"
gen="$out/gen/params-sft.safetensors"
if [ ! -f "$out/gen/params-sft.done" ]; then
  args=()
  for t in $(task_names); do
    [[ " ${held[*]} " == *" $t "* ]] && continue
    args+=(--task "$t=$data/${t}_train.json")
  done
  "$dnd" train --objective sft --model "$model" --init "$INIT" "${args[@]}" --steps "$SFT_STEPS" \
    --lr "$SFT_LR" --warmup $((SFT_STEPS / 20 + 1)) --seed "$SEED" --system-share 0.5 \
    --out "$gen" --save-every 25 --loss-png "$out/results/loss-params-sft.png" \
    --cache-dir "$out/enc-cache" --resume
  touch "$out/gen/params-sft.done"
fi

# 3. Scores: the trained generator and INIT (tables `sft` and `init` of the summary), each from the
#    held-out test system prompt and from 16 test prompts; the neighbour's adapter as control.
for g in sft init; do
  case "$g" in sft) path="$gen" ;; init) path="$INIT" ;; esac
  results="$out/results/tasks-$held_csv-$g"
  mkdir -p "$results" "$out/adapters/$g"
  for i in "${!held[@]}"; do
    t="${held[$i]}" n="${neighbour[$i]}"
    res="$results/$t.json"
    if [ ! -f "$res" ]; then
      score_conditions "$path" "$t" "$res" "$out/adapters/$g"
    fi
    res="$results/$t.control.json"
    if [ "$g" = sft ] && [ ! -f "$res" ]; then
      test_system "$n" >"$out/adapters/$g/$t.other-system.txt"
      "$dnd" generate --checkpoint "$path" --prompts "$out/adapters/$g/$t.other-system.txt" --out "$out/adapters/$g/$t-other"
      # Before the score, whose JSON marks the step done (the summary reads both).
      echo "$n" >"$results/$t.control.condition"
      score "$t" "$res" "dnd-other-task=$out/adapters/$g/$t-other"
      rm -rf "$out/adapters/$g/$t-other"
    fi
  done
done
# Tables per generator (`tasks-HELD-sft`, `tasks-HELD-init`); the "another task" column holds
# the neighbour's adapter.
python3 "$root/scripts/skill_summary.py" --learn "$learn" --skill "$out" --holdouts "tasks:$held_csv" \
  --variants sft init
