#!/usr/bin/env python3
"""Tables of scripts/skill.sh: per generator (holdout and objective: mse, sft), per scored task, the base model, the
task's own LoRA, DnD from the system prompt and from 16 example prompts, the best constant
answer, and the share of the own-LoRA gain each DnD condition recovers; then the mean recovery
over the learnable tasks (own LoRA >= 20 points over the base model and the best constant answer) with a 95% bootstrap interval
(tasks resampled, and each score redrawn from its binomial), and the share of replies inside
the label space for choice tasks (as `dnd eval` reports it). Writes SKILL/summary.md and SKILL/summary.json."""
import argparse
import json
import math
import os
import random

LEARNABLE = 0.20


def wilson(k, n, z=1.96):
    """95% Wilson interval of k successes in n trials."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def load(path):
    with open(path) as f:
        return json.load(f)


def rows(summary):
    return {r["label"]: r for r in summary["rows"]}


def recovery(base, own, dnd):
    return (dnd - base) / (own - base)


def bootstrap(items, key, draws=1000, seed=0):
    """95% interval of the mean recovery: tasks resampled, each accuracy redrawn."""
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        sample = [rng.choice(items) for _ in items]
        vals = []
        for it in sample:
            redraw = {}
            for k in ("base", "own", key):
                p, n = it[k], it[f"n_{k}"]
                redraw[k] = sum(rng.random() < p for _ in range(n)) / n
            gain = redraw["own"] - redraw["base"]
            vals.append((redraw[key] - redraw["base"]) / gain if gain > 0 else 0.0)
        means.append(sum(vals) / len(vals))
    means.sort()
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def cost_table(skill, name, items):
    """Generation time next to what fine-tuning needs to match DnD's score (scripts/finetune_curve.sh)."""
    gen = {}
    path = f"{skill}/results/generate-seconds.txt"
    if os.path.exists(path):
        for line in open(path):
            g, t, sys_s, _ = line.split()
            if g == name:
                gen[t] = float(sys_s)
    lines = []
    for it in items:
        f = f"{skill}/curve/{it['task']}.json"
        if not os.path.exists(f) or it["task"] not in gen:
            continue
        c = load(f)
        per_step = c["seconds"] / c["collect_steps"]
        hit = next((s for s, acc in zip(c["steps"], c["accuracy"]) if acc >= it["system"]), None)
        curve = ", ".join(f"{s}: {100 * acc:.0f}%" for s, acc in zip(c["steps"], c["accuracy"]))
        match = "not within the curve" if hit is None else f"{hit} steps, {hit * per_step:.0f} s"
        lines.append(f"| {it['task']} | {100 * it['system']:.0f}% | {gen[it['task']]:.1f} s | {curve} | {match} |")
    if not lines:
        return []
    return ["| task | DnD, system prompt | generation | own LoRA after N steps (accuracy) | fine-tuning to match DnD |",
            "|---|---|---|---|---|"] + lines


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--learn", required=True)
    ap.add_argument("--skill", required=True)
    ap.add_argument("--holdouts", nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=["mse", "sft"],
                    help="generator variants (the suffix of gen/HOLDOUT-VARIANT.safetensors)")
    a = ap.parse_args()
    tasks = {t["name"]: t for t in load(f"{a.learn}/data/tasks.json")}
    pct = lambda r: f'{100 * r["accuracy"]:.1f} ({100 * r["ci95"][0]:.0f}-{100 * r["ci95"][1]:.0f})'
    md, out = [], {}
    for h, variant in [(h, v) for h in a.holdouts for v in a.variants]:
        name = h.replace(":", "-") + "-" + variant
        folder = f"{a.skill}/results/{name}"
        if not os.path.isdir(folder):
            continue
        md += [f"### Generator `{name}`", "",
               "| task | family | base | own LoRA | DnD, system prompt | DnD, 16 prompts | DnD, another task's system prompt | mean of the training LoRAs | best other-task LoRA | constant answer | in label space (sys / ex) | choice likelihood (sys / ex) | recovered (sys / ex) |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        items, unmeasured = [], []
        for t in tasks:
            f = f"{folder}/{t}.json"
            if not os.path.exists(f):
                continue
            lf = f"{a.learn}/results/{t}.json"
            if not os.path.exists(lf):
                # No base / own-LoRA row yet (scripts/learnability.sh not run for it): listed
                # with its DnD scores and the constant answer, left out of every mean.
                d = load(f)
                dr, c = rows(d), d["constant"]
                md.append(f'| {t} | {tasks[t]["family"]} | - | - | {pct(dr["dnd-system"])} | {pct(dr["dnd-examples"])} '
                          f'| - | - | - | {pct(c)} `{c["label"]}` | - / - | - / - | - / - |')
                unmeasured.append(t)
                continue
            learn = load(lf)
            lr, dr = rows(learn), rows(load(f))
            base, own = lr["base"], lr["lora"]
            sys_, ex = dr["dnd-system"], dr["dnd-examples"]
            # `dnd eval`'s share of replies inside the task's labels (choice tasks only).
            space = [r.get("label_space") for r in (sys_, ex)]
            c = learn["constant"]
            control_file = f"{folder}/{t}.control.json"
            control = rows(load(control_file))["dnd-other-task"] if os.path.exists(control_file) else None
            if control is not None:
                with open(f"{folder}/{t}.control.condition") as cf:
                    control_from = cf.read().strip()
            # Leave-one-out rows: the LoRA baselines of scripts/holdout_baselines.sh.
            hb = f"{a.skill}/results/{h.replace(':', '-')}-baselines"
            mean_lora = rows(load(f"{hb}/{t}.mean.json"))["mean-lora"] if os.path.exists(f"{hb}/{t}.mean.json") else None
            best_lora, best_from = None, None
            if os.path.exists(f"{hb}/{t}.best-other.json"):
                best_lora = rows(load(f"{hb}/{t}.best-other.json"))["best-other-lora"]
                with open(f"{hb}/{t}.best-other.condition") as bf:
                    best_from = bf.read().strip()
            # Learnable: the own LoRA beats both the base model and the best constant answer by
            # the margin (an adapter answering one label must not count as skill).
            learnable = own["accuracy"] - max(base["accuracy"], c["accuracy"]) >= LEARNABLE
            rec = [recovery(base["accuracy"], own["accuracy"], r["accuracy"]) if learnable else None
                   for r in (sys_, ex)]
            fmt_space = " / ".join("-" if s is None else f"{100 * s:.0f}%" for s in space)
            likely = [r.get("choice_likelihood") for r in (sys_, ex)]
            fmt_likely = " / ".join("-" if x is None else f"{100 * x:.0f}%" for x in likely)
            fmt_rec = " / ".join("-" if r is None else f"{100 * r:.0f}%" for r in rec)
            fmt_control = "-" if control is None else f"{pct(control)} ({control_from})"
            fmt_mean = "-" if mean_lora is None else pct(mean_lora)
            fmt_best = "-" if best_lora is None else f"{pct(best_lora)} ({best_from})"
            md.append(f'| {t} | {tasks[t]["family"]} | {pct(base)} | {pct(own)} | {pct(sys_)} | {pct(ex)} | {fmt_control} | {fmt_mean} | {fmt_best} '
                      f'| {pct(c)} `{c["label"]}` | {fmt_space} | {fmt_likely} | {fmt_rec} |')
            item = {"task": t, "family": tasks[t]["family"], "n_base": base["n"], "n_own": own["n"],
                    "n_system": sys_["n"], "n_examples": ex["n"], "base": base["accuracy"],
                    "own": own["accuracy"], "system": sys_["accuracy"], "examples": ex["accuracy"],
                    "constant": c["accuracy"], "learnable": learnable,
                    "recovered_system": rec[0], "recovered_examples": rec[1],
                    "label_space_system": space[0], "label_space_examples": space[1],
                    "choice_likelihood_system": likely[0], "choice_likelihood_examples": likely[1],
                    "other_task": None if control is None else control["accuracy"],
                    "n_other_task": None if control is None else control["n"],
                    "mean_lora": None if mean_lora is None else mean_lora["accuracy"],
                    "n_mean_lora": None if mean_lora is None else mean_lora["n"],
                    "best_other_lora": None if best_lora is None else best_lora["accuracy"],
                    "n_best_other_lora": None if best_lora is None else best_lora["n"],
                    "best_other_lora_task": best_from}
            items.append(item)
        learn_items = [i for i in items if i["learnable"]]
        agg = {"tasks": len(items), "learnable": len(learn_items)}
        if learn_items:
            extra = [k for k in ("other_task", "mean_lora", "best_other_lora")
                     if all(i[k] is not None for i in learn_items)]
            keys = ["system", "examples"] + extra
            for i in learn_items:
                for k in extra:
                    i[f"recovered_{k}"] = recovery(i["base"], i["own"], i[k])
            for key in keys:
                mean = sum(i[f"recovered_{key}"] for i in learn_items) / len(learn_items)
                lo, hi = bootstrap(learn_items, key)
                agg[key] = {"mean_recovered": mean, "ci95": [lo, hi],
                            "mean_accuracy": sum(i[key] for i in learn_items) / len(learn_items)}
            agg["base_mean_accuracy"] = sum(i["base"] for i in learn_items) / len(learn_items)
            agg["own_mean_accuracy"] = sum(i["own"] for i in learn_items) / len(learn_items)
            md += ["", f'Over the {len(learn_items)} learnable tasks (own LoRA >= {100 * LEARNABLE:.0f} points over both the base model and the constant answer): '
                   f'base {100 * agg["base_mean_accuracy"]:.1f}%, own LoRA {100 * agg["own_mean_accuracy"]:.1f}%, '
                   + ", ".join(f'DnD from the {"system prompt" if k == "system" else "16 prompts"} '
                               f'{100 * agg[k]["mean_accuracy"]:.1f}% (recovers {100 * agg[k]["mean_recovered"]:.0f}% of the '
                               f'gain, 95% interval {100 * agg[k]["ci95"][0]:.0f}-{100 * agg[k]["ci95"][1]:.0f}%)'
                               for k in ("system", "examples")) + "."]
            if "other_task" in agg:
                o = agg["other_task"]
                md.append(f'Control, each task answered with the adapter made from another family\'s task\'s system prompt: '
                          f'{100 * o["mean_accuracy"]:.1f}% (recovers {100 * o["mean_recovered"]:.0f}%, '
                          f'{100 * o["ci95"][0]:.0f}-{100 * o["ci95"][1]:.0f}%).')
            for k, what in (("mean_lora", "the mean of the training tasks' LoRAs"),
                            ("best_other_lora", "the best other-task LoRA (an oracle choice)")):
                if k in agg:
                    o = agg[k]
                    md.append(f'Baseline, {what}: {100 * o["mean_accuracy"]:.1f}% (recovers '
                              f'{100 * o["mean_recovered"]:.0f}%, {100 * o["ci95"][0]:.0f}-{100 * o["ci95"][1]:.0f}%).')
        if unmeasured:
            md.append(f'Without their own LoRA row, so left out of the means: {", ".join(unmeasured)}.')
        cost = cost_table(a.skill, name, items)
        if cost:
            md += [""] + cost
        md.append("")
        out[name] = {"tasks": items, "aggregate": agg}
    with open(f"{a.skill}/summary.md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(f"{a.skill}/summary.json", "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
