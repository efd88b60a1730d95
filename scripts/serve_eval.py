#!/usr/bin/env python3
"""Skill tasks scored through the serving path: mistralrs-server with the DnD adapter provider
(the code users run), concurrent chat requests whose adapters differ within a batch, each reply
scored by `dnd score` (the verifier of `dnd eval`).

Per task, LIMIT test examples (seeded sample) are asked under three conditions, all requests of
all tasks interleaved over CONCURRENCY client threads:
  base      {"dnd": {"base": true}}: the base model
  system    no dnd field: the server's default policy conditions the adapter on the request's
            system prompt (the test split's paraphrase, never trained on)
  examples  {"dnd": {"prompts": [16 test prompts]}}: an adapter from unlabeled example prompts
A reply whose adapter source contradicts its condition (a base answer where an adapter was asked
for) is an error, not a score. Writes OUT/TASK.replies.json and OUT/TASK.json (`dnd score`), and
OUT/summary.md.

  scripts/serve_eval.py --generator G [--tasks a b ...] [--limit 50] [--out DIR]
                        [--server-arg=--dnd-dtype --server-arg=bf16 ...]
Needs a built target/debug/mistralrs-server (cargo build --features server) and dnd
(cargo build --manifest-path crates/Cargo.toml --bin dnd).
"""
import argparse
import collections
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(args):
    log = open(os.path.join(args.out, "server.log"), "w")
    cmd = [args.server, "--port", "0", "--cpu", "--max-seqs", str(args.concurrency),
           "--adapter-provider", "dnd", "--dnd-generator", args.generator,
           "--dnd-encoder", args.encoder, "--dnd-cache-entries", "64", "--dnd-cache-size", "2GiB",
           *args.server_arg,
           "gguf", "-m", os.path.dirname(args.model), "-f", os.path.basename(args.model)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        if line.startswith("listening on "):
            return proc, line.split()[-1].strip()
    raise SystemExit(f"the server did not start (log: {log.name})")


def chat(url, system, prompt, dnd, max_tokens):
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    if dnd is not None:
        body["dnd"] = dnd
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        v = json.load(r)
    return v["choices"][0]["message"]["content"], v.get("dnd", {})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", required=True)
    ap.add_argument("--data", default=os.path.join(ROOT, "runs/learnability/smollm2/data"))
    ap.add_argument("--model", default=os.path.join(ROOT, ".assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--encoder", default=os.path.join(ROOT, ".assets/all-MiniLM-L6-v2"))
    ap.add_argument("--server", default=os.path.join(ROOT, "target/debug/mistralrs-server"))
    ap.add_argument("--dnd", default=os.path.join(ROOT, "target/debug/dnd"))
    ap.add_argument("--tasks", nargs="*")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs/serve-eval"))
    ap.add_argument("--server-arg", action="append", default=[],
                    help="an extra server option (repeatable; --server-arg=--dnd-dtype --server-arg=bf16)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    names = args.tasks or [t["name"] for t in json.load(open(os.path.join(args.data, "tasks.json")))]
    jobs, picked, prompts16 = [], {}, {}
    for t in names:
        test = json.load(open(os.path.join(args.data, f"{t}_test.json")))
        rng = random.Random(f"{args.seed}:{t}")
        idx = sorted(rng.sample(range(len(test)), min(args.limit, len(test))))
        picked[t] = idx
        prompts16[t] = [test[i]["prompt"] for i in sorted(rng.sample(range(len(test)), 16))]
        for j, i in enumerate(idx):
            ex = test[i]
            for cond, dnd in (("base", {"base": True}), ("system", None),
                              ("examples", {"prompts": prompts16[t]})):
                jobs.append((t, j, cond, ex["system"], ex["prompt"], dnd))
    # Interleave tasks so that batches mix adapters.
    jobs.sort(key=lambda j: (j[1], j[0], j[2]))
    proc, url = start_server(args)
    print(f"server at {url}; {len(jobs)} requests over {len(names)} tasks", file=sys.stderr)
    replies = {t: {c: [None] * len(picked[t]) for c in ("base", "system", "examples")} for t in names}
    sources = collections.Counter()
    generation_ms = []
    errors = []
    start = time.time()
    try:
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            futs = {pool.submit(chat, url, s, p, d, args.max_tokens): (t, j, c) for t, j, c, s, p, d in jobs}
            for n, f in enumerate(concurrent.futures.as_completed(futs), 1):
                t, j, c = futs[f]
                text, info = f.result()
                src = info.get("source")
                sources[(c, src)] += 1
                if src == "generated" and info.get("generation_ms") is not None:
                    generation_ms.append(info["generation_ms"])
                if (c == "base") != (src == "base"):
                    errors.append(f"{t} #{j} {c}: adapter source {src!r}")
                replies[t][c][j] = text
                if n % 200 == 0:
                    print(f"{n}/{len(jobs)} replies, {time.time() - start:.0f} s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait()
    if errors:
        raise SystemExit("replies under the wrong adapter:\n" + "\n".join(errors[:20]))
    elapsed = time.time() - start
    rows = ["| task | base | DnD, system prompt (default policy) | DnD, 16 example prompts | constant answer | system in label space |",
            "|---|---|---|---|---|---|"]
    pct = lambda r: f'{100 * r["accuracy"]:.0f}% ({100 * r["ci95"][0]:.0f}-{100 * r["ci95"][1]:.0f})'
    for t in names:
        rf = os.path.join(args.out, f"{t}.replies.json")
        json.dump({"examples": picked[t], "replies": replies[t]}, open(rf, "w"), indent=1)
        sf = os.path.join(args.out, f"{t}.json")
        subprocess.run([args.dnd, "score", "--task", os.path.join(args.data, f"{t}_test.json"),
                        "--replies", rf, "--out-json", sf], check=True, stdout=subprocess.DEVNULL)
        s = json.load(open(sf))
        r = {x["label"]: x for x in s["rows"]}
        space = r["system"].get("label_space")
        rows.append(f'| {t} | {pct(r["base"])} | {pct(r["system"])} | {pct(r["examples"])} | '
                    f'{pct(s["constant"])} `{s["constant"]["label"]}` | {"-" if space is None else f"{100 * space:.0f}%"} |')
    src = ", ".join(f"{c}: {s} x{n}" for (c, s), n in sorted(sources.items(), key=str))
    rows += ["", f"{len(jobs)} requests in {elapsed:.0f} s ({len(jobs) / elapsed:.1f}/s, {args.concurrency} concurrent); "
             f"adapter sources: {src}."]
    if generation_ms:
        rows.append(f"Generation on a miss (the generating request's wait): median "
                    f"{statistics.median(generation_ms):.0f} ms over {len(generation_ms)} misses.")
    open(os.path.join(args.out, "summary.md"), "w").write("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
