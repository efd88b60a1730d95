#!/usr/bin/env bash
# The recipe of the shipped skills generator (generators/smollm2-135m-skills.safetensors since
# 2026-12-07): the 24-task skills generator shipped before it (scripts/skill.sh with
# TASK_COUNT=24, README "Skill results"), taken from git, continued through the base model's
# answer loss on all 48 skill tasks of `dnd tasks` with condition modulation (`--modulate`):
# 300 steps, then 600 more from that checkpoint (lr 3e-4, half the steps conditioned on a system
# prompt, seed 0), then anchored for abstention on the 48 tasks and stored in f16. Every step is
# skipped when its output exists, so an interrupted run continues. About 75 minutes of training
# on 2 cores. Scores: docs/results/skill-smollm2-48-modulated.md.
#
#   scripts/skills48.sh        (outputs under runs/skills48/; OUT overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/skills48}"
model=.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-assets.sh encoder smollm2 >/dev/null
cargo build --manifest-path crates/Cargo.toml --bin dnd
dnd=target/debug/dnd
mkdir -p "$out/gen"
[ -f "$out/data/tasks.json" ] || "$dnd" tasks --out "$out/data" --seed 0
# The 24-task generator as it was shipped (the commit that shipped it).
init="$out/gen/skills24.safetensors"
[ -f "$init" ] || git show 36ef50c:generators/smollm2-135m-skills.safetensors > "$init"
targs=()
for t in $(python3 -c "import json,sys; print(' '.join(t['name'] for t in json.load(open(sys.argv[1]))))" "$out/data/tasks.json"); do
  targs+=(--task "$t=$out/data/${t}_train.json")
done
# Stage 1: 300 steps (warmup 16), stage 2: 600 more (warmup 31), each resumable.
for stage in "mod300 $init 300 16" "mod900 $out/gen/mod300.safetensors 600 31"; do
  set -- $stage
  [ -f "$out/gen/$1.done" ] && continue
  "$dnd" train --objective sft --model "$model" --init "$2" "${targs[@]}" --modulate \
    --steps "$3" --lr 3e-4 --warmup "$4" --seed 0 --system-share 0.5 \
    --out "$out/gen/$1.safetensors" --save-every 25 --loss-png "$out/gen/loss-$1.png" \
    --cache-dir "$out/enc-cache" --resume
  touch "$out/gen/$1.done"
done
[ -f "$out/gen/mod900-anchored.safetensors" ] || "$dnd" anchors \
  --checkpoint "$out/gen/mod900.safetensors" "${targs[@]}" --out "$out/gen/mod900-anchored.safetensors"
[ -f "$out/skills.safetensors" ] || "$dnd" cast --checkpoint "$out/gen/mod900-anchored.safetensors" \
  --dtype f16 --out "$out/skills.safetensors"
echo "$out/skills.safetensors: the shipped file's recipe (compare: cmp $out/skills.safetensors generators/smollm2-135m-skills.safetensors)"
