#!/usr/bin/env bash
# What semantic reuse does to accuracy: each skill task's test split answered with the adapter
# of the cached condition nearest to its unseen system-prompt paraphrase (as the server would
# serve it under --dnd-reuse-distance), next to the adapter of the paraphrase itself.
#
#   cargo bench --manifest-path crates/Cargo.toml --bench reuse -- --out runs/reuse/nearest.json
#   scripts/reuse_eval.sh [smollm2]
#
# Environment: NEAREST (runs/reuse/nearest.json), MAX_DISTANCE (0.4: queries farther are not
# scored), GEN (the generator; default the skills generator of scripts/skill.sh), SKILL (its
# results, for the own-paraphrase rows: runs/skill/MODEL-long), OUT (runs/reuse/MODEL), LIMIT,
# SEED, DND as scripts/skill.sh. Each task's result is kept, so an interrupted run continues.
# Writes OUT/summary.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
which="${1:-smollm2}"
# shellcheck source=scripts/lib/skill-common.sh
. "$root/scripts/lib/skill-common.sh"
nearest="${NEAREST:-$root/runs/reuse/nearest.json}"
skill="${SKILL:-$root/runs/skill/$which-long}"
gen="${GEN:-$skill/gen/all-sft.safetensors}"
res_dir="${OUT:-$root/runs/reuse/$which}"
max="${MAX_DISTANCE:-0.4}"
[ -f "$nearest" ] || { echo "$nearest missing: cargo bench --manifest-path crates/Cargo.toml --bench reuse -- --out $nearest" >&2; exit 2; }
mkdir -p "$res_dir"
# system TASK K: training paraphrase K (1 or 2) of TASK, from tasks.json.
system() { tasks_json 'print(next(x for x in t if x["name"] == sys.argv[2])["systems"][int(sys.argv[3]) - 1])' "$1" "$2"; }
python3 - "$nearest" "$max" <<'PY' >"$res_dir/queue.txt"
import json, sys
for q in json.load(open(sys.argv[1])):
    if q["distance"] <= float(sys.argv[2]):
        print(q["task"], q["nearest_task"], q["nearest_paraphrase"], f'{q["distance"]:.3f}')
PY
while read -r t nt k d; do
  res="$res_dir/$t.json"
  [ -f "$res" ] && continue
  system "$nt" "$k" >"$res_dir/$t.reused.txt"
  "$dnd" generate --checkpoint "$gen" --prompts "$res_dir/$t.reused.txt" --out "$res_dir/$t-reused" >/dev/null
  score "$t" "$res" "dnd-reused=$res_dir/$t-reused"
  rm -rf "$res_dir/$t-reused"
done <"$res_dir/queue.txt"
python3 - "$res_dir" "$skill/results/all-sft" <<'PY' | tee "$res_dir/summary.md"
import json, os, sys
res, own_dir = sys.argv[1:3]
rows = [l.split() for l in open(os.path.join(res, "queue.txt"))]
print("| task | reused condition | distance | own paraphrase's adapter | reused adapter | change |")
print("|---|---|---|---|---|---|")
scored = []
for t, nt, k, d in rows:
    r = json.load(open(os.path.join(res, t + ".json")))["rows"][0]
    o = next(x for x in json.load(open(os.path.join(own_dir, t + ".json")))["rows"] if x["label"] == "dnd-system")
    scored.append((float(d), o["accuracy"], r["accuracy"]))
    print(f"| {t} | {nt} #{k} | {d} | {o['accuracy']:.0%} | {r['accuracy']:.0%} | {100 * (r['accuracy'] - o['accuracy']):+.0f} |")
print("\n| reuse distance | tasks reused | own paraphrase's adapter | reused adapter |")
print("|---|---|---|---|")
for limit in (0.2, 0.25, 0.3, 0.35, 0.4):
    s = [x for x in scored if x[0] <= limit]
    if s:
        print(f"| {limit} | {len(s)} | {sum(x[1] for x in s) / len(s):.1%} | {sum(x[2] for x in s) / len(s):.1%} |")
PY
