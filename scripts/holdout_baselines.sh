#!/usr/bin/env bash
# The LoRA baselines of a leave-one-out row of scripts/skill.sh: on each held-out task, the
# mean of the training tasks' own LoRAs (`dnd mean`: their mean update, exactly) and the best
# single other-task LoRA (each training task's own LoRA tried on SCAN_LIMIT test examples, the
# best one then scored like the rest: an oracle choice no user could make). With the task's own
# LoRA, the base model and the constant answer from scripts/learnability.sh, these frame what
# DnD recovers on a task it never saw. Resumable: every score is skipped when it exists.
#
#   scripts/holdout_baselines.sh HOLDOUT [smollm2|qwen05]     HOLDOUT: family:NAME, task:NAME, tasks:A,B,... or all
#
# With `all` (every task trained on), only the mean of all the tasks' LoRAs is scored, on every
# task: the static multi-task adapter a generator must beat to claim it specialises.
#
# Environment: LIMIT (100), SCAN_LIMIT (30), SEED (0), OUT, LEARN, DND as in scripts/skill.sh.
# Writes OUT/results/HOLDOUT-baselines/TASK.{mean,best-other}.json (+ .md, .replies.json) and
# TASK.best-other.condition (the chosen task) and TASK.scan.json (every candidate's accuracy).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
holdout="${1:?usage: $0 family:NAME|task:NAME|tasks:A,B,... [smollm2|qwen05]}"
which="${2:-smollm2}"
# shellcheck source=scripts/lib/skill-common.sh
. "$root/scripts/lib/skill-common.sh"
SCAN_LIMIT="${SCAN_LIMIT:-30}"
all_tasks="$(task_names)"
scored="$(held_out "$holdout")"
[ -n "$scored" ] || { echo "holdout '$holdout' names no task" >&2; exit 2; }
training=()
for t in $all_tasks; do
  [ "$holdout" = all ] || [[ " $scored " != *" $t "* ]] && training+=("$t")
done
name="${holdout/:/-}-baselines"
res="$out/results/$name" ads="$out/adapters/$name"
mkdir -p "$res" "$ads"
own() { echo "$learn/ckpt/$1/step-$(printf %05d "$COLLECT_STEPS")"; }

if [ ! -d "$ads/mean" ]; then
  args=()
  for t in "${training[@]}"; do args+=(--adapter "$(own "$t")"); done
  "$dnd" mean "${args[@]}" --out "$ads/mean.tmp"
  mv "$ads/mean.tmp" "$ads/mean"
fi
for t in $scored; do
  [ -f "$res/$t.mean.json" ] || score "$t" "$res/$t.mean.json" "mean-lora=$ads/mean"
  [ "$holdout" = all ] && continue
  if [ ! -f "$res/$t.scan.json" ]; then
    args=()
    for o in "${training[@]}"; do args+=("$o=$(own "$o")"); done
    LIMIT="$SCAN_LIMIT" score "$t" "$res/$t.scan.json" "${args[@]}"
  fi
  if [ ! -f "$res/$t.best-other.json" ]; then
    best=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["rows"]; print(max(r, key=lambda x: x["accuracy"])["label"])' "$res/$t.scan.json")
    score "$t" "$res/$t.best-other.json" "best-other-lora=$(own "$best")"
    echo "$best" >"$res/$t.best-other.condition"
  fi
done
