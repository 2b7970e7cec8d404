#!/usr/bin/env bash
# Reproduces the seeds' experiments and refreshes results/<name>/ from the runs.
#
#   scripts/reproduce.sh                      # all of them (about 30 minutes on 2 cores)
#   scripts/reproduce.sh lesson_reflow        # one
#   scripts/reproduce.sh mnist                # MNIST (not in the default set: needs
#                                             #   scripts/fetch-mnist.sh and flowmatch classifier)
#   RUNS=/some/dir scripts/reproduce.sh --collect   # only copy from finished runs
#
# Runs go to results/runs/ (not committed: checkpoints, logs, TensorBoard events); the light
# part of each (config, summary, tables, figures) is copied to results/<name>/ and each
# results/<name>/table.md is rendered from summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flowmatch-target}"
RUNS=${RUNS:-results/runs}
ALL=(lesson_ex1_steps lesson_reflow lesson_reflow_ot blog_reflow blog_reflow_ot)
collect=0
names=()
for a in "$@"; do
  if [ "$a" = --collect ]; then collect=1; else names+=("$a"); fi
done
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")

if [ $collect = 0 ]; then
  cargo build --release -q -p flowmatch-experiments
  mkdir -p "$RUNS"
  for n in "${names[@]}"; do
    [ -f "configs/$n.toml" ] || { echo "error: no configs/$n.toml" >&2; exit 2; }
    rm -rf "${RUNS:?}/$n"
    echo "== $n"
    /usr/bin/time -f "$n: %e s wall, %M KB max RSS" "$CARGO_TARGET_DIR/release/flowmatch" run "configs/$n.toml" --out "$RUNS"
  done
fi

copy_run() { # src dst [with_gif]
  mkdir -p "$2"
  for f in config.toml summary.json timing.json distributions.png trajectories.png flow_field.png steps_grid.png samples_grid.png; do
    [ -f "$1/$f" ] && cp "$1/$f" "$2/"
  done
  if [ "${3:-}" = gif ] && [ -f "$1/flow.gif" ]; then cp "$1/flow.gif" "$2/"; fi
  return 0
}

for n in "${names[@]}"; do
  src=$RUNS/$n
  dst=results/$n
  [ -f "$src/summary.json" ] || { echo "error: $src has no summary.json (run not finished)" >&2; exit 1; }
  rm -rf "$dst" && mkdir -p "$dst"
  if [ -f "$src/reflow.json" ]; then
    cp "$src"/reflow.md "$src"/reflow.json "$src"/reflow.png "$src"/summary.json "$dst/"
    [ -f "$src/fm_vs_reflow.gif" ] && cp "$src/fm_vs_reflow.gif" "$dst/"
    # The first flow and the first reflowed one carry the figures; later ones only summaries.
    for it in "$src"/rf* "$src"/distill*; do
      [ -d "$it" ] || continue
      b=$(basename "$it")
      case $b in
        rf1|rf2) copy_run "$it" "$dst/$b" ;;
        *) mkdir -p "$dst/$b" && cp "$it/summary.json" "$it/config.toml" "$dst/$b/" ;;
      esac
    done
  else
    copy_run "$src" "$dst" gif
  fi
  python3 - "$dst" <<'EOF'
import json, sys, os
dst = sys.argv[1]
s = json.load(open(os.path.join(dst, "summary.json")))
out = []
if "reflow" in s and s["reflow"]:
    out.append(open(os.path.join(dst, "reflow.md")).read().strip())
else:
    table = s["eval"]["table"]
    solvers = list(dict.fromkeys(r["solver"] for r in table))
    steps = sorted({r["steps"] for r in table})
    cell = {(r["solver"], r["steps"]): r for r in table}
    metrics = ("w2", "mmd") + (("fid",) if all(r.get("fid") is not None for r in table) else ())
    for metric in metrics:
        out.append(f"{metric.upper()} against {s['target']} by solver and steps (NFE in brackets):\n")
        out.append("| steps | " + " | ".join(solvers) + " |")
        out.append("|---:|" + "---:|" * len(solvers))
        for k in steps:
            row = [f"{cell[(m, k)][metric]:.4f} ({cell[(m, k)]['nfe']})" if (m, k) in cell else "" for m in solvers]
            out.append(f"| {k} | " + " | ".join(row) + " |")
        out.append("")
    if s.get("progress"):
        fid = all(r.get("fid") is not None for r in s["progress"])
        out.append(f"The headline solver ({s['eval']['solver']}) during training:\n")
        out.append("| step | W2 | MMD |" + (" FID |" if fid else ""))
        out.append("|---:|---:|---:|" + ("---:|" if fid else ""))
        for r in s["progress"]:
            out.append(f"| {r['step']} | {r['w2']:.4f} | {r['mmd']:.5f} |" + (f" {r['fid']:.1f} |" if fid else ""))
        out.append("")
    if s["eval"].get("image"):
        im = s["eval"]["image"]
        out.append(f"Classes predicted among the generated digits: {im['classes_present']} of 10, "
                   f"counts {im['class_counts']}\n")
        if im.get("fid_real") is not None:
            out.append(f"FID-like of a second real sample of the same size (the floor at this "
                       f"sample count): {im['fid_real']:.1f}\n")
    out.append(f"straightness {s['straightness']:.4f}, S (Liu) {s['rf_straightness']:.4f}, "
               f"normalized path energy {s['normalized_path_energy']:.4f}")
open(os.path.join(dst, "table.md"), "w").write("\n".join(out).strip() + "\n")
EOF
  echo "== $dst"
done
