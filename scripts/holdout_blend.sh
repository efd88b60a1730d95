#!/usr/bin/env bash
# An exploration beside scripts/holdout_baselines.sh: on each held-out task of a leave-one-out
# generator, the adapter DnD makes from the task's system prompt averaged with the mean of the
# training tasks' LoRAs (`dnd mean` of the two: each update weighted 1/2, exact). Asks whether
# the generated adapter adds to what the static multi-task adapter already carries.
# Resumable: every score is skipped when it exists.
#
#   scripts/holdout_blend.sh HOLDOUT [smollm2|qwen05]    HOLDOUT: family:NAME, task:NAME or tasks:A,B,...
#
# Needs the generator (scripts/skill.sh) and the mean adapter (scripts/holdout_baselines.sh) of
# that holdout. Environment: TASKS (the held-out tasks scored; default all of them), LIMIT,
# SEED, OUT, LEARN, DND as in scripts/skill.sh. Writes OUT/results/HOLDOUT-blend/TASK.json
# (+ .md, .replies.json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
holdout="${1:?usage: $0 family:NAME|task:NAME|tasks:A,B,... [smollm2|qwen05]}"
which="${2:-smollm2}"
# shellcheck source=scripts/lib/skill-common.sh
. "$root/scripts/lib/skill-common.sh"
[ "$holdout" != all ] || { echo "HOLDOUT all holds nothing out" >&2; exit 2; }
scored="$(held_out "$holdout")"
[ -n "$scored" ] || { echo "holdout '$holdout' names no task" >&2; exit 2; }
name="${holdout/:/-}"
gen="$out/gen/$name-sft.safetensors" mean="$out/adapters/$name-baselines/mean"
[ -f "$gen" ] || { echo "$gen missing: run scripts/skill.sh with HOLDOUTS=$holdout" >&2; exit 2; }
[ -d "$mean" ] || { echo "$mean missing: run scripts/holdout_baselines.sh $holdout" >&2; exit 2; }
res="$out/results/$name-blend" ads="$out/adapters/$name-blend"
mkdir -p "$res" "$ads"
for t in ${TASKS:-$scored}; do
  [ -f "$res/$t.json" ] && continue
  test_system "$t" >"$ads/$t.system.txt"
  rm -rf "$ads/$t-dnd" "$ads/$t-blend"
  "$dnd" generate --checkpoint "$gen" --prompts "$ads/$t.system.txt" --out "$ads/$t-dnd"
  "$dnd" mean --adapter "$ads/$t-dnd" --adapter "$mean" --out "$ads/$t-blend"
  score "$t" "$res/$t.json" "dnd-and-mean=$ads/$t-blend"
  rm -rf "$ads/$t-dnd" "$ads/$t-blend"
done
