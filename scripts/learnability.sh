#!/usr/bin/env bash
# Which skill tasks can a base model learn? For each task of `dnd tasks`: the base model and
# its own LoRA after $STEPS steps, scored on the task's test split (an unseen system-prompt
# paraphrase, prompts never trained on), with 95% intervals and the best constant answer.
# Resumable: every step is skipped when its output exists (delete a file to redo it).
#
#   scripts/learnability.sh [smollm2|qwen05]
#
# Environment: STEPS (60), BATCH (4), LR (1e-3), LIMIT (test examples, 200), TASKS
# (space-separated names; default all), TASK_COUNT (the first N tasks of `dnd tasks` when the
# data folder is first written; default all 48: the shipped skills generator used 24), SUITE
# (`dnd tasks --suite`: skills, params or compose; default skills), OUT (runs/learnability/MODEL),
# DND (the dnd binary).
# Writes OUT/summary.md: task, family, base and LoRA accuracy with intervals, the base model's
# lenient accuracy (the answer anywhere in its reply), the constant answer, the gain.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-smollm2}"
case "$which" in
  smollm2) model="$root/.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
  qwen05) model="$root/.assets/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" ;;
  *) echo "unknown model '$which' (smollm2, qwen05)" >&2; exit 2 ;;
esac
"$root/scripts/fetch-assets.sh" "$which" >/dev/null
STEPS="${STEPS:-60}" BATCH="${BATCH:-4}" LR="${LR:-1e-3}" LIMIT="${LIMIT:-200}"
out="${OUT:-$root/runs/learnability/$which}"
dnd="${DND:-$root/target/debug/dnd}"
if [ -z "${DND:-}" ]; then
  (cd "$root" && cargo build --manifest-path crates/Cargo.toml --bin dnd --quiet)
fi
mkdir -p "$out/data" "$out/ckpt" "$out/results"
[ -f "$out/data/tasks.json" ] || "$dnd" tasks --out "$out/data" --seed 0 --suite "${SUITE:-skills}" \
  ${TASK_COUNT:+--count "$TASK_COUNT"}
tasks="${TASKS:-$(python3 -c 'import json,sys; print(" ".join(t["name"] for t in json.load(open(sys.argv[1]))))' "$out/data/tasks.json")}"
for t in $tasks; do
  last=$(printf "%s/ckpt/%s/step-%05d" "$out" "$t" "$STEPS")
  if [ ! -f "$last/adapter_config.json" ]; then
    "$dnd" collect --model "$model" --task "$out/data/${t}_train.json" --out "$out/ckpt/$t" \
      --steps "$STEPS" --batch "$BATCH" --lr "$LR" --keep-last 1 --seq-len 256 --seed 0 --resume
  fi
  res="$out/results/$t.json"
  if [ ! -f "$res" ]; then
    "$dnd" eval --model "$model" --task "$out/data/${t}_test.json" --limit "$LIMIT" --max-new-tokens 16 \
      --adapter "lora=$last" --out-md "$out/results/$t.md" --out-json "$res.tmp" \
      --out-replies "$out/results/$t.replies.json"
    mv "$res.tmp" "$res"
  fi
done
python3 - "$out" $tasks <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
fam = {t["name"]: t["family"] for t in json.load(open(f"{out}/data/tasks.json"))}
pct = lambda r: f'{100*r["accuracy"]:.1f}% ({100*r["ci95"][0]:.1f}-{100*r["ci95"][1]:.1f})'
lines = ["| task | family | base | base, lenient | own LoRA | constant answer | gain (points) |", "|---|---|---|---|---|---|---|"]
for t in names:
    s = json.load(open(f"{out}/results/{t}.json"))
    rows = {r["label"]: r for r in s["rows"]}
    b, l, c = rows["base"], rows["lora"], s["constant"]
    lines.append(f'| {t} | {fam[t]} | {pct(b)} | {100*b["lenient_accuracy"]:.1f}% | {pct(l)} | {pct(c)} `{c["label"]}` | {100*(l["accuracy"]-b["accuracy"]):+.1f} |')
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
