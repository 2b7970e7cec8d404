#!/usr/bin/env python3
"""The few-step leaderboard (results/few_step/README.md) from finished sweeps of
configs/few_step_{moons,spiral}.toml: mean ± half-width of the 95% t-interval over the seeds,
read from each sweep's summary_agg.csv (flowmatch computes the intervals), and the training
cost from the runs' timing.json (seconds on the machine that ran them; a reflow flow counts the
flows it was trained from).

    python3 scripts/few_step_table.py results/runs/few_step_moons results/runs/few_step_spiral
"""
import csv
import json
import os
import sys

METHODS = [  # (label, variant, iteration, chain of run-folder flows whose training it needs)
    ("I-CFM", "reflow", "1-RF", ["rf1"]),
    ("OT-CFM", "ot", "", [""]),
    ("2-RF", "reflow", "2-RF", ["rf1", "rf2"]),
    ("2-RF + distillation", "reflow", "distill-1", ["rf1", "rf2", "distill1"]),
    ("MeanFlow", "meanflow", "", [""]),
    ("shortcut", "shortcut", "", [""]),
]
COLUMNS = [("w2_euler_1", "W2 @1"), ("w2_euler_2", "W2 @2"), ("w2_euler_4", "W2 @4"),
           ("mmd_euler_1", "MMD @1"), ("mmd_euler_2", "MMD @2"), ("mmd_euler_4", "MMD @4"),
           ("w2_euler_100", "W2 @100"), ("nll", "NLL (nats)")]


def cell(row, metric, sci=False):
    mean = row.get(f"{metric}_mean", "")
    if mean == "":
        return "n/a"
    m, hi = float(mean), float(row[f"{metric}_ci95_hi"])
    if sci:
        return f"{m:.1e} ± {hi - m:.0e}"
    return f"{m:.3f} ± {hi - m:.3f}"


def table(sweep):
    agg = list(csv.DictReader(open(os.path.join(sweep, "summary_agg.csv"))))
    plan = json.load(open(os.path.join(sweep, "plan.json")))
    out = ["| method | " + " | ".join(h for _, h in COLUMNS) + " | training steps | seconds |",
           "|---" * (len(COLUMNS) + 3) + "|"]
    for label, variant, iteration, chain in METHODS:
        row = next((r for r in agg if r["variant"] == variant and r.get("iteration", "") == iteration), None)
        if row is None:
            continue
        runs = [r for r in plan["runs"] if plan["values"][r][0] == variant]
        steps, secs = 0, []
        for run in runs:
            total = 0.0
            for flow in chain:
                d = os.path.join(sweep, run, flow)
                total += json.load(open(os.path.join(d, "timing.json")))["train_seconds"]
                if run == runs[0]:
                    steps += json.load(open(os.path.join(d, "summary.json")))["train_steps"]
            secs.append(total)
        cells = [cell(row, m, sci=m.startswith("mmd")) for m, _ in COLUMNS]
        if iteration.startswith("distill"):
            cells[-1] = "n/a (one-step map)"
        out.append(f"| {label} | " + " | ".join(cells) + f" | {steps} | {sum(secs) / len(secs):.0f} |")
    return "\n".join(out)


for sweep in sys.argv[1:]:
    print(f"### {os.path.basename(sweep.rstrip('/'))}\n")
    print(table(sweep))
    print()
