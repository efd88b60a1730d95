#!/usr/bin/env python3
"""The tables of docs/results/holdout-fresh8-smollm2.md from scripts/holdout_fresh8.sh's runs.

    scripts/holdout_table.py RES_DIR TRAIN_RES_DIR TASK...

RES_DIR holds `dnd eval` JSON per held-out TASK (rows dnd-system and dnd-examples) of the
holdout generator; TRAIN_RES_DIR the same (dnd-system only) for the added tasks it trained on.
Next to them: the base model, the own LoRA and the best constant answer
(learnability-smollm2-48.md, 200 examples), the 24-task generator that saw none of the added
tasks (skill-smollm2-48/shipped-f16/), the first 48-task generator and the shipped one that
trained on all of them (skill-smollm2-48-modulated/ and skill-smollm2-48-w8-tasks-per-step/, with
their examples16/), and the earlier runs' holdout generators (holdout-fresh8-smollm2/, then
holdout-fresh8-w8k4-smollm2/): for one of those two, the ones before it; for any other
RES_DIR, both. Recovered share = (DnD - base) / (own -
base), mean over the learnable tasks (own LoRA at least 20 points over the base model and the
constant answer), with scripts/skill_summary.py's 95% bootstrap interval.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from skill_summary import bootstrap, wilson  # noqa: E402

RESULTS = "docs/results"
OTHERS = {"24-task generator": f"{RESULTS}/skill-smollm2-48/shipped-f16",
          "first 48-task generator": f"{RESULTS}/skill-smollm2-48-modulated",
          "shipped generator (study H)": f"{RESULTS}/skill-smollm2-48-w8-tasks-per-step"}
# Earlier runs of scripts/holdout_fresh8.sh, each shown beside a later run's: the first
# (session 20) and the one with the shipped recipe's additions (session 22).
EARLIER = {"first holdout generator": f"{RESULTS}/holdout-fresh8-smollm2",
           "w8k4 holdout generator": f"{RESULTS}/holdout-fresh8-w8k4-smollm2"}


def learnability():
    """Task -> (family, base, own LoRA, constant answer) from the 48-task table."""
    out = {}
    row = re.compile(r"\| (\w+) \| (\w+) \| ([\d.]+)% \([^)]*\) \| [\d.]+% \| ([\d.]+)% \([^)]*\) \| ([\d.]+)% ")
    for line in open(f"{RESULTS}/learnability-smollm2-48.md"):
        m = row.match(line)
        if m:
            out[m.group(1)] = (m.group(2), *(float(m.group(i)) / 100 for i in (3, 4, 5)))
    return out


def rows(folder, task):
    """Label -> row of a task's `dnd eval` JSON, with a 16-prompt file beside it merged in."""
    out = {}
    for path in (f"{folder}/{task}.json", f"{folder}/examples16/{task}.json"):
        if os.path.exists(path):
            out.update({r["label"]: r for r in json.load(open(path))["rows"]})
    return out


def cell(r):
    if r is None:
        return "-"
    lo, hi = wilson(round(r["accuracy"] * r["n"]), r["n"])
    return f"{100 * r['accuracy']:.0f} ({100 * lo:.0f}-{100 * hi:.0f})"


def table(tasks, folders, conditions, learn):
    """Prints the per-task table, then each generator's mean accuracy and recovered share."""
    names = list(folders)
    print("| task | family | base | own LoRA | " + " | ".join(names) + " | constant answer |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    items = {name: {c: [] for c in conditions} for name in names}
    for t in tasks:
        fam, base, own, const = learn[t]
        cells = []
        for name in names:
            r = rows(folders[name], t)
            cells.append(" / ".join(cell(r.get(c)) for c in conditions))
            if own - max(base, const) < 0.2:
                continue
            for c in conditions:
                if c in r:
                    items[name][c].append({"base": base, "n_base": 200, "own": own, "n_own": 200,
                                           "dnd": r[c]["accuracy"], "n_dnd": r[c]["n"]})
        print(f"| {t} | {fam} | {100 * base:.1f} | {100 * own:.1f} | " + " | ".join(cells)
              + f" | {100 * const:.1f} |")
    print()
    for name in names:
        parts = []
        for c in conditions:
            its = items[name][c]
            if not its:
                continue
            acc = sum(i["dnd"] for i in its) / len(its)
            rec = sum((i["dnd"] - i["base"]) / (i["own"] - i["base"]) for i in its) / len(its)
            lo, hi = bootstrap(its, "dnd")
            parts.append(f"{c}: accuracy {100 * acc:.1f}%, recovered {100 * rec:.0f}% "
                         f"({100 * lo:.0f}-{100 * hi:.0f}%) over {len(its)} learnable tasks")
        print(f"- {name}: " + "; ".join(parts))
    print()


def main():
    res, train_res, held = sys.argv[1], sys.argv[2], sys.argv[3:]
    learn = learnability()
    print("Held-out tasks (system prompt / 16 prompts):\n")
    # A run in EARLIER is shown beside the ones listed before it; any other run (runs/...)
    # beside all of them.
    names = list(EARLIER)
    mine = [i for i, n in enumerate(names) if os.path.samefile(res, EARLIER[n])]
    earlier = {n: EARLIER[n] for n in names[:mine[0]]} if mine else dict(EARLIER)
    table(held, {"holdout generator": res, **earlier, **OTHERS}, ["dnd-system", "dnd-examples"],
          learn)
    trained = sorted(f[:-5] for f in (os.listdir(train_res) if os.path.isdir(train_res) else [])
                     if f.endswith(".json") and not f.endswith(".replies.json"))
    if trained:
        print("Added tasks the holdout generator trained on (system prompt):\n")
        earlier = {n: f"{d}/trained" for n, d in earlier.items()}
        table(trained, {"holdout generator": train_res, **earlier, **OTHERS}, ["dnd-system"],
              learn)


if __name__ == "__main__":
    main()
