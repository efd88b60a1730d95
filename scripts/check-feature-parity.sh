#!/usr/bin/env bash
# Do crates/ and the server's workspace build their shared dependencies once?
#
#   scripts/check-feature-parity.sh
#
# The test command builds crates/ first, then the server's workspace, into one target folder.
# Cargo reuses a dependency's build only when everything that goes into it agrees: version,
# features, profile, and the same for each of its own dependencies. mistral.rs and axum turn on
# more features than crates/ needs, so crates/feature-parity turns them on in crates/ too. This
# script lists every dependency unit that crates/ builds and the server's workspace does not
# (by Cargo's own unit graph: `--unit-graph`, unstable, enabled here with RUSTC_BOOTSTRAP);
# each is printed with the feature sets the server's workspace builds that package with; after a
# dependency update, add the missing features to crates/feature-parity/Cargo.toml.
# Needs the patched mistral.rs (`scripts/mistralrs-patch.sh prepare`). Exit status 1 when
# any dependency would be built twice.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
graph() { RUSTC_BOOTSTRAP=1 cargo test "$@" --no-run --unit-graph -Z unstable-options; }
graph --manifest-path crates/Cargo.toml --workspace >"$tmp/crates.json"
graph --features server >"$tmp/server.json"
python3 - "$tmp/crates.json" "$tmp/server.json" <<'PY'
import hashlib, json, sys

def identities(path):
    """Each unit's identity: its own settings and, recursively, its dependencies' identities
    (what Cargo's metadata hash covers), keyed to a short label."""
    units = json.load(open(path))["units"]
    memo = {}

    def ident(i):
        if i not in memo:
            u = units[i]
            profile = {k: v for k, v in u["profile"].items() if k != "name"}
            key = [u["pkg_id"], u["target"]["name"], u["target"]["kind"], u["mode"],
                   u["features"], u.get("platform"), profile,
                   sorted(ident(d["index"]) for d in u["dependencies"])]
            memo[i] = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return memo[i]

    return {ident(i): u for i, u in enumerate(units)}

crates, server = identities(sys.argv[1]), identities(sys.argv[2])
# Only registry dependencies: crates/'s own members are built by their workspace alone.
def features(u):
    return ",".join(u["features"]) or "none"

twice = sorted(
    "%s %s (%s): features %s here; the server's workspace: %s" % (
        u["pkg_id"].split("#")[-1], u["target"]["name"], u["mode"], features(u),
        " | ".join(sorted({features(v) for v in server.values()
                           if (v["pkg_id"], v["target"]["name"], v["mode"])
                           == (u["pkg_id"], u["target"]["name"], u["mode"])})) or "not built")
    for k, u in crates.items() if k not in server and u["pkg_id"].startswith("registry+"))
for line in twice:
    print("built twice:", line)
deps = sum(u["pkg_id"].startswith("registry+") for u in crates.values())
print("%d of %d dependency units of crates/ are built differently by the server's workspace"
      % (len(twice), deps))
# No registry units at all means the graph was not what this script expects (source replacement?).
sys.exit(1 if twice or deps == 0 else 0)
PY
