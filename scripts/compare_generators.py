#!/usr/bin/env python3
"""Two generators scored on the same questions (`dnd eval` JSON of scripts/skill.sh or of a
loop like it: one TASK.json per task with rows `dnd-system` and `dnd-examples`), side by side:
per task the accuracy of each from the system prompt and from 16 prompts, then per group of
tasks the mean accuracy of each and the paired difference B - A with a 95% bootstrap interval
(tasks resampled, and each accuracy redrawn from its binomial, as scripts/skill_summary.py does).
Only tasks both have scored are compared, and only the conditions both scored (a run scored
from the system prompt alone has no `dnd-examples` row; its columns show "-").

    scripts/compare_generators.py A_DIR B_DIR --names shipped,48-task \\
        --group "first 24=upper_case,reverse_words,..." --group "added 24=..." [--out FILE.md]
"""
import argparse
import json
import os
import random
import sys


def accuracies(path):
    with open(path) as f:
        rows = {r["label"]: r for r in json.load(f)["rows"]}
    return {k: (rows[k]["accuracy"], rows[k]["n"]) for k in ("dnd-system", "dnd-examples") if k in rows}


def interval(pairs, draws=2000, seed=0):
    """Mean of B - A over tasks and its 95% bootstrap interval."""
    rng = random.Random(seed)
    mean = sum(b - a for (a, _), (b, _) in pairs) / len(pairs)
    stats = []
    for _ in range(draws):
        total = 0.0
        for _ in pairs:
            (a, na), (b, nb) = pairs[rng.randrange(len(pairs))]
            ra = sum(rng.random() < a for _ in range(na)) / na
            rb = sum(rng.random() < b for _ in range(nb)) / nb
            total += rb - ra
        stats.append(total / len(pairs))
    stats.sort()
    return mean, stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--names", default="A,B")
    ap.add_argument("--group", action="append", default=[], help="NAME=task,task,...")
    ap.add_argument("--out")
    args = ap.parse_args()
    na, nb = args.names.split(",")
    scored = lambda d: {f[:-5] for f in os.listdir(d) if f.endswith(".json") and not f.endswith(".replies.json")}
    both = scored(args.a) & scored(args.b)
    groups = [(g.split("=", 1)[0], g.split("=", 1)[1].split(",")) for g in args.group]
    if not groups:
        groups = [("all", sorted(both))]
    lines = [
        f"| task | {na}, system prompt | {nb}, system prompt | {na}, 16 prompts | {nb}, 16 prompts |",
        "|---|---|---|---|---|",
    ]
    summary = [
        f"| tasks | n | condition | {na} | {nb} | {nb} - {na} (95% interval) |",
        "|---|---|---|---|---|---|",
    ]
    for name, tasks in groups:
        tasks = [t for t in tasks if t in both]
        if not tasks:
            continue
        acc = {t: (accuracies(os.path.join(args.a, t + ".json")), accuracies(os.path.join(args.b, t + ".json"))) for t in tasks}
        for t in tasks:
            (a, b) = acc[t]
            pct = lambda x, k: f"{100 * x[k][0]:.0f}" if k in x else "-"
            lines.append(f"| {t} | {pct(a, 'dnd-system')} | {pct(b, 'dnd-system')} | {pct(a, 'dnd-examples')} | {pct(b, 'dnd-examples')} |")
        for cond, label in (("dnd-system", "system prompt"), ("dnd-examples", "16 prompts")):
            missing = [t for t in tasks if cond not in acc[t][0] or cond not in acc[t][1]]
            if missing:
                print(f"{name}, {label}: not compared ({len(missing)} tasks lack it, e.g. {missing[0]})",
                      file=sys.stderr)
                continue
            pairs = [(acc[t][0][cond], acc[t][1][cond]) for t in tasks]
            mean_a = sum(a for (a, _), _ in pairs) / len(pairs)
            mean_b = sum(b for _, (b, _) in pairs) / len(pairs)
            d, lo, hi = interval(pairs)
            summary.append(
                f"| {name} | {len(tasks)} | {label} | {100 * mean_a:.1f}% | {100 * mean_b:.1f}% | "
                f"{100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) |"
            )
    text = "\n".join(summary) + "\n\n" + "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, end="")


if __name__ == "__main__":
    main()
