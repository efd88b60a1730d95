#!/usr/bin/env python3
"""Adapter-affinity routing across replicas, measured behind a real load balancer (nginx).

Starts REPLICAS `mistralrs-server --adapter-provider dnd` processes on loopback and one nginx
in front of them with two listeners: one hashing on the `x-dnd-key` header (consistent
hashing, so a condition's requests reach the replica that holds its adapter) and one
round-robin. Three phases send REQUESTS chat requests each over SETS prompt sets (system
prompts; greedy, a few tokens), every phase with prompt sets of its own so caches do not carry
over:

  round-robin   the plain balancer: each replica generates each condition it meets
  affinity      hashed on x-dnd-key: each condition is generated once
  failover      hashed, and the replica holding the most of the phase's conditions is killed
                (SIGKILL) once half the requests are answered; its conditions move to the
                others, which regenerate them

and checks what must hold whatever the timing: every request answered (200, through nginx's
retry on a dead upstream), every answer served by an adapter (never the base model), the same
adapter key for all requests of a condition whichever replica answered (keys are content
hashes of generator, model and prompts), the server's routing key equal to the one computed
here, and in the affinity phase one generation per condition, each resident on exactly the
replica that answered it according to that replica's `dnd:lora_requests_info` metric.

Prints a table (hit rate with its 95% Wilson interval, throughput, latency) and writes the
figures as JSON (--out-json). Loopback only; every loop is bounded in count and time.

  scripts/affinity.py --server target/debug/mistralrs-server \\
      --generator generators/smollm2-135m-skills.safetensors \\
      -- gguf -m .assets/smollm2 -f SmolLM2-135M-Instruct.Q4_1.gguf
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from skill_summary import wilson  # noqa: E402

HINT = "x-dnd-key"


def route_key(prompts):
    """The server's routing key of a condition (README "Routing across replicas")."""
    norm = sorted(p.replace("\r\n", "\n").strip() for p in prompts)
    return hashlib.sha256(b"".join(p.encode() + b"\0" for p in norm)).hexdigest()[:32]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, headers=None, timeout=120):
    """(status, headers, parsed JSON or text) of one request; never raises on HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers)
    except OSError as e:
        # No answer at all (refused, reset, timed out): status 0, the error as the body.
        return 0, {}, str(e)
    try:
        return status, {k.lower(): v for k, v in hdrs.items()}, json.loads(raw)
    except ValueError:
        return status, {k.lower(): v for k, v in hdrs.items()}, raw.decode(errors="replace")


class Replica:
    def __init__(self, i, args, workdir):
        self.i = i
        log = open(os.path.join(workdir, f"replica{i}.log"), "w")
        cmd = [args.server, "--port", "0", "--cpu", "--max-seqs", "16", "--prefix-cache-n", "0",
               "--adapter-provider", "dnd", "--dnd-generator", args.generator,
               "--dnd-cache-entries", "256", *args.server_arg, *args.model]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        self.url = None
        deadline = time.time() + args.start_timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.match(r"listening on (http://\S+)", line.strip())
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.proc.kill()
            sys.exit(f"replica {i} did not start (see {workdir}/replica{i}.log)")
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.addr = self.url.removeprefix("http://")

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def resident(self):
        """The routing keys this replica's metrics list as resident (running) adapters."""
        status, _, text = http(self.url + "/metrics", timeout=30)
        assert status == 200, f"replica {self.i} /metrics: {status}"
        m = re.search(r'dnd:lora_requests_info\{[^}]*running_lora_adapters="([^"]*)"', text)
        assert m, f"replica {self.i} /metrics has no dnd:lora_requests_info"
        return set(filter(None, m.group(1).split(",")))


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log {dir}/access.log;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  # Requests without a routing key spread at random instead of piling onto one replica.
  map $http_x_dnd_key $dnd_route {{ "" $request_id; default $http_x_dnd_key; }}
  upstream affinity {{
    hash $dnd_route consistent;
{servers}
  }}
  upstream roundrobin {{
{servers}
  }}
  # A dead replica: the request goes to the next one on the ring (chat requests are POSTs,
  # hence non_idempotent); a replica that failed once is skipped for fail_timeout.
  proxy_next_upstream error timeout http_502 http_503 non_idempotent;
  proxy_next_upstream_tries 3;
  proxy_read_timeout 300s;
  proxy_http_version 1.1;
  proxy_buffering off;
  add_header x-upstream $upstream_addr always;
  server {{ listen 127.0.0.1:{hashed}; location / {{ proxy_pass http://affinity; }} }}
  server {{ listen 127.0.0.1:{rr}; location / {{ proxy_pass http://roundrobin; }} }}
}}
"""


class Nginx:
    def __init__(self, nginx, replicas, workdir):
        self.dir = os.path.join(workdir, "nginx")
        for d in ("", "body", "proxy"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        self.hashed, self.rr = free_port(), free_port()
        servers = "\n".join(f"    server {r.addr} max_fails=1 fail_timeout=30s;" for r in replicas)
        conf = NGINX_CONF.format(
            user="user root;\n" if os.geteuid() == 0 else "", dir=self.dir, servers=servers,
            hashed=self.hashed, rr=self.rr)
        path = os.path.join(self.dir, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen([nginx, "-p", self.dir, "-c", path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            if all(http(f"http://127.0.0.1:{p}/health", timeout=5)[0] == 200 for p in (self.hashed, self.rr)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        sys.exit(f"nginx did not start: {open(os.path.join(self.dir, 'error.log')).read()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Is ice cold?", "Say one word."]


def conditions(phase, n):
    return [f"Task {phase}-{i}: answer every question in {i + 2} words, politely." for i in range(n)]


def run_phase(name, port, sets, args, replicas, kill=None):
    """Sends args.requests requests round-robin over `sets`; returns per-request records."""
    base = f"http://127.0.0.1:{port}"
    jobs = [(i, sets[i % len(sets)], QUESTIONS[(i // len(sets)) % len(QUESTIONS)]) for i in range(args.requests)]
    records, done, killed = [], [0], []
    lock = threading.Lock()

    def one(job):
        i, system, question = job
        body = {"model": "default", "temperature": 0, "max_tokens": args.max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
        headers = {HINT: route_key([system])} if name != "round-robin" else {}
        t0 = time.time()
        status, hdrs, resp = http(base + "/v1/chat/completions", body, headers, timeout=args.request_timeout)
        rec = {"i": i, "system": system, "question": question, "status": status, "seconds": time.time() - t0,
               "upstream": hdrs.get("x-upstream", ""), "route_key": hdrs.get("x-dnd-route-key"),
               "expected_route_key": route_key([system])}
        if status == 200:
            rec.update(adapter=resp["dnd"]["adapter"], source=resp["dnd"]["source"],
                       answer=resp["choices"][0]["message"]["content"])
        else:
            rec["error"] = resp
        with lock:
            records.append(rec)
            done[0] += 1
            if kill is not None and not killed and done[0] >= args.requests // 2:
                victim = kill(records)
                killed.append(victim)
        return rec

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, jobs))
    wall = time.time() - t0
    return {"phase": name, "records": sorted(records, key=lambda r: r["i"]), "wall_seconds": wall,
            "killed": killed[0] if killed else None}


def check(result, replicas, expect_single_generation):
    """The invariants; returns a list of violations (empty: all hold)."""
    bad = []
    recs = result["records"]
    by_set = {}
    for r in recs:
        if r["status"] != 200:
            bad.append(f"{result['phase']}: request {r['i']} got {r['status']}: {r.get('error')}")
            continue
        if r["source"] in ("base", "abstained"):
            bad.append(f"{result['phase']}: request {r['i']} answered by the base model")
        if r["route_key"] != r["expected_route_key"]:
            bad.append(f"{result['phase']}: request {r['i']} routing key {r['route_key']} != {r['expected_route_key']}")
        by_set.setdefault(r["system"], []).append(r)
    keys = {}
    for system, rs in by_set.items():
        ks = {r["adapter"] for r in rs}
        if len(ks) != 1:
            bad.append(f"{result['phase']}: condition {system!r} served by {len(ks)} adapters {ks}")
        keys[system] = next(iter(ks))
    if len(set(keys.values())) != len(keys):
        bad.append(f"{result['phase']}: two conditions share an adapter key")
    if expect_single_generation:
        for system, rs in by_set.items():
            gens = sum(r["source"] == "generated" for r in rs)
            ups = {r["upstream"] for r in rs}
            if gens != 1 or len(ups) != 1:
                bad.append(f"{result['phase']}: condition {system!r} generated {gens}x on {sorted(ups)}")
                continue
            holders = [rep.i for rep in replicas if rep.alive() and route_key([system]) in rep.resident()]
            owner = [rep.i for rep in replicas if rep.addr == next(iter(ups))]
            if holders != owner:
                bad.append(f"{result['phase']}: condition {system!r} resident on {holders}, answered by {owner}")
    return bad


def summary(result):
    recs = [r for r in result["records"] if r["status"] == 200]
    n = len(result["records"])
    gens = sum(r["source"] == "generated" for r in recs)
    hits = len(recs) - gens
    lo, hi = wilson(hits, n)
    lat = sorted(r["seconds"] for r in recs) or [float("nan")]
    by_set = {}
    for r in recs:
        by_set.setdefault((r["system"], r["question"]), set()).add(r["answer"])
    agree = sum(len(a) == 1 for a in by_set.values()) / max(1, len(by_set))
    return {"phase": result["phase"], "requests": n, "answered": len(recs), "generations": gens,
            "hit_rate": hits / n if n else 0.0, "hit_rate_ci95": [lo, hi],
            "requests_per_second": n / result["wall_seconds"],
            "latency_p50_s": lat[len(lat) // 2], "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            # nginx lists every upstream it tried ("a, b" after a retry): the last one answered.
            "replicas_used": len({r["upstream"].split(",")[-1].strip() for r in recs}),
            "retried_by_balancer": sum("," in r["upstream"] for r in recs),
            "identical_greedy_answers": agree, "killed_replica": result["killed"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True, help="the mistralrs-server binary")
    ap.add_argument("--generator", required=True)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--sets", type=int, default=8, help="prompt sets (conditions) per phase")
    ap.add_argument("--requests", type=int, default=48, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server option (repeatable)")
    ap.add_argument("--out-json")
    ap.add_argument("model", nargs=argparse.REMAINDER, help="-- then the server's model subcommand")
    args = ap.parse_args()
    args.model = [a for a in args.model if a != "--"] if args.model[:1] == ["--"] else args.model
    if not args.model:
        ap.error("give the model subcommand after --")
    if args.replicas < 2 or args.sets < 1 or args.requests < 2 * args.sets:
        ap.error("need at least 2 replicas, 1 set and 2 requests per set")
    if not os.path.exists(args.nginx):
        sys.exit(f"nginx not found at {args.nginx} (apt-get install nginx)")
    workdir = tempfile.mkdtemp(prefix="dnd-affinity-")
    replicas, nginx = [], None
    try:
        replicas = [Replica(i, args, workdir) for i in range(args.replicas)]
        nginx = Nginx(args.nginx, replicas, workdir)
        results = [run_phase("round-robin", nginx.rr, conditions("rr", args.sets), args, replicas)]
        results.append(run_phase("affinity", nginx.hashed, conditions("aff", args.sets), args, replicas))
        violations = check(results[0], replicas, False) + check(results[1], replicas, True)

        def kill(records):
            # The replica that answered most of this phase's conditions so far.
            counts = {}
            for r in records:
                counts[r["upstream"]] = counts.get(r["upstream"], 0) + 1
            victim = max(replicas, key=lambda rep: counts.get(rep.addr, 0))
            victim.stop(signal.SIGKILL)
            return victim.i

        results.append(run_phase("failover", nginx.hashed, conditions("fail", args.sets), args, replicas, kill))
        violations += check(results[2], replicas, False)
        rows = [summary(r) for r in results]
        fmt = "| {phase} | {requests} | {generations} | {hr} | {requests_per_second:.2f} | {latency_p50_s:.2f} | {latency_p95_s:.2f} | {replicas_used} | {retried_by_balancer} | {agree} |"
        print(f"{args.replicas} replicas, {args.sets} conditions and {args.requests} requests per phase, "
              f"{args.concurrency} concurrent, {args.max_tokens} tokens each")
        print("| phase | requests | generations | cache hit rate (95% CI) | requests/s | p50 s | p95 s | replicas answering | retried by nginx | identical greedy answers |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for s in rows:
            hr = f"{100 * s['hit_rate']:.1f}% ({100 * s['hit_rate_ci95'][0]:.1f}-{100 * s['hit_rate_ci95'][1]:.1f})"
            print(fmt.format(hr=hr, agree=f"{100 * s['identical_greedy_answers']:.0f}%", **s))
        print(f"failover: replica {rows[2]['killed_replica']} killed after {args.requests // 2} answers")
        if args.out_json:
            with open(args.out_json, "w") as f:
                json.dump({"summary": rows, "violations": violations,
                           "records": {r["phase"]: r["records"] for r in results}}, f, indent=1)
        for v in violations:
            print("VIOLATION:", v)
        print(f"{len(violations) == 0 and 'all invariants hold' or f'{len(violations)} violations'}")
        return 1 if violations else 0
    finally:
        if nginx:
            nginx.stop()
        for r in replicas:
            r.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
