#!/usr/bin/env bash
# Builds the patched mistral.rs crates from pristine crates.io sources plus patches/.
#
#   scripts/mistralrs-patch.sh prepare   pristine + patches -> target/mistralrs-patched/<crate>-<ver>
#   scripts/mistralrs-patch.sh check     do all patches still apply to the pristine sources?
#   scripts/mistralrs-patch.sh regen     rewrite patches/<crate>-<ver>/dnd.patch from the edited
#                                        working copy under target/mistralrs-patched/
#
# patches/<crate>-<version>/*.patch are unified diffs (paths a/src/..., b/src/...), applied in
# name order with `patch -p1` and no fuzz: a hunk that does not apply exactly stops everything
# with the patch's name. Bug fixes to mistral.rs that stand on their own (each one a patch that
# upstream could take alone) are numbered files, NNNN-what-it-fixes.patch, applied first;
# dnd.patch, the adapter-provider feature, comes last and is the one `regen` rewrites. Run it
# from outside any cargo workspace step that needs the patched path (Cargo refuses a [patch]
# whose folder does not exist yet).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
patches="$root/patches"
work="$root/target/mistralrs-patched"
pristine="$root/target/mistralrs-pristine"

crates() { # crate folders under patches/, e.g. mistralrs-core-0.8.1
  find "$patches" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort
}

split() { # mistralrs-core-0.8.1 -> "mistralrs-core 0.8.1"
  local v="${1##*-}"
  echo "${1%-"$v"} $v"
}

fetch_pristine() { # crate-version: unpack the crates.io source under $pristine (read-only)
  local cv="$1" name ver
  read -r name ver < <(split "$cv")
  [ -d "$pristine/$cv" ] && return
  local m="$pristine/.fetch-$cv"
  mkdir -p "$m/src"
  printf '[package]\nname = "fetch-%s"\nversion = "0.0.0"\nedition = "2021"\n[workspace]\n[dependencies]\n%s = "=%s"\n' \
    "$name" "$name" "$ver" >"$m/Cargo.toml"
  : >"$m/src/lib.rs"
  # Its own workspace: the project's [patch] must not be consulted here.
  (cd "$m" && cargo fetch --quiet)
  local src
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$cv" | head -1)"
  [ -d "$src" ] || { echo "pristine $cv not found after cargo fetch" >&2; exit 1; }
  mkdir -p "$pristine"
  cp -a "$src" "$pristine/$cv"
  chmod -R a-w "$pristine/$cv"
  rm -rf "$m"
}

stamp_of() { # the patch set of a crate, concatenated (build.rs compares it too)
  cat "$patches/$1"/*.patch 2>/dev/null || true
}

apply_all() { # crate-version target-dir [--dry-run]
  local cv="$1" dir="$2" p
  for p in "$patches/$cv"/*.patch; do
    [ -e "$p" ] || continue
    if ! (cd "$dir" && patch -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch ${3:-} <"$p" >/tmp/dnd-patch.log 2>&1); then
      echo "error: ${p#"$root"/} does not apply to pristine $cv:" >&2
      sed 's/^/  /' /tmp/dnd-patch.log >&2
      exit 1
    fi
  done
}

# mistralrs-core's build script declares `rerun-if-changed=.git/HEAD` (for its version string);
# in a crate folder without one, cargo would rebuild mistral.rs on every invocation. A fixed
# HEAD file keeps the build cached.
stable_git_head() {
  mkdir -p "$1/.git"
  [ -f "$1/.git/HEAD" ] || echo "0000000000000000000000000000000000000000" >"$1/.git/HEAD"
}

prepare() {
  local cv
  for cv in $(crates); do
    fetch_pristine "$cv"
    if [ -f "$work/$cv/.dnd-stamp" ] && stamp_of "$cv" | cmp -s - "$work/$cv/.dnd-stamp"; then
      stable_git_head "$work/$cv"
      continue # up to date (and any local edits in progress are kept)
    fi
    rm -rf "$work/$cv"
    mkdir -p "$work"
    cp -a "$pristine/$cv" "$work/$cv"
    chmod -R u+w "$work/$cv"
    apply_all "$cv" "$work/$cv"
    stamp_of "$cv" >"$work/$cv/.dnd-stamp"
    stable_git_head "$work/$cv"
    echo "patched $cv" >&2
  done
}

check() {
  local cv tmp
  for cv in $(crates); do
    fetch_pristine "$cv"
    tmp="$(mktemp -d)"
    cp -a "$pristine/$cv" "$tmp/$cv"
    chmod -R u+w "$tmp/$cv"
    apply_all "$cv" "$tmp/$cv"
    rm -rf "$tmp"
    echo "ok: patches/$cv applies cleanly" >&2
  done
}

regen() {
  local cv
  for cv in $(crates); do
    [ -d "$work/$cv" ] || { echo "no working copy of $cv: run prepare first" >&2; exit 1; }
    fetch_pristine "$cv"
    local out="$patches/$cv/dnd.patch" base p
    # dnd.patch is the difference between the working copy and pristine plus the numbered
    # bug-fix patches; those stay as they are (edit one by hand, or fold it into dnd.patch by
    # deleting it before regen).
    base="$(mktemp -d)"
    cp -a "$pristine/$cv" "$base/a"
    chmod -R u+w "$base/a"
    for p in "$patches/$cv"/*.patch; do
      [ -e "$p" ] && [ "$(basename "$p")" != dnd.patch ] || continue
      (cd "$base/a" && patch -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch <"$p" >/dev/null)
    done
    (cd "$base" && diff -ruN --exclude=.dnd-stamp --exclude=.git --exclude=target \
      a "$work/$cv" |
      sed -E -e '/^diff -ruN /d' -e 's#^(---|\+\+\+) ([^\t]*)\t.*#\1 \2#' \
        -e "s#^\+\+\+ $work/$cv/#+++ b/#") >"$out.new" || true
    rm -rf "$base"
    mv "$out.new" "$out"
    stamp_of "$cv" >"$work/$cv/.dnd-stamp"
    echo "wrote ${out#"$root"/} ($(grep -c '^@@' "$out") hunks)" >&2
  done
}

case "${1:-}" in
  prepare) prepare ;;
  check) check ;;
  regen) regen ;;
  *) echo "usage: $0 prepare|check|regen" >&2; exit 2 ;;
esac
