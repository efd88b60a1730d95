#!/usr/bin/env bash
# The recipe of the shipped skills generator (generators/smollm2-135m-skills.safetensors since
# 2026-12-07, second version): the 24-task skills generator shipped before it (scripts/skill.sh
# with TASK_COUNT=24, README "Skill results"), taken from git, continued through the base
# model's answer loss on all 48 skill tasks of `dnd tasks --more-wordings` (eight system-prompt
# wordings per task) with condition modulation (`--modulate`): 300 steps, then 600 more from
# that checkpoint (lr 3e-4, half the steps conditioned on a system prompt, seed 0), then 150
# steps of four tasks each, their gradients averaged (`--tasks-per-step 4`, warmup 8, seed 1);
# then anchored for abstention on the 48 tasks and stored in f16. Every step is skipped when
# its output exists, so an interrupted run continues. About two hours of training on 2 cores.
# Scores: docs/results/skill-smollm2-48-w8-tasks-per-step.md. Its third stage, run from the
# first two stages' outputs, reproduced the shipped file byte for byte (session 22, same
# machine). The file shipped before it (two wordings, no third stage;
# docs/results/skill-smollm2-48-modulated.md) came from this script as of commit e8b923e
# (`git show e8b923e:scripts/skills48.sh`).
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
# The first 48 tasks: tasks added later leave their data unchanged but must not join the run.
[ -f "$out/data/tasks.json" ] || "$dnd" tasks --out "$out/data" --seed 0 --count 48 --more-wordings
# A folder left by the recipe before the third stage (two wordings) must not be continued.
wordings=$(python3 -c 'import json,sys; print(len({e["system"] for e in json.load(open(sys.argv[1]))}))' \
  "$out/data/upper_case_train.json")
if [ "$wordings" -lt 8 ]; then
  echo "$out/data has $wordings system wordings per task, not eight: an older recipe's run (OUT=another folder)" >&2
  exit 1
fi
# The 24-task generator as it was shipped (the commit that shipped it).
init="$out/gen/skills24.safetensors"
if [ ! -f "$init" ]; then
  git show 36ef50c:generators/smollm2-135m-skills.safetensors > "$init.tmp"
  mv "$init.tmp" "$init"
fi
targs=()
for t in $(python3 -c "import json,sys; print(' '.join(t['name'] for t in json.load(open(sys.argv[1]))))" "$out/data/tasks.json"); do
  targs+=(--task "$t=$out/data/${t}_train.json")
done
# Stage 1: 300 steps (warmup 16), stage 2: 600 more (warmup 31), stage 3: 150 steps of four
# tasks (warmup 8, seed 1), each resumable.
for stage in mod300 mod900 k4x150; do
  case "$stage" in
    mod300) from="$init" steps=(--steps 300 --warmup 16 --seed 0) ;;
    mod900) from="$out/gen/mod300.safetensors" steps=(--steps 600 --warmup 31 --seed 0) ;;
    k4x150) from="$out/gen/mod900.safetensors"
      steps=(--steps 150 --tasks-per-step 4 --warmup 8 --seed 1) ;;
  esac
  [ -f "$out/gen/$stage.done" ] && continue
  "$dnd" train --objective sft --model "$model" --init "$from" "${targs[@]}" --modulate \
    "${steps[@]}" --lr 3e-4 --system-share 0.5 \
    --out "$out/gen/$stage.safetensors" --save-every 25 --loss-png "$out/gen/loss-$stage.png" \
    --cache-dir "$out/enc-cache" --resume
  touch "$out/gen/$stage.done"
done
# Written under a temporary name first, so that an interrupted write is not taken as done.
anchored="$out/gen/k4x150-anchored.safetensors"
if [ ! -f "$anchored" ]; then
  "$dnd" anchors --checkpoint "$out/gen/k4x150.safetensors" "${targs[@]}" --out "$anchored.tmp"
  mv "$anchored.tmp" "$anchored"
fi
if [ ! -f "$out/skills.safetensors" ]; then
  "$dnd" cast --checkpoint "$anchored" --dtype f16 --out "$out/skills.safetensors.tmp"
  mv "$out/skills.safetensors.tmp" "$out/skills.safetensors"
fi
echo "$out/skills.safetensors: the shipped file's recipe (compare: cmp $out/skills.safetensors generators/smollm2-135m-skills.safetensors)"
