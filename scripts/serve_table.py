#!/usr/bin/env python3
"""The shipped generator through the server next to its direct evaluation
(docs/results/serve-eval-smollm2-48.md).

    scripts/serve_table.py NAME=SERVE_DIR [NAME=SERVE_DIR ...]
    scripts/serve_table.py --bundle SERVE_DIR OUT.json.gz

Each SERVE_DIR is a scripts/serve_eval.py output (per task `dnd score` JSON with rows base,
system, examples), or the bundle `--bundle` packs it into (every task's scores and replies in
one gzipped JSON, what the results folder keeps). Beside them: the direct evaluation of the same generator on 100 questions
per task (`dnd eval`, docs/results/skill-smollm2-48-w8-tasks-per-step/ and its examples16/),
and the base model, own LoRA and best constant answer of learnability-smollm2.md and
learnability-smollm2-48.md (200 examples). Per task, system prompt / 16 prompts; then each column's mean accuracy over all
tasks and its recovered share of the own-LoRA gain over the learnable tasks (own LoRA at least
20 points over the base model and the constant answer), with scripts/skill_summary.py's 95%
bootstrap interval; then paired differences over tasks (tasks resampled, scores redrawn): each
served column against the direct evaluation, and the first two served columns.
"""
import functools
import gzip
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from skill_summary import bootstrap, wilson  # noqa: E402

DIRECT = "docs/results/skill-smollm2-48-w8-tasks-per-step"
# The first 24 tasks' learnability table, then the 24 added ones'.
LEARNABILITY = ("docs/results/learnability-smollm2.md", "docs/results/learnability-smollm2-48.md")


def learnability():
    """Task -> (family, base, own LoRA, constant answer) of the 48 tasks."""
    out = {}
    row = re.compile(r"\| (\w+) \| (\w+) \| ([\d.]+)% \([^)]*\) \| [\d.]+% \| ([\d.]+)% \([^)]*\) "
                     r"\| ([\d.]+)% ")
    for path in LEARNABILITY:
        for line in open(path):
            m = row.match(line)
            if m:
                out[m.group(1)] = (m.group(2), *(float(m.group(i)) / 100 for i in (3, 4, 5)))
    return out
CONDITIONS = ("system", "examples")


@functools.cache
def bundle(path):
    return json.load(gzip.open(path, "rt"))


def served(folder, task):
    """Condition -> row of a served task (base, system, examples)."""
    if folder.endswith(".json.gz"):
        score = bundle(folder).get(task, {}).get("score")
    else:
        path = f"{folder}/{task}.json"
        score = json.load(open(path)) if os.path.exists(path) else None
    return {r["label"]: r for r in score["rows"]} if score else {}


def pack(folder, out):
    """Every task's score and replies of a serve_eval.py folder, as one gzipped JSON."""
    tasks = sorted(f[:-5] for f in os.listdir(folder)
                   if f.endswith(".json") and not f.endswith(".replies.json"))
    data = {t: {"score": json.load(open(f"{folder}/{t}.json")),
                "replies": json.load(open(f"{folder}/{t}.replies.json"))} for t in tasks}
    with gzip.open(out, "wt") as f:
        json.dump(data, f, separators=(",", ":"))


def direct(task):
    """Condition -> row of the direct evaluation (its labels dnd-system, dnd-examples)."""
    out = {}
    for path in (f"{DIRECT}/{task}.json", f"{DIRECT}/examples16/{task}.json"):
        if os.path.exists(path):
            for r in json.load(open(path))["rows"]:
                out[r["label"].removeprefix("dnd-")] = r
    return out


def cell(r):
    if r is None:
        return "-"
    lo, hi = wilson(r["correct"], r["n"])
    return f"{100 * r['accuracy']:.0f} ({100 * lo:.0f}-{100 * hi:.0f})"


def paired(a, b, tasks, cond, draws=2000, seed=0):
    """Mean of b - a over tasks with a 95% interval: tasks resampled, scores redrawn."""
    pairs = [(a[t][cond], b[t][cond]) for t in tasks if cond in a[t] and cond in b[t]]
    rng = random.Random(seed)
    redraw = lambda r: sum(rng.random() < r["accuracy"] for _ in range(r["n"])) / r["n"]
    means = sorted(
        sum(redraw(y) - redraw(x) for x, y in (rng.choice(pairs) for _ in pairs)) / len(pairs)
        for _ in range(draws))
    mean = sum(y["accuracy"] - x["accuracy"] for x, y in pairs) / len(pairs)
    return mean, means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def main():
    if sys.argv[1:2] == ["--bundle"]:
        pack(sys.argv[2], sys.argv[3])
        return
    cols = dict(a.split("=", 1) for a in sys.argv[1:])
    learn = learnability()
    tasks = sorted(learn)
    data = {name: {t: served(d, t) for t in tasks} for name, d in cols.items()}
    data["direct (100 questions)"] = {t: direct(t) for t in tasks}
    names = list(data)
    first = next(iter(cols.values()))
    print("| task | family | base | own LoRA | served base | " + " | ".join(names)
          + " | constant answer |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|")
    for t in tasks:
        fam, base, own, const = learn[t]
        cells = [" / ".join(cell(data[n][t].get(c)) for c in CONDITIONS) for n in names]
        print(f"| {t} | {fam} | {100 * base:.1f} | {100 * own:.1f} | "
              f"{cell(served(first, t).get('base'))} | " + " | ".join(cells)
              + f" | {100 * const:.1f} |")
    print()
    for n in names:
        parts = []
        for c in CONDITIONS:
            rows = [data[n][t][c] for t in tasks if c in data[n][t]]
            acc = sum(r["accuracy"] for r in rows) / len(rows)
            its = [{"base": learn[t][1], "n_base": 200, "own": learn[t][2], "n_own": 200,
                    "dnd": data[n][t][c]["accuracy"], "n_dnd": data[n][t][c]["n"]}
                   for t in tasks if c in data[n][t]
                   and learn[t][2] - max(learn[t][1], learn[t][3]) >= 0.2]
            rec = sum((i["dnd"] - i["base"]) / (i["own"] - i["base"]) for i in its) / len(its)
            lo, hi = bootstrap(its, "dnd")
            parts.append(f"{c}: accuracy {100 * acc:.1f}% over {len(rows)} tasks, recovered "
                         f"{100 * rec:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%) over {len(its)} "
                         "learnable")
        print(f"- {n}: " + "; ".join(parts))
    for n, d in cols.items():
        rows = [served(d, t)["base"] for t in tasks if "base" in served(d, t)]
        print(f"- {n}, served base model: {100 * sum(r['accuracy'] for r in rows) / len(rows):.1f}%"
              f" over {len(rows)} tasks")
    const = sum(learn[t][3] for t in tasks) / len(tasks)
    print(f"- best constant answer: {100 * const:.1f}% over {len(tasks)} tasks")
    print()
    # Each served column against the direct evaluation, then the first two served columns.
    pairs = [(n, names[-1]) for n in cols] + ([(names[0], names[1])] if len(cols) >= 2 else [])
    for a, b in pairs:
        for c in CONDITIONS:
            m, lo, hi = paired(data[b], data[a], tasks, c)
            print(f"- {a} - {b}, {c}: {100 * m:+.1f} points ({100 * lo:+.1f} to {100 * hi:+.1f})")

if __name__ == "__main__":
    main()
