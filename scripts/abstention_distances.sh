#!/usr/bin/env bash
# The data the abstention threshold (`--dnd-abstain-distance`, README "Abstention") is chosen on:
# the distance of each task's unseen test system prompt and of a 16-prompt sample of its test
# prompts to the generator's nearest anchor, and of every ordinary chat prompt of
# tests/fixtures/general_chat.txt. Prints a TSV (kind, distance, nearest anchor, condition).
#
#   scripts/abstention_distances.sh GENERATOR TASK_DATA_DIR > distances.tsv
#   (e.g. generators/smollm2-135m-skills.safetensors runs/skills48/data; progress on stderr)
set -euo pipefail
cd "$(dirname "$0")/.."
gen="${1:?generator checkpoint (with anchors)}"
data="${2:?task data folder (dnd tasks --out)}"
cargo build -q --manifest-path crates/Cargo.toml --bin dnd
dnd=target/debug/dnd
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
names=$(python3 -c "import json,sys; print(' '.join(t['name'] for t in json.load(open(sys.argv[1]))))" "$data/tasks.json")
printf 'kind\tdistance\tnearest anchor\tcondition\n'
for t in $names; do
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["system"])' "$data/${t}_test.json" > "$tmp/sys.txt"
  "$dnd" distance --checkpoint "$gen" --prompts "$tmp/sys.txt" --each |
    sed 's/^/test system prompt\t/'
  "$dnd" distance --checkpoint "$gen" --prompts "$data/${t}_test.json" |
    sed "s/^/test 16-prompt set\t/; s/\t16 prompts\$/\t$t: 16 test prompts (seed 0)/"
done
"$dnd" distance --checkpoint "$gen" --prompts tests/fixtures/general_chat.txt --each |
  sed 's/^/ordinary chat\t/'
