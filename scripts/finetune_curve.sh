#!/usr/bin/env bash
# What fine-tuning costs to reach a score: each task's own LoRA (the recipe of
# scripts/learnability.sh: batch 4, lr 1e-3, seed 0) re-run with checkpoints after SAVE_AT steps,
# each scored on LIMIT test examples (the same seeded sample as scripts/skill.sh's scores), with
# the wall time of the fine-tuning run. scripts/skill_summary.py reads it to put "steps and
# seconds to match DnD" next to the time a generation takes. Resumable.
#
#   scripts/finetune_curve.sh [smollm2|qwen05] TASK...
#
# Environment: SAVE_AT (2,5,10,20), COLLECT_STEPS (40), LIMIT (100), OUT, LEARN, DND.
# Writes OUT/curve/TASK.json: {"steps": [...], "accuracy": [...], "n": LIMIT, "seconds": wall
# time of the whole fine-tuning run (model load included), "collect_steps": its steps}.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:?usage: $0 smollm2|qwen05 TASK...}"
shift
# shellcheck source=scripts/lib/skill-common.sh
. "$root/scripts/lib/skill-common.sh"
SAVE_AT="${SAVE_AT:-2,5,10,20}"
mkdir -p "$out/curve"
for t in "$@"; do
  res="$out/curve/$t.json"
  [ -f "$res" ] && continue
  ck="$out/curve/$t"
  rm -rf "$ck"
  start=$(date +%s.%N)
  "$dnd" collect --model "$model" --task "$data/${t}_train.json" --out "$ck" --steps "$COLLECT_STEPS" \
    --batch 4 --lr 1e-3 --keep-last 1 --seq-len 256 --seed 0 --save-at "$SAVE_AT"
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  args=()
  for s in ${SAVE_AT//,/ }; do args+=("step-$s=$ck/early/$(printf step-%05d "$s")"); done
  score "$t" "$out/curve/$t.eval.json" "${args[@]}"
  python3 - "$out/curve/$t.eval.json" "$secs" "$SAVE_AT" "$res" "$COLLECT_STEPS" <<'PY'
import json, sys
ev, secs, save_at, res, total = sys.argv[1:6]
rows = {r["label"]: r for r in json.load(open(ev))["rows"]}
steps = [int(s) for s in save_at.split(",")]
acc = [rows[f"step-{s}"]["accuracy"] for s in steps]
n = rows[f"step-{steps[0]}"]["n"]
json.dump({"steps": steps, "accuracy": acc, "n": n, "seconds": float(secs),
           "collect_steps": int(total)}, open(res, "w"))
PY
  rm -rf "$ck"
done
