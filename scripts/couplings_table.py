#!/usr/bin/env python3
"""The coupling leaderboard (results/couplings/README.md) from finished sweeps of
configs/couplings_{moons,8gaussians,spiral}.toml: mean ± half-width of the 95% t-interval over
the seeds, read from each sweep's summary_agg.csv (flowmatch computes the intervals), and the
milliseconds per training step from the runs' timing.json (mean over the seeds).

    python3 scripts/couplings_table.py results/runs/couplings_moons results/runs/couplings_8gaussians results/runs/couplings_spiral
"""
import csv
import json
import os
import sys

ROWS = [  # (label, variant, batch, sampler: "ode" or "sde")
    ("independent (I-CFM)", "independent", 256, "ode"),
    ("exact OT (OT-CFM)", "ot", 256, "ode"),
    ("Sinkhorn ε = 0.01", "sinkhorn-e001-b256", 256, "ode"),
    ("Sinkhorn ε = 0.1", "sinkhorn-e01-b256", 256, "ode"),
    ("Sinkhorn ε = 1", "sinkhorn-e1-b256", 256, "ode"),
    ("Sinkhorn ε = 0.01", "sinkhorn-e001-b1024", 1024, "ode"),
    ("Sinkhorn ε = 0.1", "sinkhorn-e01-b1024", 1024, "ode"),
    ("Sinkhorn ε = 1", "sinkhorn-e1-b1024", 1024, "ode"),
    ("SB-CFM σ = 0.5, ODE (Euler)", "sb", 256, "ode"),
    ("SB-CFM σ = 0.5, SDE (Euler–Maruyama, g = σ, 100 steps)", "sb", 256, "sde"),
]
ODE = [("straightness", "straightness"), ("rf_straightness", "Liu's S"),
       ("w2_euler_1", "W2 @1"), ("w2_euler_2", "W2 @2"), ("w2_euler_100", "W2 @100"),
       ("nll", "NLL (nats)")]


def cell(row, metric):
    mean = row.get(f"{metric}_mean", "")
    if mean == "":
        return "n/a"
    m, hi = float(mean), float(row[f"{metric}_ci95_hi"])
    return f"{m:.3f} ± {hi - m:.3f}"


def table(sweep):
    agg = {r["variant"]: r for r in csv.DictReader(open(os.path.join(sweep, "summary_agg.csv")))}
    plan = json.load(open(os.path.join(sweep, "plan.json")))
    out = ["| coupling | batch | " + " | ".join(h for _, h in ODE) + " | ms / step |",
           "|---" * (len(ODE) + 3) + "|"]
    for label, variant, batch, sampler in ROWS:
        row = agg.get(variant)
        if row is None:
            continue
        runs = [r for r in plan["runs"] if plan["values"][r][0] == variant]
        ms = []
        for run in runs:
            t = json.load(open(os.path.join(sweep, run, "timing.json")))
            ms.append(1e3 / t["train_steps_per_second"])
        cells = [cell(row, m) for m, _ in ODE]
        if sampler == "sde":
            # Only the W2 of the stochastic samples (at its 100 steps) is its own; the rest is
            # the flow's, above.
            cells = ["–", "–", "–", "–", cell(row, "w2_sde"), "–"]
        out.append(f"| {label} | {batch} | " + " | ".join(cells) + f" | {sum(ms) / len(ms):.1f} |")
    return "\n".join(out)


for sweep in sys.argv[1:]:
    print(f"### {os.path.basename(sweep.rstrip('/'))}\n")
    print(table(sweep))
    print()
