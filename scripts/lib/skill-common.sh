# Shared by scripts/skill.sh, params_holdout.sh and holdout_baselines.sh (sourced, not run):
# the model of $which, the run folders, the task list, and the scoring helpers. Expects `root`
# and `which`.
case "$which" in
  smollm2) model="$root/.assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; preset=smollm2-135m-small ;;
  qwen05) model="$root/.assets/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
          preset=qwen25-05b-common-sense ;;
  *) echo "unknown model '$which' (smollm2, qwen05)" >&2; exit 2 ;;
esac
LIMIT="${LIMIT:-100}" COLLECT_STEPS="${COLLECT_STEPS:-40}" SEED="${SEED:-0}"
out="${OUT:-$root/runs/skill/$which}"
learn="${LEARN:-$root/runs/learnability/$which}"
dnd="${DND:-$root/target/debug/dnd}"
if [ -z "${DND:-}" ]; then
  (cd "$root" && cargo build --manifest-path crates/Cargo.toml --bin dnd --quiet)
fi
data="$learn/data"
tasks_json() { python3 -c "import json,sys; t=json.load(open(sys.argv[1])); $1" "$data/tasks.json" "${@:2}"; }
family_of() { tasks_json 'print(" ".join(x["name"] for x in t if x["family"] == sys.argv[2]))' "$1"; }
# The task names of LEARN/data/tasks.json (written by scripts/learnability.sh), family by family.
task_names() { tasks_json 'print(" ".join(x["name"] for x in t))'; }
# test_system TASK: the system-prompt paraphrase of TASK's test split (never trained on).
test_system() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["system"])' "$data/${1}_test.json"; }
# held_out HOLDOUT: the tasks a holdout leaves out (family:NAME, task:NAME, tasks:A,B,...; all:
# every task), space-separated; fails on any other form.
held_out() {
  local h="$1" names
  case "$h" in
    all) task_names ;;
    family:*) family_of "${h#family:}" ;;
    task:*) echo "${h#task:}" ;;
    tasks:*) names="${h#tasks:}" && echo "${names//,/ }" ;;
    *) echo "unknown holdout '$h' (all, family:NAME, task:NAME, tasks:A,B,...)" >&2; return 2 ;;
  esac
}

# score TASK RESULT LABEL=ADAPTER_DIR...: `dnd eval` of the adapters on LIMIT test examples of
# TASK (greedy, 16 new tokens); RESULT (.json) is written last, so its presence marks it done.
score() {
  local t="$1" res="$2" a=() x
  shift 2
  for x in "$@"; do a+=(--adapter "$x"); done
  "$dnd" eval --model "$model" --task "$data/${t}_test.json" --limit "$LIMIT" --seed "$SEED" \
    --max-new-tokens 16 --no-base "${a[@]}" --out-md "${res%.json}.md" --out-json "$res.tmp" \
    --out-replies "${res%.json}.replies.json"
  mv "$res.tmp" "$res"
}
# score_conditions GEN TASK RESULT DIR: GEN's adapters for TASK from the two conditions the
# server uses (the test split's system-prompt paraphrase alone, and 16 seeded test prompts),
# made in DIR, scored as dnd-system / dnd-examples into RESULT, then deleted (10 MB each, and
# regenerated from GEN in a second). With LABEL, appends "LABEL TASK SYSTEM_SECONDS
# EXAMPLES_SECONDS" (the two generation times) to $out/results/generate-seconds.txt.
score_conditions() {
  local gen="$1" t="$2" res="$3" dir="$4" label="${5:-}" start mid end
  mkdir -p "$dir"
  test_system "$t" >"$dir/$t.system.txt"
  start=$(date +%s.%N)
  "$dnd" generate --checkpoint "$gen" --prompts "$dir/$t.system.txt" --out "$dir/$t-system"
  mid=$(date +%s.%N)
  "$dnd" generate --checkpoint "$gen" --prompts "$data/${t}_test.json" --sample 16 --seed "$SEED" \
    --out "$dir/$t-examples"
  end=$(date +%s.%N)
  if [ -n "$label" ]; then
    echo "$label $t $(echo "$mid - $start" | bc) $(echo "$end - $mid" | bc)" >>"$out/results/generate-seconds.txt"
  fi
  score "$t" "$res" "dnd-system=$dir/$t-system" "dnd-examples=$dir/$t-examples"
  rm -rf "$dir/$t-system" "$dir/$t-examples"
}
